"""Natural-text fidelity (--corpus) and the needle-depth x budget heatmap, on the tiny random
Llama with a character tokenizer (no files): documents are cut at word boundaries within the
token counts, prompts are the raw text, rows carry fidelity but no task score, and the reports
give them their own tables."""

import json
import math

import pytest

pytest.importorskip("transformers")

from mixkv.eval import report  # noqa: E402
from mixkv.eval.engine import Engine  # noqa: E402
from mixkv.eval.runner import RunConfig, run  # noqa: E402
from mixkv.eval.tasks import BUILTIN_CORPUS, corpus_files, corpus_samples  # noqa: E402

from helpers import document  # noqa: E402
from hf_models import tiny_eval_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

def test_documents_are_cut_at_words_within_the_counts(tmp_path):
    (tmp_path / "a.txt").write_text(document(300))
    (tmp_path / "short.txt").write_text(document(20))
    count = len  # one token per character
    samples = corpus_samples(str(tmp_path), length=400, count_tokens=count, bos=1,
                             continuation=64)
    assert [s.id for s in samples] == ["corpus-a-400"]      # the short one has no room
    s = samples[0]
    text = (tmp_path / "a.txt").read_text().strip()
    assert text.startswith(s.context + s.target)
    assert 1 + len(s.context) <= 400 and len(s.context) > 400 - 20   # BOS counted
    assert len(s.target) <= 64 and s.target[0].isspace() and not s.target[1].isspace()
    assert s.metric == "none" and s.meta["raw"] and s.question == "" and s.max_new_tokens == 1
    assert math.isnan(__import__("mixkv.eval.metrics", fromlist=["score"]).score("none", "x", []))


def test_passages_are_consecutive_and_never_overlap(tmp_path):
    (tmp_path / "a.txt").write_text(document(300))          # ~1,500 characters
    text = (tmp_path / "a.txt").read_text().strip()
    samples = corpus_samples(str(tmp_path), length=300, count_tokens=len, bos=1,
                             continuation=100, passages=9)
    assert [s.id for s in samples] == ["corpus-a-300", "corpus-a-300-2", "corpus-a-300-3",
                                       "corpus-a-300-4"]    # 4 x ~400 fit, a fifth does not
    assert [s.meta["passage"] for s in samples] == [1, 2, 3, 4]
    rebuilt = ""
    for s in samples:
        assert 1 + len(s.context) <= 300 and len(s.context) > 300 - 20
        assert len(s.target) <= 100 and not s.context[0].isspace()
        rebuilt += (" " if rebuilt else "") + s.context + s.target
        assert " ".join(text.split()).startswith(" ".join(rebuilt.split()))
    assert len(" ".join(rebuilt.split())) > len(" ".join(text.split())) - 400
    first_two = corpus_samples(str(tmp_path), length=300, count_tokens=len, bos=1,
                               continuation=100, passages=2)
    assert first_two == samples[:2]


def test_builtin_corpus_is_shipped():
    files = corpus_files(None)
    assert files == corpus_files("builtin") and len(files) >= 4
    assert all(f.parent == BUILTIN_CORPUS for f in files)
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert len(text.split()) > 1500 and not any(c.isdigit() for c in text[:200])
    with pytest.raises(ValueError, match="no .txt"):
        corpus_files(str(BUILTIN_CORPUS / "missing"))


def test_engine_on_a_corpus_sample_uses_the_raw_text(tmp_path):
    em = tiny_eval_model()
    (tmp_path / "doc.txt").write_text(document(200))
    sample = corpus_samples(str(tmp_path), length=300, count_tokens=len, continuation=40)[0]
    engine = Engine(em, window=8)
    prepared = engine.prepare(sample)
    assert prepared.prefill_ids == em.encode(sample.context, first=True)
    assert prepared.question_ids == [] and prepared.target_ids == em.encode(sample.target)
    prefilled = engine.prefill(prepared)
    full = engine.run(prefilled, "full")
    assert full["kl"] == pytest.approx(0.0, abs=1e-9) and math.isnan(full["score"])
    small = engine.run(prefilled, "snapkv", budget=32)
    assert small["kl"] > 0 and small["kv_ratio"] < 0.2 and math.isnan(small["score"])


def test_runner_corpus_rows_get_their_own_tables(tmp_path):
    em = tiny_eval_model()
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(document(150, seed=i))
    config = RunConfig(tasks=["passkey"], lengths=[256], samples=2, methods=["snapkv", "mixkv"],
                       budgets=[32], corpus=str(docs), continuation=24, window=8,
                       out=str(tmp_path / "out"), progress=False, quiet=True)
    summary = run(config, em=em)
    corpus_rows = [r for r in summary["rows"] if r["task"] == "corpus"]
    assert {r["n"] for r in corpus_rows} == {6}              # 2 passages of each document
    assert all(r["kl_low"] <= r["kl"] <= r["kl_high"] for r in corpus_rows)
    pooled = [r for r in summary["rows"] if r["task"] == "all"]
    assert {r["n"] for r in pooled} == {2}                  # the passkey samples only
    table = (tmp_path / "out" / "table.md").read_text()
    assert ("6 passage(s) of 3 document(s), each prefix compressed and the next 24 tokens "
            "teacher-forced") in table
    assert "| mixkv - snapkv | 32 | 6 |" in table           # paired KL on the passages
    assert [r["n"] for r in summary["paired"]] == [2]       # the score pairs: passkey only
    assert "| KL(full || compressed), nats | budget 32 | n |" in table
    assert "**corpus**" not in table                        # no task-score table for it
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["config"]["corpus"] == str(docs)
    assert (tmp_path / "out" / "heatmap.png").is_file()     # passkey has needle depths


def record(method, budget, depth, score):
    return dict(method=method, budget=budget, ratio=None, depth=depth, score=score,
                task="niah_single", sample_id=f"{depth}")


def test_depth_grid_and_heatmap(tmp_path):
    records = [record("full", None, 0.1, 1.0), record("full", None, 0.9, 1.0),
               record("snapkv", 64, 0.1, 1.0), record("snapkv", 64, 0.15, 0.0),
               record("snapkv", 64, 0.9, 0.0), record("snapkv", 128, 1.0, 1.0),
               dict(record("snapkv", 64, None, 1.0), task="corpus")]
    grid = report.depth_grid(records, bins=5)
    assert grid["methods"] == ["full", "snapkv"] and grid["budgets"] == ["64", "128"]
    cells = grid["cells"]["snapkv"]
    assert cells[0] == [(0.5, 2), None] and cells[4] == [(0.0, 1), (1.0, 1)]
    assert cells[1] == [None, None] and grid["cells"]["full"][4] == [(1.0, 1)]
    path = tmp_path / "heat.png"
    assert report.heatmap(records, str(path), title="t") and path.stat().st_size > 1000
    assert not report.heatmap([records[-1]], str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_corpus_only_run_has_no_task_score_tables(tmp_path):
    em = tiny_eval_model()
    (tmp_path / "d.txt").write_text(document(150))
    config = RunConfig(tasks=[], lengths=[256], methods=["snapkv", "mixkv"], budgets=[32],
                       corpus=str(tmp_path), continuation=24, window=8,
                       out=str(tmp_path / "out"), progress=False, quiet=True)
    summary = run(config, em=em)
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.startswith("**Natural-text fidelity**") and "Task score" not in table
    assert summary["paired"] == [] and len(summary["paired_fidelity"]) == 1
    assert not (tmp_path / "out" / "plot.png").exists()
    assert not (tmp_path / "out" / "heatmap.png").exists()
