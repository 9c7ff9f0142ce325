"""Resuming into an --out folder is safe: a results.jsonl row is reused only when every setting
that defines it matches (mixkv.eval.runner.settings_of); rows of other settings stay in the file,
are named in a message, and never enter this run's reports."""

import json
import time

import pytest
import torch

pytest.importorskip("transformers")

from mixkv.eval import runner, tasks  # noqa: E402
from mixkv.eval.engine import Engine  # noqa: E402
from mixkv.eval.runner import RunConfig, load_records, run  # noqa: E402

from test_eval_engine import W, tiny_eval_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "no_plots")
SAMPLES = 2
COMBOS = 3  # full, snapkv@24, mixkv@24


def config(out, **changes):
    base = dict(tasks=["niah_single"], lengths=[160], samples=SAMPLES, methods=["snapkv", "mixkv"],
                budgets=[24], window=W, out=str(out), progress=False, quiet=True)
    return RunConfig(**{**base, **changes})


@pytest.fixture
def em():
    return tiny_eval_model()


@pytest.fixture
def engine_runs(monkeypatch):
    """Counts the (method, budget) results computed (the full reference excluded)."""
    calls = []
    original = Engine.run

    def counting(self, prefilled, method, *args, **kwargs):
        if method != "full":
            calls.append(method)
        return original(self, prefilled, method, *args, **kwargs)

    monkeypatch.setattr(Engine, "run", counting)
    return calls


def profile(tmp_path, name, value):
    path = tmp_path / name
    torch.save(torch.full((3, 2), value), path)  # tiny Llama: 3 layers, 2 KV heads
    return str(path)


def reported(out):
    return json.loads((out / "summary.json").read_text())["records"]


# Each case: the setting changed (before "/": the settings_of field that changes), and how it
# changes the config or the model. Every field of settings_of has a case here or below: a new
# field without one fails test_every_setting_is_tested.
CHANGES = {
    "model": lambda cfg, em, tmp: (cfg, setattr(em, "name", "another-model")),
    "model_source": lambda cfg, em, tmp: (cfg, setattr(em, "source", "/elsewhere/model.gguf")),
    "dtype": lambda cfg, em, tmp: (config(cfg.out, dtype="bfloat16"), None),
    "mode": lambda cfg, em, tmp: (config(cfg.out, mode="aware"), None),
    "window": lambda cfg, em, tmp: (config(cfg.out, window=W * 2), None),
    "shortcut": lambda cfg, em, tmp: (config(cfg.out, shortcut=False), None),
    "seed": lambda cfg, em, tmp: (config(cfg.out, seed=1), None),
    "prompt/samples": lambda cfg, em, tmp: (config(cfg.out, samples=SAMPLES + 1), None),
    "sample_id/length": lambda cfg, em, tmp: (config(cfg.out, lengths=[200]), None),
    "prompt/haystack": lambda cfg, em, tmp: (config(cfg.out, haystack="noise"), None),
}


def test_every_setting_is_tested(em, tmp_path):
    sample = tasks.Sample(id="s", task="t", context="c", question="q", answers=["a"])
    fields = runner.settings_of(runner.run_settings(config(tmp_path), em), sample,
                                dict(method="snapkv", budget=24, ratio=None))
    covered = {name.split("/")[0] for name in CHANGES} | {"redundancy"}
    identity = {"task", "method", "budget", "ratio"}  # the grid itself
    assert set(fields) - identity == covered


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_changed_setting_reruns_and_is_never_mixed(change, em, tmp_path, engine_runs, capsys):
    out = tmp_path / "out"
    run(config(out), em=em)
    first_table = (out / "table.md").read_text()
    assert len(engine_runs) == SAMPLES * 2
    engine_runs.clear()

    changed, _ = CHANGES[change](config(out), em, tmp_path)
    capsys.readouterr()
    run(changed, em=em)
    samples = changed.samples
    # Nothing of the first run was reused for the second, and its reports hold only its rows.
    assert len(engine_runs) == samples * 2
    assert reported(out) == samples * COMBOS
    assert len(load_records(out / "results.jsonl")) == (SAMPLES + samples) * COMBOS
    message = capsys.readouterr().err
    assert "left out of this run's reports" in message
    name = change.split("/")[0]
    expected = {"prompt": "the prompt of", "sample_id": "other samples, methods or budgets",
                "window": f"window {W} (this run: {W * 2})"}   # the old and the new value
    assert expected.get(name, f"{name} ") in message

    # Back to the first settings: everything is there, nothing is recomputed, same table.
    engine_runs.clear()
    if change.startswith("model"):
        em = tiny_eval_model()
    run(config(out), em=em)
    assert engine_runs == [] and reported(out) == SAMPLES * COMBOS
    assert (out / "table.md").read_text() == first_table


