"""Peer agreement with NVIDIA kvpress: its SnapKVPress, StreamingLLMPress, KnormPress and
KeyDiffPress keep exactly the tokens (per layer, per KV head) that mixkv's snapkv,
streamingllm, knorm and keydiff keep at the same budget, on tiny random Llama and Qwen2 models
(kvpress's own forward hooks vs the mixkv shim, one prefill each).

Where the two protocols coincide the kept sets are compared as they are:
- SnapKV: kvpress ``SnapKVPress(window_size=32, kernel_size=5)`` = mixkv ``snapkv`` (window 32,
  avg pooling of kernel 5, GQA mean). Both keep the window and the top candidates by pooled
  window attention.
- StreamingLLM: ``StreamingLLMPress(n_sink=4)`` = mixkv ``streamingllm`` (sinks=4): the first 4
  tokens and the most recent ``budget - 4``.

Where they differ by design the difference is aligned, then compared exactly:
- Knorm and KeyDiff: kvpress ranks all N tokens; mixkv always keeps the last ``window`` tokens
  and ranks only the N - W candidates. Aligned: kvpress's own press with the window's scores
  raised to +inf (its score() and its ScorerPress top-k otherwise untouched). Unaligned, the
  relation that must still hold is checked too: kvpress keeps at most W window tokens, so it
  keeps at least as many candidates, and every candidate mixkv keeps, kvpress keeps.
- KeyDiff's score: kvpress ``-cos(k, mean of unit keys)``, mixkv ``-(k/|k|) . mean`` min-max
  rescaled: the same order per head (a positive factor |mean| and an increasing affine map).
- Expected attention: kvpress's ``ExpectedAttentionPress`` ranks all N tokens (its n_sink first
  ones above all); mixkv's ``expected_attention`` keeps the window and ranks the candidates, its
  ``sinks`` first real tokens above all. Aligned as Knorm (window kept), each kvpress field set
  as the mixkv option of the same meaning (EA_OPTIONS): n_sink = sinks = skip_first (kvpress
  drops its sinks from the query statistics too), n_future_positions = future_positions,
  use_covariance, use_vnorm, epsilon.

Budgets are tokens kept per head, window included; kvpress's compression_ratio is set so that
``int(N * (1 - ratio))`` is that budget (peers.ratio_for).

Ties: mixkv's kept set must equal the top ``budget`` of the kvpress press's own scores
(recorded from its score()) with equal scores going to the lower position, mixkv's rule:
exactly where both compute the same numbers (Knorm: the same ATen norm, bit for bit;
StreamingLLM: positions), and up to near ties (NEAR_TIE) where they compute them differently
(SnapKV, KeyDiff: kvpress's torch code and mixkv's kernels round differently, by up to 2.8e-7
of the value or range measured under ATEN_CPU_CAPABILITY=default/avx2/avx512, while a tiny
random model's near-uniform scores leave boundary gaps down to 2.4e-7), in one head of a
comparison at most (an eighth, where a comparison has more than eight). kvpress's torch.topk
leaves the order of equal scores open, so its own kept set may differ from that only by tokens
whose scores are exactly equal (tiny random models do produce exact ties in SnapKV's pooled
attention); any other difference fails.
"""

import functools
import math

import pytest
import torch

from kvpress import (ExpectedAttentionPress, KeyDiffPress, KnormPress, SnapKVPress,
                     StreamingLLMPress)

import hf_models
from peers import (WINDOW, all_kept, describe_difference, differ_only_in_ties, prefill,
                   ratio_for, record_scores, top_by_score)

BUILDERS = {"llama": hf_models.llama, "qwen2": hf_models.qwen2}
LENGTH = 300
SEEDS = (1, 2)
BUDGETS = (48, 100, 200)
# mixkv's and kvpress's scores of SnapKV (relative to the value) and KeyDiff (relative to the
# head's range) differ by <= 2.8e-7 here: a near tie is a gap within ~7 times that.
NEAR_TIE = 2e-6
# kvpress's ExpectedAttentionPress fields -> mixkv's expected_attention options: kvpress's
# defaults first (mixkv's defaults), then one field off its default at a time.
EA_OPTIONS = [
    ({}, {}),
    (dict(n_sink=0), dict(sinks=0, skip_first=0)),
    (dict(n_sink=2, use_vnorm=False), dict(sinks=2, skip_first=2, use_vnorm=False)),
    (dict(n_future_positions=16, use_covariance=False),
     dict(future_positions=16, use_covariance=False)),
    (dict(epsilon=0.01), dict(epsilon=0.01)),
]
EXACT = (0.0, "value")


