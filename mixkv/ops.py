"""Typed wrappers of ``torch.ops.mixkv``: the same arguments and results, documented.

Shapes: B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0; query head q belongs to KV head
q // (Hq // Hkv)), N prompt length, W observation window (1 <= W <= N), D head dim,
C = N - W candidates (positions 0 .. C-1; the window, positions C .. N-1, is always kept).
K/V/Q may be float32, float16 or bfloat16; scores are float32; arithmetic accumulates in float32
or wider. ``key_mask`` is an optional [B, N] bool/int tensor, true for real tokens: padded
tokens never enter a statistic and are kept only when a row has fewer real candidates than the
capacity (they then come first, so left-padded input stays left padded). Errors name the op and
the argument. ``mixkv.reference`` holds the float32 spec of each op.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .constants import DEFAULT_WINDOW

_ops = torch.ops.mixkv


def window_importance(q_window: Tensor, keys: Tensor, key_mask: Optional[Tensor] = None,
                      pool_kernel: int = 5, pooling: str = "avg", gqa_reduce: str = "mean",
                      scaling: Optional[float] = None) -> Tensor:
    """Importance A of each candidate: [B, Hkv, C] float32.

    ``q_window`` [B, Hq, W, D] are the last W queries (post-RoPE), ``keys`` [B, Hkv, N, D]. Window
    query i sits at position C + i and sees keys 0 .. C + i; logits are scaled by ``scaling``
    (default 1/sqrt(D)) and softmaxed over all real keys in float32; the candidate columns are
    averaged over the real window queries, reduced over each KV head's query heads
    (``gqa_reduce`` "mean" or "max") and pooled over positions (stride 1, odd ``pool_kernel``,
    padding k//2; "avg" counts the zero padding as F.avg_pool1d does, "max" ignores it).
    """
    return _ops.window_importance(q_window, keys, key_mask, pool_kernel, pooling, gqa_reduce,
                                  scaling)


def value_norm(values: Tensor, window: int, key_mask: Optional[Tensor] = None) -> Tensor:
    """L2 norm of each candidate's value vector: [B, Hkv, C] float32 (0 at padding)."""
    return _ops.value_norm(values, window, key_mask)


def key_diversity(keys: Tensor, window: int,
                  key_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(diversity [B, Hkv, C], redundancy [B, Hkv]), float32.

    With unit keys k^_j = K_j / max(|K_j|, 1e-12) and m their mean over all real tokens (window
    included): diversity_j = -(k^_j . m) for candidates; redundancy = (n |m|^2 - 1) / (n - 1),
    the mean pairwise cosine similarity of the head's n real keys, clipped to [0, 1] (0 if n < 2).
    """
    return _ops.key_diversity(keys, window, key_mask)


def mix_scores(importance: Tensor, value_norm: Optional[Tensor] = None,
               diversity: Optional[Tensor] = None, redundancy: Optional[Tensor] = None,
               mode: str = "mixkv", key_mask: Optional[Tensor] = None) -> Tensor:
    """Final score S per candidate: [B, Hkv, C] float32 (0 at padding).

    Value norm and diversity are min-max normalised over each head's real candidates and
    rescaled to the mean of ``importance`` (V~, D~; zero when constant). Modes: "attn" S = A,
    "keydiff" S = D~, "vnorm" S = A + V~, "mix3" S = (A + V~ + D~)/3, "mixkv"
    S = r D~ + (1 - r)(A + V~) with ``redundancy`` r [B, Hkv]. ``key_mask`` is [B, N] (N >= C); its
    first C columns mark the real candidates.
    """
    return _ops.mix_scores(importance, value_norm, diversity, redundancy, mode, key_mask)


def head_budgets(importance: Tensor, capacity: int, policy: str = "adaptive",
                 floor_alpha: float = 0.2, normalize: bool = True,
                 key_mask: Optional[Tensor] = None, layer: int = 0, num_layers: int = 1,
                 pyramid_beta: int = 20, profile: Optional[Tensor] = None) -> Tensor:
    """Per-head capacities [B, Hkv] int32 for one layer; ``capacity`` = budget - window.

    Each row sums to Hkv * min(c, r) with r the row's real candidates (c is ``capacity``, or the
    layer's pyramid capacity) and no head exceeds r. Policies: "uniform" (SnapKV), "pyramid"
    (PyramidKV: linear over ``num_layers`` from 2c - c//beta down to c//beta, exact total),
    "adaptive" (AdaKV: each head's count in the layer's global top-(Hkv*c) of A, optionally
    ``normalize``d by its top-c mass share, floored by ``floor_alpha`` * c), "explicit"
    (``profile`` [num_layers, Hkv] non-negative weights; row ``layer`` splits the layer's total).
    """
    return _ops.head_budgets(importance, capacity, policy, floor_alpha, normalize, key_mask,
                             layer, num_layers, pyramid_beta, profile)


def select_kv(scores: Tensor, keys: Tensor, values: Tensor, capacity: Union[int, Tensor],
              window: int, key_mask: Optional[Tensor] = None):
    """Keep each head's best candidates plus the window.

    Per head the k = min(capacity, C) candidates with the largest score (ties: lower position
    wins) in ascending position order, then the W window positions. Non-finite scores at real
    candidates are an error.

    - ``capacity`` int: dense ``(keys, values [B, Hkv, k+W, D], indices [B, Hkv, k+W] int32)``.
    - ``capacity`` [B, Hkv] int32 tensor: ragged ``(keys [T, D], values [T, D], indices [T] int32,
      offsets [B*Hkv + 1] int32)``; head (b, h) owns rows offsets[b*Hkv+h] .. offsets[b*Hkv+h+1].
    """
    if isinstance(capacity, Tensor):
        return _ops.select_kv_ragged(scores, keys, values, capacity, window, key_mask)
    return _ops.select_kv(scores, keys, values, capacity, window, key_mask)


def compress(q_window: Tensor, keys: Tensor, values: Tensor, key_mask: Optional[Tensor] = None,
             *, budget: int, window: int = DEFAULT_WINDOW, mode: str = "mixkv",
             redundancy: Optional[Tensor] = None, pool_kernel: int = 5, pooling: str = "avg",
             gqa_reduce: str = "mean", scaling: Optional[float] = None,
             policy: str = "uniform", floor_alpha: float = 0.2, normalize: bool = True,
             layer: int = 0, num_layers: int = 1, pyramid_beta: int = 20,
             profile: Optional[Tensor] = None):
    """One layer from window queries and full K/V to the kept K/V, in one call.

    ``budget`` counts the window (capacity c = budget - window > 0); N <= budget keeps everything.
    ``redundancy`` [B, Hkv] or [Hkv] replaces the online redundancy of mode "mixkv" (an offline
    profile row). ``policy`` "uniform" returns the dense triple of :func:`select_kv`; any other
    policy ("pyramid", "adaptive", "explicit", see :func:`head_budgets`) the ragged quadruple.
    """
    if redundancy is not None and redundancy.dim() == 1:
        redundancy = redundancy.expand(keys.shape[0], -1)
    if policy == "uniform":
        return _ops.compress(q_window, keys, values, key_mask, budget, window, mode, redundancy,
                             pool_kernel, pooling, gqa_reduce, scaling)
    return _ops.compress_ragged(q_window, keys, values, key_mask, budget, window, mode,
                                redundancy, pool_kernel, pooling, gqa_reduce, scaling, policy,
                                floor_alpha, normalize, layer, num_layers, pyramid_beta, profile)


def ragged_attention(query: Tensor, keys: Tensor, values: Tensor, starts: Tensor, lengths: Tensor,
                     valid: Optional[Tensor] = None, scaling: Optional[float] = None) -> Tensor:
    """Attention of the newest tokens over a head-wise (ragged) KV cache: [B, q, Hq, D].

    KV head h of batch row b owns rows ``starts[b, h]`` .. ``starts[b, h] + lengths[b, h]`` of
    ``keys``/``values`` [S, D] (``starts``, ``lengths`` [B, Hkv] int32; spare rows may follow a
    segment). ``query`` [B, Hq, q, D] holds the queries of each segment's last q tokens (already
    in the cache); query head j reads KV head j // (Hq // Hkv). Query i sees the segment's tokens
    t < lengths - q + i + 1 whose ``valid`` [S] bool entry is true (padding slots are false); a
    query that sees none gets zeros. Logits are scaled by ``scaling`` (default 1/sqrt(D));
    softmax and accumulation are float32; the output, in query's dtype, has transformers'
    attention-output layout. Segments must lie inside the buffer and hold at least q tokens: an
    error on CPU, NaN outputs on CUDA (checking there would need a device sync).
    """
    return _ops.ragged_attention(query, keys, values, starts, lengths, valid, scaling)
