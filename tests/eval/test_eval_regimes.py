"""`--mode both`: each regime runs into its own folder (resumable on its own) and the two are
reported side by side: one table whose cells are each regime's own numbers, a plot per regime."""

import json
import re

import pytest

pytest.importorskip("transformers")

from mixkv.eval import report  # noqa: E402
from mixkv.eval.__main__ import parser  # noqa: E402
from mixkv.eval.engine import Engine  # noqa: E402
from mixkv.eval.runner import RunConfig, load_records, run  # noqa: E402

from test_eval_engine import W, tiny_eval_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "no_plots")  # drawn in test_eval_report_files


def _config(out, **changes):
    base = dict(tasks=["niah_single"], lengths=[160], samples=2, methods=["snapkv", "mixkv"],
                budgets=[24, 48], window=W, out=str(out), progress=False, quiet=True,
                mode="both")
    return RunConfig(**{**base, **changes})


def _cells(table: str, label: str):
    """The cells of the row `label` of the first markdown table in `table`."""
    for line in table.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"no row {label!r} in\n{table}")


def test_both_regimes_run_apart_and_are_reported_side_by_side(tmp_path, monkeypatch):
    modes = []
    original = Engine.prefill

    def recording(self, prepared):
        modes.append(self.mode)
        return original(self, prepared)

    monkeypatch.setattr(Engine, "prefill", recording)
    plots = []
    monkeypatch.setattr(report, "plot_regimes",
                        lambda *args, **kwargs: plots.append((args, kwargs)))
    em = tiny_eval_model()
    summary = run(_config(tmp_path), em=em)
    assert modes == ["agnostic"] * 2 + ["aware"] * 2
    for mode in ("agnostic", "aware"):
        records = load_records(tmp_path / mode / "results.jsonl")
        assert len(records) == 2 * (1 + 2 * 2) and {r["mode"] for r in records} == {mode}
        assert (tmp_path / mode / "table.md").exists()
    table = (tmp_path / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method |"))
    assert header == "| method | agnostic 24 | agnostic 48 | aware 24 | aware 48 | n |"
    # every cell is the regime's own summary row
    for method, label in (("snapkv", "snapkv"), ("mixkv", "mixkv"), ("full", "full cache")):
        cells = _cells(table, label)
        want = []
        for mode in ("agnostic", "aware"):
            rows = {r["budget"]: r for r in summary["regimes"][mode]["rows"]
                    if r["task"] == "all" and r["method"] == method}
            for budget in ("24", "48"):
                r = rows["full" if method == "full" else budget]
                want.append(f"{r['score']:.2f} [{r['low']:.2f}, {r['high']:.2f}]")
        assert cells[:4] == want and cells[4] == "2"
    assert table.startswith(f"**Task score, all tasks, both regimes** (tiny-llama | niah_single "
                            f"| length 160 | window {W}; agnostic: the context is compressed "
                            "before the question is appended; aware: the question is part of "
                            "the compressed prompt)\n")
    for mode in ("agnostic", "aware"):
        paired = table.split(f"**Paired difference against the base method, {mode}**")[1]
        assert paired.split("\n\n")[1].splitlines()[2].startswith("| mixkv - snapkv | 24 | 2 |")
    assert "## Regime agnostic" in table and "## Regime aware" in table
    assert plots == [((summary["regimes"], str(tmp_path / "plot.png")),
                      dict(title=f"tiny-llama | niah_single | length 160 | window {W}"))]
    payload = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(payload["regimes"]) == ["agnostic", "aware"]

    # rerun: each folder resumes, nothing is prefilled again
    modes.clear()
    run(_config(tmp_path), em=em)
    assert modes == []


def test_both_regimes_share_one_model_load_and_log_their_folders(tmp_path, monkeypatch, capsys):
    from mixkv.eval import models

    loaded = []
    monkeypatch.setattr(models, "load_model",
                        lambda name, dtype: loaded.append(name) or tiny_eval_model())
    run(_config(tmp_path, samples=1, methods=["snapkv"], budgets=[24], quiet=False))
    assert loaded == [None]
    log = capsys.readouterr().err
    for mode in ("agnostic", "aware"):
        assert f"mixkv.eval: regime {mode} -> {tmp_path / mode}\n" in log


def test_side_by_side_marks_missing_cells_and_orders_bases_before_mixes():
    def row(method, budget, score):
        return dict(task="all", method=method, budget=budget, n=3, score=score, low=score,
                    high=score)

    summaries = {"agnostic": dict(rows=[row("full", "full", 1.0), row("mixkv", "64", 0.5),
                                        row("snapkv", "64", 0.25)]),
                 "aware": dict(rows=[row("snapkv", "64", 0.75), row("snapkv", "128", 1.0)])}
    text = report.side_by_side_markdown(summaries)
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| method | agnostic 64 | aware 64 | aware 128 | n |"
    assert [re.match(r"\| ([^|]+) \|", line).group(1) for line in lines[1:]] == \
        ["full cache", "snapkv", "mixkv"]
    assert _cells(text, "mixkv")[:3] == ["0.50 [0.50, 0.50]", "–", "–"]
    assert _cells(text, "full cache")[:3] == ["1.00 [1.00, 1.00]", "–", "–"]


def test_cli_accepts_both():
    assert parser().parse_args(["--mode", "both"]).mode == "both"
    with pytest.raises(SystemExit):
        parser().parse_args(["--mode", "either"])


def test_both_report_kinds_describe_the_run_alike():
    """The regime report and the side-by-side one share one title: data files by name, the
    corpus, the decode budget; the regime's title names its mode."""
    from mixkv.eval.runner import run_title

    config = RunConfig(tasks=["passkey"], data=["/data/qasper.jsonl"], corpus="/text/books",
                       lengths=[1024, 2048], decode_budget=64, interval=16, window=8)
    want = ("tiny-llama | {}passkey, qasper.jsonl, corpus books, decode budget 64 every 16 "
            "tokens | length 1024/2048 | window 8")
    assert run_title(config, tiny_eval_model()) == want.format("")
    assert run_title(config, tiny_eval_model(), mode="aware") == want.format("mode aware | ")
    config = RunConfig(model="/models/m.gguf", tasks=["passkey"], decode_budget=64)
    assert run_title(config) == ("/models/m.gguf | passkey, decode budget 64 every default "
                                 "tokens | length 1024 | window 32")
