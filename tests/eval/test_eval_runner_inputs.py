"""Every input of a run reaches what it controls: the samples built from tasks, lengths, seed,
haystack, corpus, data files and their limit, and the engine's and records' settings
(mixkv.eval.runner.build_samples and _run_one; found by mutation testing, see
benchmarks/MUTATION.md)."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("transformers")

from mixkv.eval import runner, tasks  # noqa: E402
from mixkv.eval.engine import Engine  # noqa: E402
from mixkv.eval.models import EvalModel  # noqa: E402
from mixkv.eval.runner import RunConfig, build_samples, load_records, run  # noqa: E402

from hf_models import CharTokenizer  # noqa: E402
from hf_models import tiny_eval_model, tiny_llama
from test_eval_engine import W  # noqa: E402
from test_eval_resume import profile as redundancy_profile  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "no_plots")


def config(tmp_path, **changes):
    base = dict(tasks=[], lengths=[160], samples=2, methods=["snapkv"], budgets=[24], window=W,
                out=str(tmp_path / "out"), progress=False, quiet=True)
    return RunConfig(**{**base, **changes})


def prompt_tokens(em, sample):
    head, question = sample.user_parts()
    return em.count_tokens(head + question + " " + sample.answer_prefix)


def test_task_samples_follow_tasks_lengths_seed_and_the_models_token_count(tmp_path):
    em = tiny_eval_model()
    got = build_samples(config(tmp_path, tasks=["niah_single", "passkey"], lengths=[400, 520],
                               seed=5), em)
    assert [(s.task, s.meta["length"]) for s in got] == [
        (task, length) for task in ("niah_single", "passkey") for length in (400, 520)
        for _ in range(2)]
    for sample in got:   # measured in the model's tokens (characters here), not in words
        assert sample.meta["length"] - 120 < prompt_tokens(em, sample) <= sample.meta["length"]
    # The seed picks the needles: the same run with another seed asks for other ones.
    other = build_samples(config(tmp_path, tasks=["niah_single", "passkey"], lengths=[400, 520],
                                 seed=6), em)
    assert [s.answers for s in other] != [s.answers for s in got]
    assert got == [sample for task in ("niah_single", "passkey") for length in (400, 520)
                   for sample in tasks.make_samples(task, 2, length=length, seed=5,
                                                    count_tokens=em.count_tokens)]


def test_the_haystack_folder_fills_the_prompts_and_beats_the_haystack_kind(tmp_path):
    em = tiny_eval_model()
    folder = tmp_path / "hay"
    folder.mkdir()
    (folder / "gulls.txt").write_text("The lighthouse keeper counts gulls at dawn. " * 3 +
                                      "Fog rolls over the quay. " * 3)
    for kind in ("task", "noise"):
        got = build_samples(config(tmp_path, tasks=["niah_single"], haystack=kind,
                                   haystack_dir=str(folder), lengths=[400]), em)
        assert all(s.meta["haystack"] == "dir" for s in got)
        assert all("lighthouse keeper" in s.context or "Fog rolls" in s.context for s in got)
    noise = build_samples(config(tmp_path, tasks=["niah_single"], haystack="noise",
                                 lengths=[400]), em)
    assert noise == tasks.make_samples("niah_single", 2, length=400, seed=0,
                                       count_tokens=em.count_tokens,
                                       haystack=tasks.Haystack("noise"))
    assert not any("lighthouse" in s.context or "Fog" in s.context for s in noise)


class BosTokenizer(CharTokenizer):
    bos_token_id = 1


@pytest.mark.parametrize("adds_bos, tokenizer, bos", [
    (True, BosTokenizer(), 1), (False, BosTokenizer(), 0), (True, CharTokenizer(), 0)])
def test_corpus_passages_count_the_bos_the_model_adds(tmp_path, adds_bos, tokenizer, bos):
    """A passage's prefix plus the model's BOS (only when it adds one and has one) fills the
    length exactly (one-character words: every other count is reachable), and its
    continuation holds the asked-for tokens."""
    em = EvalModel(model=tiny_llama(), tokenizer=tokenizer, name="tiny", source="config",
                   load_seconds=0.0, fixes=[], stop_ids=[], adds_bos=adds_bos)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "x.txt").write_text("x " * 300)
    got = build_samples(config(tmp_path, corpus=str(docs), lengths=[101], samples=1,
                               continuation=24), em)
    assert len(got) == 1 and got[0].task == tasks.CORPUS_TASK
    assert bos + len(em.encode(got[0].context)) == 101 - bos   # 1, 3, 5... tokens: odd counts
    assert len(em.encode(got[0].target)) == 24


def test_a_corpus_too_short_for_a_length_says_so(tmp_path, capsys):
    em = tiny_eval_model()
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "x.txt").write_text("word " * 60)
    got = build_samples(config(tmp_path, corpus=str(docs), lengths=[100, 400], samples=1,
                               continuation=24), em)
    assert [s.meta["length"] for s in got] == [100]
    captured = capsys.readouterr()
    assert captured.err == f"mixkv.eval: no document of --corpus {docs} holds 400 + 24 tokens\n"
    assert captured.out == ""


def test_data_files_follow_tasks_with_their_limit_and_the_longest_length(tmp_path):
    em = tiny_eval_model()
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(dict(context=f"row {i} " + "the sky is blue " * 40,
                                            input="Color?", answers=["blue"], _id=f"q{i}"))
                            + "\n" for i in range(5)))
    got = build_samples(config(tmp_path, tasks=["passkey"], data=[str(data)], limit=3,
                               lengths=[120, 200]), em)
    assert [s.task for s in got] == ["passkey"] * 4 + ["qa"] * 3
    assert [s.id for s in got[4:]] == ["q0", "q1", "q2"]
    for sample in got[4:]:   # cut to the longest length, in the model's tokens
        assert 200 - 20 < prompt_tokens(em, sample) <= 200
    whole = build_samples(config(tmp_path, data=[str(data)], lengths=[]), em)
    assert len(whole) == 5 and all(s.context.count("the sky is blue") == 40 for s in whole)


@pytest.mark.parametrize("haystack_dir", [False, True])
def test_the_engine_and_every_record_carry_the_runs_settings(tmp_path, monkeypatch,
                                                             haystack_dir):
    em = tiny_eval_model()
    folder = None
    if haystack_dir:
        folder = tmp_path / "hay"
        folder.mkdir()
        (folder / "a.txt").write_text("Quiet rivers run deep. " * 5)
    seen = []
    original = Engine.prefill

    def spying(self, prepared):
        seen.append(dict(shortcut=self.shortcut, window=self.window, mode=self.mode))
        return original(self, prepared)

    monkeypatch.setattr(Engine, "prefill", spying)
    # Recorded, not applied: a thread pool of 3 would outlive the test (and deadlock the
    # forked processes of scripts/mutation.sh).
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cfg = config(tmp_path, tasks=["passkey"], lengths=[150], samples=1, seed=3, shortcut=False,
                 threads=3, window=W + 2, mode="aware", haystack="noise",
                 haystack_dir=str(folder) if folder else None)
    run(cfg, em=em)
    assert seen == [dict(shortcut=False, window=W + 2, mode="aware")] and threads == [3]
    records = load_records(tmp_path / "out" / "results.jsonl")
    assert [r["method"] for r in records] == ["full", "snapkv"]
    sample = build_samples(cfg, em)[0]
    settings = runner.run_settings(cfg, em)
    for record, combo in zip(records, runner.plan(cfg)):
        assert {k: record[k] for k in ("model", "mode", "window", "haystack", "seed", "length")} \
            == dict(model="tiny-llama", mode="aware", window=W + 2, seed=3, length=150,
                    haystack=str(folder) if folder else "noise")
        assert record["prefill_seconds"] == records[0]["prefill_seconds"] > 0
        assert record["settings"] == runner.settings_of(settings, sample, combo)
        assert record["sample_id"] == sample.id


def test_the_engine_gets_the_profile_and_decode_budget_only_where_asked(tmp_path, monkeypatch):
    em = tiny_eval_model()
    profile = redundancy_profile(tmp_path, "r.pt", 0.3)
    asked = []
    original = Engine.run

    def spying(self, prefilled, method, *args, **options):
        asked.append((method, options))
        return original(self, prefilled, method, *args, **options)

    monkeypatch.setattr(Engine, "run", spying)
    cfg = config(tmp_path, tasks=["passkey"], samples=1, methods=["snapkv", "mixkv"])
    run(dataclasses.replace(cfg, redundancy=profile, decode_budget=40), em=em)
    assert asked == [("full", {}), ("snapkv", dict(decode_budget=40, interval=None)),
                     ("mixkv", dict(redundancy=profile, decode_budget=40, interval=None))]
    asked.clear()
    run(dataclasses.replace(cfg, out=str(tmp_path / "plain")), em=em)
    assert asked == [("full", {}), ("snapkv", {}), ("mixkv", {})]


def test_a_resume_fills_in_a_later_sample_after_a_finished_one(tmp_path, monkeypatch):
    """Into a folder that does not exist yet (its parents made), then a results file whose
    rows of the second sample are lost and whose last line is torn to a single byte."""
    em = tiny_eval_model()
    cfg = config(tmp_path, tasks=["passkey"], out=str(tmp_path / "runs" / "first" / "out"))
    run(cfg, em=em)
    results = tmp_path / "runs" / "first" / "out" / "results.jsonl"
    rows = load_records(results)
    first = [r for r in rows if r["sample_id"] == rows[0]["sample_id"]]
    assert len(first) == 2 and len(rows) == 4
    results.write_text("".join(json.dumps(r) + "\n" for r in first) + "{")
    prefilled = []
    original = Engine.prefill
    monkeypatch.setattr(Engine, "prefill", lambda self, prepared: prefilled.append(
        prepared.sample.id) or original(self, prepared))
    run(cfg, em=em)
    assert prefilled == [rows[2]["sample_id"]]
    untimed = [{k: v for k, v in r.items() if "seconds" not in k} for r in first + rows[2:]]
    assert [{k: v for k, v in r.items() if "seconds" not in k}
            for r in load_records(results)] == untimed   # seeded: the same results again
    assert results.read_text().splitlines()[2] == "{"   # the torn line stays on its own


def test_the_progress_bar_names_the_run_and_counts_evaluations(tmp_path, capsys):
    run(config(tmp_path, tasks=["passkey"], samples=1, ratios=[0.5], progress=True),
        em=tiny_eval_model())
    err = capsys.readouterr().err
    bar = err.split("\r")[-1]
    assert bar.startswith("mixkv.eval: 100%") and "3/3 [" in bar and "eval/s" in bar
    for current in ("passkey full]", "passkey snapkv 24]", "passkey snapkv 0.5]"):
        assert current in err


def test_ratio_budgets_reach_the_engine_and_the_resume_key(tmp_path):
    em = tiny_eval_model()
    run(config(tmp_path, tasks=["passkey"], samples=1, budgets=[], ratios=[0.25]), em=em)
    run(config(tmp_path, tasks=["passkey"], samples=1, budgets=[], ratios=[0.25, 0.5]), em=em)
    rows = load_records(tmp_path / "out" / "results.jsonl")
    assert [(r["method"], r["budget"], r["ratio"]) for r in rows] == [
        ("full", None, None), ("snapkv", None, 0.25), ("snapkv", None, 0.5)]
    # a ratio is the fraction of the prompt removed
    assert 0.7 < rows[1]["kv_ratio"] < 0.8 and 0.45 < rows[2]["kv_ratio"] < 0.55


def test_a_sample_given_twice_is_evaluated_and_reported_once(tmp_path, monkeypatch):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(dict(context="the sky is blue " * 20, input="Color?",
                                    answers=["blue"], _id="q0")) + "\n")
    summary = run(config(tmp_path, data=[str(data), str(data)]), em=tiny_eval_model())
    rows = load_records(tmp_path / "out" / "results.jsonl")
    assert [(r["sample_id"], r["method"]) for r in rows] == [("q0", "full"), ("q0", "snapkv")]
    assert {r["n"] for r in summary["rows"]} == {1}


def test_a_results_file_torn_in_its_first_byte_loses_no_row(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("{")   # killed while writing its very first row
    run(config(tmp_path, tasks=["passkey"], samples=1), em=tiny_eval_model())
    assert [r["method"] for r in load_records(out / "results.jsonl")] == ["full", "snapkv"]


@pytest.mark.parametrize("changes,message", [
    (dict(engine="vllm"), r"--engine vllm runs the query-aware regime only .*--mode agnostic"),
    (dict(engine="vllm", mode="both"), r"query-aware regime only .*--mode both"),
    (dict(engine="vllm", mode="aware", decode_budget=64), r"does not compress during generation"),
    (dict(engine="sglang"), r"unknown engine 'sglang'; choose from hf, vllm"),
])
def test_engine_settings_it_cannot_honour_are_refused_before_loading(tmp_path, changes, message):
    """--engine vllm cannot feed a question after a compressed prompt, nor compress while
    decoding: refused by name before a model loads (em=None would load one)."""
    with pytest.raises(ValueError, match=message):
        run(config(tmp_path, **changes))
