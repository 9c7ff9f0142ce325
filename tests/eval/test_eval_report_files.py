"""The files a run writes, from records alone (no model, so these run in a second): table.md's
sections and titles, summary.json, results.csv, the PNGs (and a stale heatmap removed), the
side-by-side report of `--mode both`, and the progress messages. The model-driven tests
(test_eval_engine.py, test_eval_regimes.py) check the numbers; these check what a reader sees."""

import csv
import json
import os
import platform

import pytest
import torch

pytest.importorskip("transformers")

from mixkv.eval import report, runner  # noqa: E402
from mixkv.eval.runner import RunConfig, write_reports, write_side_by_side  # noqa: E402

TASKS = ("niah_single", "niah_multikey")


def needle(task, sample, method, budget, score, depth=0.5):
    kl = 0.0 if method == "full" else 0.1 * (1 + sample) * (2 if method == "snapkv" else 1)
    return dict(task=task, sample_id=f"{task}-{sample}", method=method, budget=budget,
                ratio=None, score=score, kl=kl, top1_agree=1.0 - kl, delta_nll=kl,
                depth=depth, kv_ratio=1.0 if budget is None else 0.25, metric="contains_all")


def passage(document, number, method, budget, kl):
    return dict(task="corpus", sample_id=f"corpus-{document}-256-{number}", method=method,
                budget=budget, ratio=None, score=float("nan"), kl=kl, top1_agree=1.0 - kl,
                delta_nll=kl, depth=None, kv_ratio=0.5, metric="none",
                document=f"{document}.txt")


def records(methods=("snapkv", "mixkv"), corpus=True):
    rows = []
    for task in TASKS:
        for sample in range(3):
            rows.append(needle(task, sample, "full", None, 1.0, depth=0.2 * sample))
            for method in methods:
                rows.append(needle(task, sample, method, 64, float(method == "mixkv"),
                                   depth=0.2 * sample))
    if corpus:
        for document in ("a", "b"):
            for number in (1, 2):
                rows.append(passage(document, number, "full", None, 0.0))
                for method in methods:
                    rows.append(passage(document, number, method, 64,
                                        0.5 if method == "snapkv" else 0.25))
    return rows


def config(tmp_path, **changes):
    base = dict(model="tiny", tasks=list(TASKS), lengths=[256], samples=3,
                methods=["snapkv", "mixkv"], budgets=[64], window=8, corpus="docs",
                out=str(tmp_path), progress=False, quiet=True)
    return RunConfig(**{**base, **changes})


def sections(text):
    """The bold titles that open the report's sections, in order."""
    return [line.split("**")[1] for line in text.splitlines() if line.startswith("**")]


def test_table_has_every_section_in_order_with_its_title(tmp_path):
    summary = write_reports(records(), tmp_path, config=config(tmp_path), em=None,
                            timing=dict(total_seconds=1.5))
    text = (tmp_path / "table.md").read_text()
    assert summary["markdown"] == text
    title = "tiny | mode agnostic | niah_single, niah_multikey, corpus docs | length 256 | window 8"
    assert text.startswith(f"**Task score, all tasks** ({title})\n")
    assert sections(text) == [
        "Task score, all tasks", "niah_multikey", "niah_single",
        "Paired difference against the base method (same samples)",
        "Mean KL(full || compressed) over the answer tokens (nats)",
        "Top-1 agreement with the full cache over the answer tokens",
        "Natural-text fidelity", "Natural text: paired KL difference against the base method"]
    assert (f"**Natural-text fidelity** ({title}: 4 passage(s) of 2 document(s), each prefix "
            "compressed and the next 128 tokens teacher-forced; mean over tokens, then "
            "passages, [95% CI])") in text
    assert "| mixkv - snapkv | 64 | 6 |" in text           # the needle pairs
    assert "| mixkv - snapkv | 64 | 4 |" in text           # the passage pairs
    assert "(no method/base pairs)" not in text and "Layers left uncompressed" not in text


