"""Scores: task accuracy (RULER string match, LongBench metrics), fidelity to the full cache
(teacher-forced next-token distributions), and bootstrap intervals.

Task metrics take the generated text and the expected answers and return a float in [0, 1]:

- ``contains_all`` (RULER ``string_match_all``): the share of the expected answers that occur in
  the output, case-insensitive; 1.0 or 0.0 for a single answer.
- ``contains_any`` (RULER ``string_match_part``): 1.0 if any expected answer occurs.
- ``exact``: normalised output equals an answer (LongBench normalisation).
- ``qa_f1``: LongBench's token F1 after normalisation, best over the answers.
- ``rouge_l``: ROUGE-L F1 (longest common subsequence of words), best over the answers.
- ``classification``, ``retrieval``, ``count``, ``code_sim``: LongBench's (``code_sim`` uses
  difflib's ratio where LongBench uses fuzzywuzzy's).

Fidelity (:func:`fidelity`) compares two sets of logits over the same teacher-forced answer
tokens: the compressed cache's against the full cache's.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

METRICS = ("contains_all", "contains_any", "exact", "qa_f1", "rouge_l", "classification",
           "retrieval", "count", "code_sim", "none")


def normalize_answer(text: str) -> str:
    """LongBench/SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains_all(prediction: str, answers: Sequence[str]) -> float:
    if not answers:
        return 0.0
    low = prediction.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def contains_any(prediction: str, answers: Sequence[str]) -> float:
    low = prediction.lower()
    return float(any(a.lower() in low for a in answers))


def exact(prediction: str, answers: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def _f1(prediction_tokens: List[str], truth_tokens: List[str]) -> float:
    common = Counter(prediction_tokens) & Counter(truth_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    p = normalize_answer(prediction).split()
    return max((_f1(p, normalize_answer(a).split()) for a in answers), default=0.0)


def _lcs(a: List[str], b: List[str]) -> int:
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    p = prediction.lower().split()
    best = 0.0
    for answer in answers:
        t = answer.lower().split()
        lcs = _lcs(p, t)
        if lcs:
            precision, recall = lcs / len(p), lcs / len(t)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def classification(prediction: str, answers: Sequence[str], all_classes=None) -> float:
    classes = list(all_classes or [])
    best = 0.0
    for truth in answers:
        matches = [c for c in classes if c in prediction]
        matches = [c for c in matches if not (c in truth and c != truth)]
        if truth in matches:
            best = max(best, 1.0 / len(matches))
    return best


def retrieval(prediction: str, answers: Sequence[str]) -> float:
    best = 0.0
    for truth in answers:
        found = re.findall(r"Paragraph (\d+)", truth)
        if not found:
            continue
        numbers = re.findall(r"\d+", prediction)
        if numbers:
            best = max(best, sum(n == found[0] for n in numbers) / len(numbers))
    return best


def count(prediction: str, answers: Sequence[str]) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return max(sum(n == str(truth) for n in numbers) / len(numbers) for truth in answers)


def code_sim(prediction: str, answers: Sequence[str]) -> float:
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return max((difflib.SequenceMatcher(None, line, a).ratio() for a in answers), default=0.0)


def score(metric: str, prediction: str, answers: Sequence[str],
          meta: Optional[Dict] = None) -> float:
    """The task score of ``prediction`` under ``metric`` (one of :data:`METRICS`)."""
    if metric == "none":      # fidelity-only samples (natural text): no task score
        return math.nan
    if metric == "classification":
        return classification(prediction, answers, (meta or {}).get("all_classes"))
    table = {"contains_all": contains_all, "contains_any": contains_any, "exact": exact,
             "qa_f1": qa_f1, "rouge_l": rouge_l, "retrieval": retrieval, "count": count,
             "code_sim": code_sim}
    if metric not in table:
        raise ValueError(f"mixkv.eval: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return float(table[metric](prediction, answers))


# ---------------------------------------------------------------------------------------------
def fidelity(full_logits: torch.Tensor, logits: torch.Tensor,
             target: torch.Tensor) -> Dict[str, float]:
    """Compare next-token distributions over ``k`` teacher-forced answer tokens.

    ``full_logits`` and ``logits`` are [k, V] (the full cache's and the compressed cache's
    predictions for the k target tokens), ``target`` [k] the gold token ids. Returns the mean
    per-token NLL of the target under each, their difference, the share of positions whose
    top-1 tokens agree, and the mean KL(full || compressed) in nats."""
    full_lp = F.log_softmax(full_logits.double(), dim=-1)
    lp = F.log_softmax(logits.double(), dim=-1)
    target = target.to(lp.device).long()
    nll_full = -full_lp.gather(-1, target[:, None]).mean().item()
    nll = -lp.gather(-1, target[:, None]).mean().item()
    kl = (full_lp.exp() * (full_lp - lp)).sum(-1).clamp_min(0).mean().item()
    agree = (full_lp.argmax(-1) == lp.argmax(-1)).double().mean().item()
    return dict(nll=nll, nll_full=nll_full, delta_nll=nll - nll_full, top1_agree=agree, kl=kl)


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (seeded)."""
    values = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not values:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / len(values)
    if len(values) == 1:
        return (mean, mean, mean)
    n = len(values)
    generator = torch.Generator().manual_seed(seed)
    data = torch.tensor(values, dtype=torch.float64)
    means = data[torch.randint(0, n, (n_boot, n), generator=generator)].mean(1).sort().values
    low = means[int(math.floor(alpha / 2 * (n_boot - 1)))].item()
    high = means[int(math.ceil((1 - alpha / 2) * (n_boot - 1)))].item()
    return (mean, low, high)
