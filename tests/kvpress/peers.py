"""Helpers of the kvpress peer-agreement tests: run a press or the mixkv shim on one prefill and
read back which positions each (batch row, KV head) of each layer kept.

Kept positions are recovered by matching every kept key row against the full prefill's key
rows exactly (bit for bit): both kvpress and the shim gather rows of the cache without
arithmetic, and compression happens after each layer's attention, so the full prefill's keys
are the keys each layer compressed. A kept row that matches no position, or more than one,
fails the test."""

from __future__ import annotations

import functools

import torch
from transformers import DynamicCache

from kvpress.utils import compute_n_kept

WINDOW = 32
TINY = ("llama", "qwen2")


@functools.lru_cache(maxsize=None)
def tiny_model(name: str):
    """A tiny random Llama or Qwen2 (tests/hf_models.py, seed 0, sdpa), built once."""
    import hf_models

    return getattr(hf_models, name)(attn="sdpa", seed=0)[0]


def ratio_for(length: int, budget: int) -> float:
    """The kvpress compression_ratio under which a prompt of ``length`` keeps exactly ``budget``
    tokens per head (kvpress keeps ``int(length * (1 - ratio))``)."""
    ratio = 1.0 - (budget + 0.5) / length
    assert compute_n_kept(length, ratio) == budget, (length, budget, ratio)
    return ratio


def prefill(model, input_ids, press=None, patch=None):
    """Keys [B, Hkv, kept, D] of every layer after one prefill of ``input_ids``, under a kvpress
    ``press`` or a ``mixkv.patch`` method (dict of patch options) or neither (the full cache)."""
    import mixkv

    cache = DynamicCache()
    handle = mixkv.patch(model, **patch) if patch is not None else None
    try:
        with torch.no_grad():
            if press is not None:
                with press(model):
                    model(input_ids=input_ids, past_key_values=cache, use_cache=True)
            else:
                model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    finally:
        if handle is not None:
            handle.unpatch()
    return [layer.keys.clone() for layer in cache.layers], \
        [layer.values.clone() for layer in cache.layers]


def kept_positions(full_keys: torch.Tensor, kept_keys: torch.Tensor):
    """[[sorted kept positions of head h] for h] for each batch row: exact row matching (each
    row's bytes are looked up among the full prefill's rows of that head)."""
    B, H, N, _ = full_keys.shape
    full = full_keys.detach().cpu().contiguous().numpy()
    kept = kept_keys.detach().cpu().contiguous().numpy()
    out = []
    for b in range(B):
        rows = []
        for h in range(H):
            where = {full[b, h, j].tobytes(): j for j in range(N)}
            assert len(where) == N, f"row {b} head {h}: the full keys repeat a row"
            found = [where.get(row.tobytes()) for row in kept[b, h]]
            assert None not in found, f"row {b} head {h}: a kept key matches no position"
            assert len(set(found)) == len(found), f"row {b} head {h}: a position kept twice"
            rows.append(sorted(found))
        out.append(rows)
    return out


def all_kept(full, kept):
    """kept_positions of every layer: [layer][b][h] -> sorted positions."""
    return [kept_positions(f, k) for f, k in zip(full, kept)]


def op_kept(q_window, keys, values, budget, window=WINDOW, mode="mixkv", **options):
    """Positions torch.ops.mixkv.compress keeps: [b][h] -> sorted positions."""
    _, _, pos = torch.ops.mixkv.compress(q_window, keys, values, None, budget, window, mode,
                                         options.get("redundancy"), options.get("pool_kernel", 5),
                                         options.get("pooling", "avg"),
                                         options.get("gqa_reduce", "mean"),
                                         options.get("scaling"))
    return [[sorted(pos[b, h].tolist()) for h in range(pos.shape[1])]
            for b in range(pos.shape[0])]


def describe_difference(layer, ours, theirs):
    """A readable assertion message: which layers/heads differ and how."""
    lines = []
    for b, (row_a, row_b) in enumerate(zip(ours, theirs)):
        for h, (a, c) in enumerate(zip(row_a, row_b)):
            if a != c:
                lines.append(f"layer {layer} row {b} head {h}: only mixkv {sorted(set(a) - set(c))}"
                             f", only kvpress {sorted(set(c) - set(a))}")
    return "\n".join(lines)