def test_the_prompt_builder_is_part_of_the_key(em, tmp_path, engine_runs, monkeypatch, capsys):
    out = tmp_path / "out"
    run(config(out), em=em)
    engine_runs.clear()
    monkeypatch.setattr(tasks, "_NIAH_INSTRUCTION", tasks._NIAH_INSTRUCTION + " Be brief.")
    capsys.readouterr()
    run(config(out), em=em)
    assert len(engine_runs) == SAMPLES * 2 and reported(out) == SAMPLES * COMBOS
    assert f"the prompt of {SAMPLES} sample(s)" in capsys.readouterr().err


def test_the_data_file_truncation_length_is_part_of_the_key(em, tmp_path, engine_runs):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(dict(context="the sky is blue " * 40, input="Color?",
                                              answers=["blue"], _id=f"q{i}")) for i in range(2)))
    out = tmp_path / "out"
    run(config(out, tasks=[], data=[str(data)], lengths=[200]), em=em)
    engine_runs.clear()
    run(config(out, tasks=[], data=[str(data)], lengths=[300]), em=em)
    assert len(engine_runs) == 2 * 2 and reported(out) == 2 * COMBOS


def test_a_redundancy_profile_reruns_only_the_mixes(em, tmp_path, engine_runs, capsys):
    out = tmp_path / "out"
    path = profile(tmp_path, "r.pt", 0.3)
    run(config(out), em=em)
    engine_runs.clear()
    capsys.readouterr()
    run(config(out, redundancy=path), em=em)
    assert engine_runs == ["mixkv"] * SAMPLES  # snapkv never reads the profile: reused
    assert reported(out) == SAMPLES * COMBOS
    assert "redundancy null" in capsys.readouterr().err

    # The same file name with other content is another profile.
    engine_runs.clear()
    profile(tmp_path, "r.pt", 0.9)
    run(config(out, redundancy=path), em=em)
    assert engine_runs == ["mixkv"] * SAMPLES
    # And the rows of each setting are kept apart in the reports.
    rows = [r for r in load_records(out / "results.jsonl") if r["method"] == "mixkv"]
    assert len({r["settings"]["redundancy"] for r in rows}) == 3


def test_rows_without_settings_are_never_reused(em, tmp_path, engine_runs, capsys):
    out = tmp_path / "out"
    run(config(out), em=em)
    lines = (out / "results.jsonl").read_text().splitlines()
    legacy = []
    for line in lines:  # as written by a mixkv before settings existed
        record = json.loads(line)
        record.pop("settings")
        legacy.append(json.dumps(record))
    (out / "results.jsonl").write_text("\n".join(legacy) + "\n")
    engine_runs.clear()
    capsys.readouterr()
    run(config(out), em=em)
    assert len(engine_runs) == SAMPLES * 2 and reported(out) == SAMPLES * COMBOS
    assert f"{len(lines)} written without settings by an older mixkv" in capsys.readouterr().err