def test_each_table_holds_its_own_numbers_and_the_runs_seed(tmp_path):
    """A per-task table shows that task's scores, each fidelity table its own metric, and the
    intervals (pooled and per length) are the bootstrap of the run's --seed."""
    rows = []
    for length in (256, 512):
        for row in records(corpus=False):
            if row["method"] == "mixkv" and row["task"] == "niah_multikey":
                row["score"] = float(row["sample_id"].endswith("0"))
            rows.append(dict(row, length=length, sample_id=f"{row['sample_id']}-{length}",
                             delta_nll=0.1 + 0.0137 * len(rows)))  # distinct: seeds differ
    summary = write_reports(rows, tmp_path, config=config(tmp_path, lengths=[256, 512],
                                                          corpus=None, seed=11))
    text = (tmp_path / "table.md").read_text()

    def section(title):
        return text.split(f"**{title}")[1].split("\n**")[0]

    assert "| mixkv | 1.00 [1.00, 1.00] | 6 |" in section("niah_single**")
    assert "| mixkv | 0.33 [" in section("niah_multikey**")
    kl, top1 = section("Mean KL"), section("Top-1 agreement")
    assert "| snapkv | 0.400 |" in kl and "| mixkv | 0.200 |" in kl
    assert "| snapkv | 0.600 |" in top1 and "| mixkv | 0.800 |" in top1

    def intervals(part):     # every row's intervals, the fidelity ones included (NaN-safe)
        return json.dumps(part["rows"])

    by_seed = {seed: report.summarize(rows, seed=seed) for seed in (0, 11)}
    assert intervals(summary) == intervals(by_seed[11]) != intervals(by_seed[0])
    by_seed = {seed: report.summarize_by_length(rows, seed=seed)[512] for seed in (0, 11)}
    assert intervals(summary["by_length"][512]) == intervals(by_seed[11]) != \
        intervals(by_seed[0])
    # One task: its table would repeat the pooled one, so there is none.
    write_reports([r for r in rows if r["task"] == "niah_single"], tmp_path,
                  config=config(tmp_path, tasks=["niah_single"], corpus=None))
    assert "niah_single" not in sections((tmp_path / "table.md").read_text())


def test_a_loaded_model_names_the_report_and_its_layers_left_alone(tmp_path, monkeypatch):
    """With the model at hand (``em``): its name opens every title, the plots' included, the
    sliding-window layers it leaves uncompressed are said, and summary.json describes it."""
    from types import SimpleNamespace

    from mixkv.eval import engine

    em = SimpleNamespace(name="tiny-gemma", source="/models/tiny.gguf", fixes=["a fix"],
                         stop_ids=[1, 2], adds_bos=True, chat=False, model="the model")
    layers = dict(layers=6, compressed=[2, 5], sliding_window=[0, 1, 3, 4])
    monkeypatch.setattr(engine, "layers_left_alone",
                        lambda model: layers if model == "the model" else None)
    titles = {}
    monkeypatch.setattr(report, "plot",
                        lambda summary, path, *, title: titles.setdefault("plot", title))
    monkeypatch.setattr(report, "heatmap",
                        lambda rows, path, *, title: titles.setdefault("heatmap", title))
    write_reports(records(corpus=False), tmp_path, config=config(tmp_path, corpus=None), em=em)
    text = (tmp_path / "table.md").read_text()
    title = "tiny-gemma | mode agnostic | niah_single, niah_multikey | length 256 | window 8"
    assert text.startswith(f"**Task score, all tasks** ({title})\n")
    assert titles == dict(plot=title, heatmap=f"Score by needle depth and budget ({title})")
    assert text.endswith(
        "\nLayers left uncompressed: 4 of 6 use sliding-window attention (0-1, 3-4) and keep "
        "their window cache; the methods compress the 2 global layers (2, 5). KV ratios count "
        "the compressed layers only.\n")
    saved = json.loads((tmp_path / "summary.json").read_text())["model"]
    assert saved == dict(name="tiny-gemma", source="/models/tiny.gguf", fixes=["a fix"],
                         stop_ids=[1, 2], adds_bos=True, chat=False, layers=layers)


def test_decode_budget_and_missing_pairs_are_said(tmp_path):
    cfg = config(tmp_path, methods=["snapkv"], corpus=None, decode_budget=96, interval=16)
    write_reports(records(methods=("snapkv",), corpus=False), tmp_path, config=cfg)
    text = (tmp_path / "table.md").read_text()
    assert ("(tiny | mode agnostic | niah_single, niah_multikey, decode budget 96 every 16 "
            "tokens | length 256 | window 8)") in text
    assert "**Paired difference against the base method (same samples)**\n\n" \
           "(no method/base pairs)\n" in text
    assert "Natural-text fidelity" not in text
    write_reports([r for r in two_lengths() if r["method"] != "mixkv"], tmp_path,
                  config=config(tmp_path, lengths=[256, 512], corpus=None))
    assert "**Paired difference against the base method, 512-token prompts**\n\n" \
           "(no method/base pairs)\n" in (tmp_path / "table.md").read_text()
    write_reports([], tmp_path, config=config(tmp_path, interval=None, decode_budget=64))
    assert (tmp_path / "table.md").read_text().startswith(
        "**Task score, all tasks** (tiny | mode agnostic | niah_single, niah_multikey, corpus "
        "docs, decode budget 64 every default tokens | length 256 | window 8)\n\n(no results)\n")


