"""The report files of a fixed set of records, byte for byte: table.md, results.csv and
summary.json (less its machine block) of one regime, and the side-by-side table.md and
summary.json of both, against files written by main's code before the report prose moved
from the runner into :mod:`mixkv.eval.report` (tests/data/report_golden/). A change of a
title, a paragraph, a number's format or a CSV column shows here.

To accept an intended change: ``MIXKV_WRITE_GOLDEN=1 pytest tests/eval/test_eval_report_golden.py``
and review the diff of tests/data/report_golden/."""

import json
import math
import os
import random
import types
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from mixkv.eval import engine, report  # noqa: E402
from mixkv.eval.runner import RunConfig, write_reports, write_side_by_side  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "report_golden"
METHODS = ("snapkv", "mixkv", "adakv", "mixkv+adakv")
COMBOS = [("full", None, None)] + [(m, b, None) for m in METHODS for b in (64, 128)] + \
    [(m, None, 0.5) for m in METHODS]
LAYERS = dict(layers=6, compressed=[2, 5], sliding_window=[0, 1, 3, 4])


def row(rng, task, sample_id, method, budget, ratio, length, mode, *, document=None):
    """One record with every field the HF engine and the runner write."""
    full = method == "full"
    kl = 0.0 if full else rng.random() * (0.6 if method.startswith("mixkv") else 1.0)
    scored = task != "corpus"
    record = dict(
        output=" 12345." if scored else "", output_tokens=rng.randrange(1, 9),
        decoding=rng.choice(["eos", "answered", "teacher-forced", "max_new_tokens"]),
        score=(1.0 if full else float(rng.random() < 0.6)) if scored else math.nan,
        target_greedy=rng.random() < 0.5, nll=1.0 + kl, nll_full=1.0, delta_nll=kl,
        top1_agree=1.0 - kl / 2, kl=kl, sample_id=sample_id, task=task, method=method,
        budget=budget, ratio=ratio, mode=mode, window=8, prompt_tokens=length,
        context_tokens=length - 20, kv_ratio=1.0 if full else rng.random(),
        compress_seconds=rng.random(), seconds=rng.random(),
        answers=["12345", "678"] if scored else [],
        metric="contains_all" if scored else "none",
        depth=round(rng.random(), 3) if scored else None, model="tiny", haystack="task",
        prefill_seconds=rng.random(), seed=0, length=length,
        settings=dict(model="tiny", mode=mode, sample_id=sample_id, method=method,
                      budget=budget, ratio=ratio))
    if document is not None:
        record["document"] = document
    return record


def records(mode):
    rng = random.Random(28)
    rows = []
    for length in (256, 512):
        for task in ("niah_single", "niah_multikey"):
            for sample in range(3):
                for method, budget, ratio in COMBOS:
                    rows.append(row(rng, task, f"{task}-{length}-{sample}", method, budget,
                                    ratio, length, mode))
        for document in ("a", "b"):
            for method, budget, ratio in COMBOS:
                rows.append(row(rng, "corpus", f"corpus-{document}-{length}-0", method,
                                budget, ratio, length, mode, document=f"{document}.txt"))
    return rows


def config(out, mode):
    return RunConfig(model="tiny", tasks=["niah_single", "niah_multikey"], lengths=[256, 512],
                     samples=3, methods=list(METHODS), budgets=[64, 128], ratios=[0.5],
                     window=8, mode=mode, corpus="docs", out=str(out), progress=False,
                     quiet=True)


def write_all(out: Path, monkeypatch):
    """Both regimes' reports and the side-by-side one, as a run with a model whose layers 0,
    1, 3 and 4 use sliding-window attention writes them."""
    monkeypatch.setattr(report, "DPI", 20)
    monkeypatch.setattr(engine, "layers_left_alone", lambda model: LAYERS)
    em = types.SimpleNamespace(name="tiny", source="tiny.gguf", fixes=["a fix"],
                               stop_ids=[2], adds_bos=True, chat=True, model=None)
    summaries = {mode: write_reports(records(mode), out / mode, config=config(out / mode, mode),
                                     em=em, timing=dict(total_seconds=1.5))
                 for mode in ("agnostic", "aware")}
    write_side_by_side(summaries, out, config=config(out, "both"), em=em)


def comparable(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.name.endswith("summary.json"):   # the machine and the output folder differ
        payload = json.loads(text)
        payload.pop("machine", None)
        payload["config"].pop("out", None)
        return json.dumps(payload, indent=1)
    return text


FILES = ["table.md", "summary.json"] + [f"{mode}/{name}" for mode in ("agnostic", "aware")
                                        for name in ("table.md", "results.csv", "summary.json")]


def test_report_files_match_the_golden_ones(tmp_path, monkeypatch):
    write_all(tmp_path, monkeypatch)
    for name in FILES:
        got = comparable(tmp_path / name)
        golden = GOLDEN / name.replace("/", "-")
        if os.environ.get("MIXKV_WRITE_GOLDEN"):
            golden.write_text(got, encoding="utf-8")
        assert got == comparable(golden), name
    assert (tmp_path / "plot.png").stat().st_size > 0
    assert (tmp_path / "agnostic" / "heatmap.png").stat().st_size > 0