@functools.lru_cache(maxsize=None)
def _model(name):
    model, _ = BUILDERS[name](attn="sdpa", seed=0)
    return model


@functools.lru_cache(maxsize=None)
def _prompt(seed, length=LENGTH):
    return hf_models._text_prompt(length, seed)


@functools.lru_cache(maxsize=None)
def _full(name, seed):
    return prefill(_model(name), _prompt(seed))[0]


def _window_kept(press_cls):
    """kvpress's press with mixkv's protocol: the last WINDOW tokens always kept."""

    class WindowKept(press_cls):
        def score(self, module, hidden_states, keys, values, attentions, kwargs):
            scores = super().score(module, hidden_states, keys, values, attentions, kwargs)
            scores = scores.clone()
            scores[..., -WINDOW:] = math.inf
            return scores

    WindowKept.__name__ = f"WindowKept{press_cls.__name__}"
    return WindowKept


def _compare(name, seed, budget, press, patch, tie=EXACT):
    """Kept positions [layer][b][h] of mixkv (``patch``) and of kvpress (``press``). mixkv's must
    be the top ``budget`` of the press's own scores, ties to the lower position, up to the
    near ties ``tie`` (rel, relative_to of differ_only_in_ties; EXACT: none) in one head at
    most (an eighth of the heads, if more); the press's own top-k must be the same set up to
    exactly equal scores (torch.topk's order of ties is unspecified). Returns (ours, theirs,
    heads that differ by such an exact tie)."""
    ids = _prompt(seed)
    full = _full(name, seed)
    scores = record_scores(press)
    theirs = all_kept(full, prefill(_model(name), ids, press=press)[0])
    ours = all_kept(full, prefill(_model(name), ids, patch=patch)[0])
    assert sorted(scores) == list(range(len(full)))
    ties = flips = heads = 0
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        for row in a + b:
            assert all(len(kept) == budget for kept in row), "every head keeps the budget"
        expected = top_by_score(scores[layer], budget)
        if tie == EXACT:
            assert a == expected, describe_difference(layer, a, expected)
        flips += differ_only_in_ties(a, expected, scores[layer], *tie)
        heads += sum(len(row) for row in a)
        ties += differ_only_in_ties(b, expected, scores[layer])
    assert flips <= max(1, heads // 8), f"{flips} of {heads} heads flipped a near tie: not rare"
    return ours, theirs, ties


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", BUILDERS)
def test_snapkv_keeps_the_same_tokens(name, seed, budget):
    ratio = ratio_for(LENGTH, budget)
    ours, _, _ = _compare(name, seed, budget,
                       SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=5),
                       dict(method="snapkv", budget=budget, window=WINDOW, pool_kernel=5),
                       tie=(NEAR_TIE, "value"))
    # Not a vacuous agreement: the heads of a layer disagree with each other somewhere.
    assert any(len({tuple(h) for h in layer[0]}) > 1 for layer in ours)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", BUILDERS)
def test_streamingllm_keeps_the_same_tokens(name, budget):
    ours, _, _ = _compare(name, 1, budget,
                       StreamingLLMPress(compression_ratio=ratio_for(LENGTH, budget), n_sink=4),
                       dict(method="streamingllm", budget=budget, window=WINDOW, sinks=4))
    expected = list(range(4)) + list(range(LENGTH - (budget - 4), LENGTH))
    assert all(head == expected for layer in ours for row in layer for head in row)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("kind", ["knorm", "keydiff"])