def test_summary_csv_and_pictures(tmp_path):
    rows = records()
    cfg = config(tmp_path, out=tmp_path)       # an API caller's Path is saved as its text
    write_reports(rows, tmp_path, config=cfg, em=None, timing=dict(total_seconds=2.0))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"] == json.loads(json.dumps(cfg.__dict__, default=str))
    assert saved["config"]["out"] == str(tmp_path)
    assert saved["records"] == len(rows) and saved["timing"] == dict(total_seconds=2.0)
    assert saved["model"] is None
    assert saved["machine"] == dict(platform=platform.platform(), torch=torch.__version__,
                                    threads=torch.get_num_threads(), cpus=os.cpu_count())
    assert {(r["task"], r["method"]) for r in saved["summary"]["rows"]} >= \
        {("all", "full"), ("all", "snapkv"), ("all", "mixkv"), ("corpus", "mixkv")}
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    # Rows without needle depths (a corpus-only rerun into the same folder): the earlier
    # heatmap would describe other results, so it goes; no task score, so no score plot.
    (tmp_path / "plot.png").unlink()
    corpus_only = [r for r in rows if r["task"] == "corpus"]
    write_reports(corpus_only, tmp_path, config=config(tmp_path, tasks=[]), em=None)
    assert not (tmp_path / "heatmap.png").exists() and not (tmp_path / "plot.png").exists()
    assert sections((tmp_path / "table.md").read_text())[0] == "Natural-text fidelity"


def test_side_by_side_report(tmp_path):
    cfg = config(tmp_path, mode="both", corpus=None)
    summaries = {}
    for mode, methods in (("agnostic", ("snapkv", "mixkv")), ("aware", ("snapkv",))):
        folder = tmp_path / mode
        folder.mkdir()
        summaries[mode] = write_reports(records(methods=methods, corpus=False), folder,
                                        config=config(folder, mode=mode, corpus=None))
    result = write_side_by_side(summaries, tmp_path, config=cfg)
    text = (tmp_path / "table.md").read_text()
    assert result["markdown"] == text and result["regimes"] is summaries
    assert text.startswith(
        "**Task score, all tasks, both regimes** (tiny | niah_single, niah_multikey | length "
        "256 | window 8; agnostic: the context is compressed before the question is appended; "
        "aware: the question is part of the compressed prompt)\n")
    assert "| method | agnostic 64 | aware 64 | n |" in text
    agnostic_pairs = text.index("**Paired difference against the base method, agnostic**")
    aware_pairs = text.index("**Paired difference against the base method, aware**\n\n"
                             "(no method/base pairs)\n")
    agnostic = text.index("## Regime agnostic (folder `agnostic/`)\n\n" +
                          summaries["agnostic"]["markdown"])
    aware = text.index("## Regime aware (folder `aware/`)\n\n" + summaries["aware"]["markdown"])
    assert agnostic_pairs < aware_pairs < agnostic < aware
    assert "| mixkv - snapkv | 64 | 6 |" in text[agnostic_pairs:aware_pairs]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["mode"] == "both"
    assert {mode: (entry["folder"], len(entry["rows"]), len(entry["paired"]))
            for mode, entry in saved["regimes"].items()} == \
        {mode: (mode, len(summaries[mode]["rows"]), len(summaries[mode]["paired"]))
         for mode in ("agnostic", "aware")}
    assert (tmp_path / "plot.png").stat().st_size > 0


def two_lengths():
    """Records at 256 and 512 tokens: MixKV finds every needle at 256 and none at 512."""
    rows = []
    for length in (256, 512):
        for row in records(corpus=False):
            if row["method"] == "mixkv":
                row["score"] = float(length == 256)
            rows.append(dict(row, length=length, sample_id=f"{row['sample_id']}-{length}"))
    return rows


