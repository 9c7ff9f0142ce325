"""Metrics on hand-computed cases: string match, LongBench scores, fidelity, bootstrap."""

import math

import pytest
import torch

from mixkv.eval import metrics
from mixkv.eval.report import base_of, markdown, paired, summarize


def test_string_match():
    assert metrics.contains_all("The key is 123 and 456", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert metrics.contains_all("ABC", ["abc"]) == 1.0
    assert metrics.contains_any("nothing", ["a1", "b2"]) == 0.0
    assert metrics.contains_any("x b2 y", ["a1", "b2"]) == 1.0
    assert metrics.score("contains_all", " 98231.", ["98231"]) == 1.0


def test_longbench_metrics():
    assert metrics.normalize_answer("The  Cat, sat!") == "cat sat"
    # precision 2/3 (cat, sat of "the cat sat" -> "cat sat"... ) computed by hand:
    # pred "cat sat" (2 tokens), truth "cat sat down" (3 tokens): P=1, R=2/3, F1=0.8
    assert metrics.qa_f1("The cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert metrics.qa_f1("dog", ["cat", "dog"]) == 1.0
    assert metrics.qa_f1("", ["cat"]) == 0.0
    assert metrics.exact("  The Paris.", ["paris"]) == 1.0
    # LCS("the cat sat on mat", "the cat is on the mat") = the cat on mat = 4; P=4/5, R=4/6
    assert metrics.rouge_l("the cat sat on mat", ["the cat is on the mat"]) == \
        pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert metrics.classification("It is a yes", ["yes"], ["yes", "no"]) == 1.0
    assert metrics.classification("yes or no", ["yes"], ["yes", "no"]) == 0.5
    assert metrics.retrieval("Paragraph 3, maybe 4", ["Paragraph 3"]) == 0.5
    assert metrics.count("There are 7 (or 7) paragraphs, not 8", ["7"]) == pytest.approx(2 / 3)
    assert metrics.code_sim("# comment\nx = 1\n", ["x = 1"]) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.score("bleu", "a", ["a"])


def test_fidelity_hand_case():
    # two positions, vocabulary of 2: full p = (0.5, 0.5) then (0.9, 0.1); compressed q = (0.9,
    # 0.1) then (0.9, 0.1). Targets: token 0 then token 1.
    full = torch.tensor([[0.0, 0.0], [math.log(9), 0.0]])
    comp = torch.tensor([[math.log(9), 0.0], [math.log(9), 0.0]])
    out = metrics.fidelity(full, comp, torch.tensor([0, 1]))
    kl0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert out["kl"] == pytest.approx(kl0 / 2)
    assert out["nll_full"] == pytest.approx((-math.log(0.5) - math.log(0.1)) / 2)
    assert out["nll"] == pytest.approx((-math.log(0.9) - math.log(0.1)) / 2)
    assert out["delta_nll"] == pytest.approx(out["nll"] - out["nll_full"])
    # argmax at position 0: full ties (0 wins), compressed 0 -> agree; position 1 agree.
    assert out["top1_agree"] == 1.0
    same = metrics.fidelity(full, full, torch.tensor([1, 0]))
    assert same["kl"] == 0.0 and same["delta_nll"] == 0.0 and same["top1_agree"] == 1.0
    flipped = metrics.fidelity(full[1:], torch.tensor([[0.0, 5.0]]), torch.tensor([0]))
    assert flipped["top1_agree"] == 0.0 and flipped["kl"] > 0


def test_bootstrap():
    assert metrics.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    mean, low, high = metrics.bootstrap_ci([0, 1] * 20)
    assert mean == 0.5 and 0.3 < low < 0.5 < high < 0.7
    assert metrics.bootstrap_ci([0, 1] * 20, seed=3) == metrics.bootstrap_ci([0, 1] * 20, seed=3)
    assert all(math.isnan(x) for x in metrics.bootstrap_ci([]))
    assert metrics.bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)


def test_summary_table_and_paired_differences():
    records = []
    for i in range(6):
        sample = f"s{i}"
        records.append(dict(sample_id=sample, task="t", method="full", budget=None, ratio=None,
                            score=1.0, kl=0.0, top1_agree=1.0, delta_nll=0.0, kv_ratio=1.0))
        for method, score in (("snapkv", float(i < 2)), ("mixkv", float(i < 4))):
            records.append(dict(sample_id=sample, task="t", method=method, budget=64,
                                ratio=None, score=score, kl=0.5 if method == "snapkv" else 0.2,
                                top1_agree=0.5, delta_nll=0.1, kv_ratio=0.25))
    summary = summarize(records)
    cell = {(r["task"], r["method"], r["budget"]): r for r in summary["rows"]}
    assert cell[("all", "mixkv", "64")]["score"] == pytest.approx(4 / 6)
    assert cell[("t", "snapkv", "64")]["n"] == 6 and cell[("all", "full", "full")]["score"] == 1
    (pair,) = paired(records)
    assert pair["method"] == "mixkv" and pair["base"] == "snapkv"
    assert pair["diff"] == pytest.approx(2 / 6) and (pair["wins"], pair["losses"]) == (2, 0)
    assert pair["kl_diff"] == pytest.approx(-0.3)
    table = markdown(summary)
    assert "| mixkv | 0.67 [" in table and "| full cache | 1.00 [1.00, 1.00] | 6 |" in table
    assert base_of("mixkv+adakv") == "adakv" and base_of("mixkv") == "snapkv"
    assert base_of("adakv") is None and base_of("full") is None