def test_window_free_presses_agree_once_the_window_is_kept(kind, name, seed, budget):
    press_cls = {"knorm": KnormPress, "keydiff": KeyDiffPress}[kind]
    ratio = ratio_for(LENGTH, budget)
    ours, _, _ = _compare(name, seed, budget, _window_kept(press_cls)(compression_ratio=ratio),
                       dict(method=kind, budget=budget, window=WINDOW),
                       tie=(NEAR_TIE, "range") if kind == "keydiff" else EXACT)
    # The by-design difference, unaligned: kvpress's plain press may drop window tokens and
    # then keeps more candidates, a superset of mixkv's.
    full = _full(name, seed)
    plain = all_kept(full, prefill(_model(name), _prompt(seed),
                                   press=press_cls(compression_ratio=ratio))[0])
    candidates = LENGTH - WINDOW
    dropped_window = 0
    for layer_ours, layer_plain in zip(ours, plain):
        for row_ours, row_plain in zip(layer_ours, layer_plain):
            for a, b in zip(row_ours, row_plain):
                assert {j for j in a if j < candidates} <= {j for j in b if j < candidates}
                dropped_window += WINDOW - sum(j >= candidates for j in b)
    if kind == "knorm":  # random keys: the window's norms are no lower than the rest
        assert dropped_window > 0, "the plain KnormPress should drop some window tokens here"


def test_differ_only_in_ties_allows_exact_or_stated_near_ties_only():
    scores = torch.tensor([[[9.0, 5.0, 3.0, 3.0, 2.999997, 1.0]]])   # 3e-6 apart: 1e-6 of 3
    kept = [[[0, 1, 2]]]
    assert differ_only_in_ties(kept, [[[0, 1, 2]]], scores) == 0
    assert differ_only_in_ties(kept, [[[0, 1, 3]]], scores) == 1          # an exact tie
    with pytest.raises(AssertionError, match="beyond exact ties"):
        differ_only_in_ties(kept, [[[0, 1, 4]]], scores)                  # near, not exact
    assert differ_only_in_ties(kept, [[[0, 1, 4]]], scores, 2e-6) == 1
    with pytest.raises(AssertionError, match="beyond a near tie"):
        differ_only_in_ties(kept, [[[0, 1, 4]]], scores, 5e-7)
    # relative to the range of finite scores (8; a +inf window score does not count)
    window = torch.cat([scores, torch.full((1, 1, 1), math.inf)], -1)
    assert differ_only_in_ties(kept, [[[0, 1, 4]]], window, 5e-7, "range") == 1
    with pytest.raises(AssertionError, match="beyond a near tie"):
        differ_only_in_ties(kept, [[[0, 1, 4]]], window, 2e-7, "range")
    with pytest.raises(AssertionError, match="beyond a near tie"):
        differ_only_in_ties(kept, [[[0, 2, 5]]], scores, 1e-3)             # 5 against 1


def _ea_cases():
    """kvpress's defaults at every seed and budget; each other option set at one of them."""
    cases = []
    for i, (theirs, ours) in enumerate(EA_OPTIONS):
        for name in BUILDERS:
            for seed in SEEDS if i == 0 else SEEDS[:1]:
                for budget in BUDGETS if i == 0 else BUDGETS[1:2]:
                    cases.append(pytest.param(theirs, ours, name, seed, budget, id="-".join(
                        [",".join(theirs) or "defaults", name, str(seed), str(budget)])))
    return cases


@pytest.mark.parametrize("theirs, ours, name, seed, budget", _ea_cases())
def test_expected_attention_keeps_the_same_tokens_once_the_window_is_kept(theirs, ours, name,
                                                                           seed, budget):
    ratio = ratio_for(LENGTH, budget)
    kept, _, _ = _compare(name, seed, budget,
                          _window_kept(ExpectedAttentionPress)(compression_ratio=ratio, **theirs),
                          dict(method="expected_attention", budget=budget, window=WINDOW, **ours),
                          tie=(NEAR_TIE, "value"))
    sinks = theirs.get("n_sink", 4)
    heads = [head for layer in kept for row in layer for head in row]
    assert all(set(range(sinks)) <= set(head) for head in heads)
    # Not a vacuous agreement: the heads keep different candidates.
    assert len({tuple(head) for head in heads}) > 1