def test_several_lengths_get_their_own_tables(tmp_path):
    rows = two_lengths()
    summary = write_reports(rows, tmp_path, config=config(tmp_path, lengths=[256, 512],
                                                            corpus=None))
    text = (tmp_path / "table.md").read_text()
    assert sections(text) == [
        "Task score, all tasks", "niah_multikey", "niah_single",
        "Paired difference against the base method (same samples)",
        "Task score, all tasks, 256-token prompts",
        "Paired difference against the base method, 256-token prompts",
        "Task score, all tasks, 512-token prompts",
        "Paired difference against the base method, 512-token prompts",
        "Mean KL(full || compressed) over the answer tokens (nats)",
        "Top-1 agreement with the full cache over the answer tokens"]
    pooled, short, long = (text.index(title) for title in (
        "**Task score, all tasks**", "256-token prompts**", "512-token prompts**"))
    assert "| mixkv | 0.50 [" in text[pooled:short]                   # 12 rows, half found
    assert "| mixkv | 1.00 [1.00, 1.00] | 6 |" in text[short:long]
    assert "| mixkv | 0.00 [0.00, 0.00] | 6 |" in text[long:]
    assert "| mixkv - snapkv | 64 | 6 | +1.000" in text[short:long]
    assert "| mixkv - snapkv | 64 | 6 | +0.000" in text[long:]
    two_rows = png_height(tmp_path / "plot.png")      # one row of panels per length
    saved = json.loads((tmp_path / "summary.json").read_text())["summary"]["by_length"]
    assert sorted(saved) == ["256", "512"] and saved["256"]["rows"] == \
        summary["by_length"][256]["rows"]
    # Both regimes: each length's side-by-side table follows the pooled one.
    summaries = {}
    for mode in ("agnostic", "aware"):
        (tmp_path / mode).mkdir()
        summaries[mode] = write_reports(rows, tmp_path / mode, config=config(
            tmp_path / mode, mode=mode, lengths=[256, 512], corpus=None))
    text = write_side_by_side(summaries, tmp_path, config=config(
        tmp_path, mode="both", lengths=[256, 512], corpus=None))["markdown"]
    assert sections(text)[:5] == [
        "Task score, all tasks, both regimes", "Paired difference against the base method, "
        "agnostic", "Paired difference against the base method, aware",
        "Task score, all tasks, both regimes, 256-token prompts",
        "Task score, all tasks, both regimes, 512-token prompts"]
    assert "| mixkv | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] | 6 |" in text
    side_by_side_rows = png_height(tmp_path / "plot.png")
    regimes = json.loads((tmp_path / "summary.json").read_text())["regimes"]
    assert {mode: sorted(regime["by_length"]) for mode, regime in regimes.items()} == \
        {"agnostic": ["256", "512"], "aware": ["256", "512"]}
    # Natural text only (no task, so no per-length summaries): both regimes still report.
    texts = [r for r in records() if r["metric"] == "none"]
    natural = {mode: write_reports(texts, tmp_path / "text" / mode, config=config(
        tmp_path, mode=mode, tasks=[])) for mode in ("agnostic", "aware")}
    text = write_side_by_side(natural, tmp_path / "text", config=config(
        tmp_path, mode="both", tasks=[]))["markdown"]
    assert "-token prompts" not in text and "## Regime aware" in text
    regimes = json.loads((tmp_path / "text" / "summary.json").read_text())["regimes"]
    assert [regime["by_length"] for regime in regimes.values()] == [{}, {}]
    # One length: no per-length sections (the pooled tables are that length's).
    write_reports([r for r in rows if r["length"] == 512], tmp_path,
                  config=config(tmp_path, lengths=[512], corpus=None))
    assert "-token prompts" not in (tmp_path / "table.md").read_text()
    assert two_rows > 1.6 * png_height(tmp_path / "plot.png")
    for mode in ("agnostic", "aware"):
        summaries[mode] = write_reports([r for r in rows if r["length"] == 512], tmp_path / mode,
                                        config=config(tmp_path / mode, mode=mode, corpus=None))
    write_side_by_side(summaries, tmp_path, config=config(tmp_path, mode="both", corpus=None))
    assert side_by_side_rows > 1.6 * png_height(tmp_path / "plot.png")


def png_height(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path)).shape[0]


def test_progress_messages_go_to_stderr_unless_quiet(tmp_path, capsys):
    runner._log(config(tmp_path, quiet=False), "mixkv.eval:", "loading", 3)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "mixkv.eval: loading 3\n")
    runner._log(config(tmp_path), "mixkv.eval: loading")
    assert capsys.readouterr() == ("", "")