def test_a_rebuild_reports_the_recorded_seconds_beside_its_own(em, tmp_path, engine_runs):
    """summary.json's timing: this invocation's seconds and evaluations, and the seconds recorded
    in the rows it reports, so a resume that ran nothing does not pass for a 1-second run."""
    out = tmp_path / "out"
    em.load_seconds = 1.5
    started = time.perf_counter()
    run(config(out), em=em)
    wall = time.perf_counter() - started
    first = json.loads((out / "summary.json").read_text())["timing"]
    assert first["load_seconds"] == 1.5
    assert first["prefill_seconds"] + first["eval_seconds"] < first["total_seconds"] <= wall
    rows = load_records(out / "results.jsonl")
    assert first["evaluations_run"] == SAMPLES * COMBOS
    assert first["recorded_eval_seconds"] == pytest.approx(sum(r["seconds"] for r in rows))
    assert first["recorded_eval_seconds"] == pytest.approx(first["eval_seconds"])
    assert first["recorded_prefill_seconds"] == pytest.approx(first["prefill_seconds"])
    assert first["recorded_prefill_seconds"] == pytest.approx(
        sum({r["sample_id"]: r["prefill_seconds"] for r in rows}.values()))

    engine_runs.clear()
    run(config(out), em=em)
    again = json.loads((out / "summary.json").read_text())["timing"]
    assert engine_runs == [] and again["evaluations_run"] == 0
    assert again["prefill_seconds"] == 0 and again["eval_seconds"] == 0
    for name in ("recorded_eval_seconds", "recorded_prefill_seconds"):
        assert again[name] == pytest.approx(first[name])


def test_a_row_is_reused_whatever_the_order_of_its_settings(em, tmp_path, engine_runs):
    """The key does not depend on the order the settings were written in (another version
    may build them in another order)."""
    out = tmp_path / "out"
    run(config(out), em=em)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["settings"] = dict(reversed(list(row["settings"].items())))
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine_runs.clear()
    run(config(out), em=em)
    assert engine_runs == [] and reported(out) == SAMPLES * COMBOS


def test_the_message_names_what_differs_and_only_that():
    """A row of a method that ignores --redundancy is not said to differ by its (null) profile,
    but its other settings are named; rows written with two values name both."""
    run_now = dict(model="m", dtype="bfloat16", window=8, redundancy="p1")

    def row(method, sample_id="s0", **settings):
        return dict(settings=dict(run_now, method=method, sample_id=sample_id, prompt="x",
                                  budget=24, ratio=None, **settings))

    wanted = {"k": dict(run_now, sample_id="s0", prompt="x")}
    message = runner.describe_other_rows([row("snapkv", redundancy=None)], run_now, wanted)
    assert "redundancy" not in message and "other samples, methods or budgets" in message
    message = runner.describe_other_rows([row("snapkv", redundancy=None, dtype="float32")],
                                         run_now, wanted)
    assert 'dtype "float32" (this run: "bfloat16")' in message and "redundancy" not in message
    message = runner.describe_other_rows([row("mixkv", redundancy=None),
                                          row("mixkv", redundancy="p0", window=4)],
                                         run_now, wanted)
    assert 'redundancy "p0" / null (this run: "p1")' in message
    assert "window 4 (this run: 8)" in message and message.startswith(
        "mixkv.eval: 2 row(s) of results.jsonl")


def test_a_changed_reconstruction_setup_reruns_only_its_methods(em, tmp_path, engine_runs,
                                                                 capsys, monkeypatch):
    """kvzip's rows carry its scorer's setup (prompts, chunks, kept prefix, softmax): a changed
    default (here the overlap of later chunks' prompts) reruns kvzip, never snapkv."""
    from mixkv.methods import KVzip

    out = tmp_path / "out"
    methods = ["snapkv", "kvzip"]
    run(config(out, methods=methods), em=em)
    rows = load_records(out / "results.jsonl")
    setups = {r["method"]: r["settings"].get("reconstruction") for r in rows}
    assert setups["snapkv"] is None and "overlap=8" in setups["kvzip"]
    engine_runs.clear()
    # overlap is a keyword-only field of the KVzip dataclass
    monkeypatch.setattr(KVzip.__init__, "__kwdefaults__",
                        dict(KVzip.__init__.__kwdefaults__, overlap=4))
    capsys.readouterr()
    run(config(out, methods=methods), em=em)
    assert engine_runs == ["kvzip"] * SAMPLES
    assert reported(out) == SAMPLES * COMBOS
    assert "reconstruction" in capsys.readouterr().err