def record_scores(press):
    """Make ``press`` (a kvpress ScorerPress instance) record the scores its score() returns:
    returns the dict {layer_idx: scores [B, H, N]} it fills. The press behaves as before."""
    recorded = {}
    score = press.score

    def recording(module, hidden_states, keys, values, attentions, kwargs):
        scores = score(module, hidden_states, keys, values, attentions, kwargs)
        recorded[module.layer_idx] = scores.detach().clone()
        return scores

    press.score = recording
    return recorded


def top_by_score(scores: torch.Tensor, k: int):
    """[b][h] -> sorted positions of the k best scores, higher score first and, among equal
    scores, the lower position (mixkv's rule; torch.topk leaves the order of ties open)."""
    order = torch.sort(-scores.float(), dim=-1, stable=True).indices[..., :k]
    return [[sorted(order[b, h].tolist()) for h in range(scores.shape[1])]
            for b in range(scores.shape[0])]


def differ_only_in_ties(kept, expected, scores: torch.Tensor, rel: float = 0.0,
                        relative_to: str = "value") -> int:
    """Check that two kept sets of each head differ only by tokens whose ``scores`` tie, and
    return how many heads differ.

    ``rel`` 0: exactly equal scores, so both sets are a valid top-k of ``scores`` (torch.topk
    leaves the order of ties open). ``rel`` > 0, for a kept set that another implementation
    chose from its own scores, which round differently and may order a near-tie either way:
    the swapped tokens' scores lie within ``rel`` of each other, relative to the largest of
    them (``relative_to="value"``: sums of positive terms, whose rounding scales with the
    value, as SnapKV's attention) or to the head's range of finite scores (``"range"``:
    scores with a subtraction in them, as KeyDiff's cosines)."""
    assert relative_to in ("value", "range"), relative_to
    differing = 0
    for b, (row_a, row_b) in enumerate(zip(kept, expected)):
        for h, (a, c) in enumerate(zip(row_a, row_b)):
            if a == c:
                continue
            differing += 1
            s = scores[b, h]
            only_a, only_c = sorted(set(a) - set(c)), sorted(set(c) - set(a))
            where = f"row {b} head {h}: only in one {only_a}, only in the other {only_c}"
            if rel == 0:
                assert sorted(s[a].tolist()) == sorted(s[c].tolist()), (
                    f"{where}: the kept scores differ beyond exact ties")
                continue
            swapped = s[only_a + only_c].double()
            finite = s[torch.isfinite(s)].double()
            base = swapped.abs().max() if relative_to == "value" else finite.max() - finite.min()
            spread = float(swapped.max() - swapped.min())
            assert len(only_a) == len(only_c) and bool(torch.isfinite(swapped).all()) and \
                spread <= rel * float(base), (
                    f"{where}: scores {swapped.tolist()} differ by {spread:.3g}, beyond a near "
                    f"tie ({rel} of the {'largest' if relative_to == 'value' else 'range'})")
    return differing


def global_top(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """[L, H, N] bool: the ``kept`` best of ``scores`` [L, H, N] over every layer, head and
    position at once, higher score first and, among equal scores, the lower (layer, head,
    position) (mixkv's global policy's rule; torch.topk leaves the order of ties open)."""
    flat = scores.reshape(-1).float()
    order = torch.sort(flat, descending=True, stable=True).indices[:kept]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(0, order, True).view(scores.shape)


def global_differ_only_in_ties(kept: torch.Tensor, expected: torch.Tensor,
                               scores: torch.Tensor, rel: float = 0.0) -> int:
    """Two kept sets [L, H, N] bool of one global top-k (as many kept) differ only by tokens
    whose ``scores`` tie: exactly (``rel`` 0: both are a valid top-k of the scores) or within
    ``rel`` of the largest of them (another implementation's rounding). Returns how many
    tokens each keeps that the other does not."""
    only_a, only_b = kept & ~expected, expected & ~kept
    count = int(only_a.sum())
    assert count == int(only_b.sum()), "the two keep different numbers of tokens"
    if count == 0:
        return 0
    swapped = torch.cat([scores[only_a], scores[only_b]]).double()
    where = [tuple(i) for i in only_a.nonzero().tolist()][:5]
    assert bool(torch.isfinite(swapped).all()), f"non-finite swapped scores at {where}"
    spread = float(swapped.max() - swapped.min())
    if rel == 0:
        assert spread == 0, f"kept sets differ beyond exact ties (at {where}: {swapped.tolist()})"
    else:
        assert spread <= rel * float(swapped.abs().max()), (
            f"kept sets differ beyond a near tie at {where}: scores {swapped.tolist()} differ by "
            f"{spread:.3g} (> {rel} of the largest)")
    return count
