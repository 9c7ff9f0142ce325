"""Pure-PyTorch float32 reference of every mixkv op: the executable spec and the test oracle.

Each function mirrors the op of the same name in ``torch.ops.mixkv`` (same arguments, same
outputs, scores in float32) and is written for clarity, not speed. docs/design.md section 4
("The algorithm") is the prose version of this file.

Shapes: B batch, Hq query heads, Hkv KV heads (G = Hq // Hkv), N prompt length, W window,
D head dim, C = N - W candidates (positions 0 .. C-1; the last W positions are always kept).
``key_mask`` is [B, N], true for real tokens; padded tokens never enter a statistic and are
only ever kept when a row has fewer real candidates than the capacity (they then come first,
so a left-padded batch stays left padded).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

EPS = 1e-12
MODES = ("attn", "keydiff", "vnorm", "mix3", "mixkv")
POLICIES = ("uniform", "pyramid", "adaptive", "explicit")


def _real_tokens(key_mask: Optional[torch.Tensor], B: int, N: int, device) -> torch.Tensor:
    if key_mask is None:
        return torch.ones(B, N, dtype=torch.bool, device=device)
    return key_mask.to(torch.bool)


def window_importance(q_window, keys, key_mask=None, pool_kernel=5, pooling="avg",
                      gqa_reduce="mean", scaling=None):
    """Attention from the window queries to each candidate, pooled: [B, Hkv, C] float32."""
    B, Hq, W, D = q_window.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    G, C = Hq // Hkv, N - W
    scale = 1.0 / math.sqrt(D) if scaling is None else scaling
    real = _real_tokens(key_mask, B, N, keys.device)

    k = keys.float().repeat_interleave(G, dim=1)                      # [B, Hq, N, D]
    logits = (q_window.float() @ k.transpose(-1, -2)) * scale           # [B, Hq, W, N]
    key_pos = torch.arange(N, device=keys.device)
    query_pos = torch.arange(C, N, device=keys.device)
    visible = (key_pos[None, :] <= query_pos[:, None])[None, None] & real[:, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # A padded window query (row shorter than W) sees nothing and contributes nothing.
    query_real = real[:, C:]                                             # [B, W]
    probs = torch.where(query_real[:, None, :, None], probs, torch.zeros_like(probs))
    n_queries = query_real.sum(-1).clamp(min=1).float()                 # [B]
    per_query_head = probs[..., :C].sum(dim=2) / n_queries[:, None, None]   # [B, Hq, C]

    grouped = per_query_head.view(B, Hkv, G, C)
    scores = grouped.mean(dim=2) if gqa_reduce == "mean" else grouped.amax(dim=2)
    if C == 0:
        return scores
    cand_real = real[:, :C]
    flat = scores.reshape(B * Hkv, 1, C)
    pad = pool_kernel // 2
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, pool_kernel, stride=1, padding=pad, count_include_pad=True)
    else:
        flat = flat.masked_fill(~cand_real.repeat_interleave(Hkv, 0)[:, None, :], float("-inf"))
        pooled = F.max_pool1d(flat, pool_kernel, stride=1, padding=pad)
    pooled = pooled.view(B, Hkv, C)
    return torch.where(cand_real[:, None, :], pooled, torch.zeros_like(pooled))


def value_norm(values, window, key_mask=None):
    """L2 norm of each candidate's value vector: [B, Hkv, C] float32 (0 at padding)."""
    B, _, N, _ = values.shape
    C = N - window
    norms = values[:, :, :C].float().norm(dim=-1)
    cand_real = _real_tokens(key_mask, B, N, values.device)[:, :C]
    return torch.where(cand_real[:, None, :], norms, torch.zeros_like(norms))


def key_diversity(keys, window, key_mask=None):
    """(diversity [B, Hkv, C], redundancy [B, Hkv]) from unit keys and their mean direction."""
    B, _, N, _ = keys.shape
    C = N - window
    real = _real_tokens(key_mask, B, N, keys.device)
    k = keys.float()
    unit = k / k.norm(dim=-1, keepdim=True).clamp(min=EPS)
    weights = real[:, None, :, None].float()
    n = real.sum(-1).float()                                             # [B]
    mean_dir = (unit * weights).sum(dim=2) / n.clamp(min=1)[:, None, None]   # [B, Hkv, D]
    diversity = -(unit[:, :, :C] @ mean_dir[..., None]).squeeze(-1)
    diversity = torch.where(real[:, None, :C], diversity, torch.zeros_like(diversity))
    n_ = n[:, None]
    redundancy = (n_ * (mean_dir * mean_dir).sum(-1) - 1) / (n_ - 1).clamp(min=1)
    redundancy = torch.where(n_ >= 2, redundancy.clamp(0.0, 1.0), torch.zeros_like(redundancy))
    return diversity, redundancy


def _normalise_like(x, importance, cand_real):
    """Min-max to [0, 1] over real candidates, then rescale so its mean equals mean(importance)."""
    if x.shape[-1] == 0:
        return x
    m = cand_real[:, None, :].expand_as(x)
    big = torch.finfo(torch.float32).max
    lo = torch.where(m, x, torch.full_like(x, big)).amin(-1, keepdim=True)
    hi = torch.where(m, x, torch.full_like(x, -big)).amax(-1, keepdim=True)
    spread = hi - lo
    unit = torch.where(spread > 0, (x - lo) / torch.where(spread > 0, spread, 1), 0.0)
    unit = torch.where(m, unit, torch.zeros_like(unit))
    count = m.sum(-1, keepdim=True).clamp(min=1).float()
    mean_unit = unit.sum(-1, keepdim=True) / count
    mean_imp = torch.where(m, importance, 0.0).sum(-1, keepdim=True) / count
    factor = torch.where(mean_unit > 0, mean_imp / torch.where(mean_unit > 0, mean_unit, 1), 0.0)
    return unit * factor


def mix_scores(importance, value_norm=None, diversity=None, redundancy=None, mode="mixkv",
               key_mask=None):
    """Final score S per candidate: [B, Hkv, C] float32 (0 at padding)."""
    B, Hkv, C = importance.shape
    A = importance.float()
    cand_real = (torch.ones(B, C, dtype=torch.bool, device=A.device) if key_mask is None
                 else key_mask[:, :C].to(torch.bool))
    V = _normalise_like(value_norm.float(), A, cand_real) if value_norm is not None else None
    Dv = _normalise_like(diversity.float(), A, cand_real) if diversity is not None else None
    if mode == "attn":
        S = A
    elif mode == "keydiff":
        S = Dv
    elif mode == "vnorm":
        S = A + V
    elif mode == "mix3":
        S = (A + V + Dv) / 3
    else:  # mixkv
        r = redundancy.float()[..., None]
        S = r * Dv + (1 - r) * (A + V)
    return torch.where(cand_real[:, None, :], S, torch.zeros_like(S))


def _allocate(targets, total, cap):
    """Integers near `targets` summing to `total`, each <= cap (water-filling, then largest
    remainder; ties go to the lower head)."""
    H = len(targets)
    if total >= H * cap:
        return [cap] * H
    fixed = [False] * H
    shares = list(targets)
    while True:
        free = [h for h in range(H) if not fixed[h]]
        remaining = total - cap * (H - len(free))
        weight = sum(targets[h] for h in free)
        for h in free:
            shares[h] = remaining * targets[h] / weight if weight > 0 else remaining / len(free)
        over = [h for h in free if shares[h] > cap]
        if not over:
            break
        for h in over:
            fixed[h], shares[h] = True, float(cap)
    counts = [min(cap, int(math.floor(s))) for s in shares]
    leftover = total - sum(counts)
    order = sorted(range(H), key=lambda h: (-(shares[h] - math.floor(shares[h])), h))
    while leftover > 0:
        for h in order:
            if leftover > 0 and counts[h] < cap:
                counts[h] += 1
                leftover -= 1
    return counts


def _pyramid_capacity(capacity, candidates, layer, num_layers, beta):
    if capacity >= candidates:
        return candidates
    if num_layers == 1:
        return capacity
    lo = capacity // beta
    hi = 2 * capacity - lo
    if hi > candidates:
        hi, lo = candidates, 2 * capacity - candidates
    den = 2 * (num_layers - 1)

    def cumulative(l):  # floor of the sum of the linear schedule over layers 0 .. l-1
        return (den * l * hi - (hi - lo) * l * (l - 1)) // den

    return cumulative(layer + 1) - cumulative(layer)


def head_budgets(importance, capacity, policy="adaptive", floor_alpha=0.2, normalize=True,
                 key_mask=None, layer=0, num_layers=1, pyramid_beta=20, profile=None):
    """Per-head capacities [B, Hkv] int32. Each row sums to Hkv * min(c_layer, real candidates)."""
    B, Hkv, C = importance.shape
    A = importance.float()
    cand_real = (torch.ones(B, C, dtype=torch.bool, device=A.device) if key_mask is None
                 else key_mask[:, :C].to(torch.bool))
    out = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        real_idx = cand_real[b].nonzero().flatten()
        r = len(real_idx)
        k = min(capacity, r)
        if policy == "uniform":
            caps = [k] * Hkv
        elif policy == "pyramid":
            caps = [_pyramid_capacity(capacity, r, layer, num_layers, pyramid_beta)] * Hkv
        elif policy == "explicit":
            weights = [float(w) for w in profile[layer].double()]
            if sum(weights) <= 0:
                weights = [1.0] * Hkv
            caps = _allocate(weights, Hkv * k, r)
        else:  # adaptive
            scores = A[b][:, real_idx].double()                          # [Hkv, r]
            if normalize and k > 0:
                top = scores.topk(k, dim=-1).values.sum(-1, keepdim=True)
                mass = scores.sum(-1, keepdim=True)
                scores = scores * torch.where(mass > 0, top / torch.where(mass > 0, mass, 1), 0)
            # global top-(Hkv*k); a stable sort lets the lower (head, position) win ties
            chosen = torch.sort(-scores.flatten(), stable=True).indices[: Hkv * k]
            n = torch.bincount(chosen // max(r, 1), minlength=Hkv).tolist()
            targets = [floor_alpha * k + (1.0 - floor_alpha) * n[h] for h in range(Hkv)]
            caps = _allocate(targets, Hkv * k, r)
        out[b] = torch.tensor(caps, dtype=torch.int32)
    return out.to(importance.device)


def _kept_indices(scores, capacities, window, key_mask, N):
    """Kept positions of every (b, h) as lists: the k best candidates in ascending position order
    (real before padded, then higher score, then lower position), then the window."""
    B, Hkv, C = scores.shape
    cand_real = (torch.ones(B, C, dtype=torch.bool) if key_mask is None
                 else key_mask[:, :C].to(torch.bool).cpu())
    # Padded candidates rank last, among themselves by position; a stable sort of the negated
    # scores lets the lower position win ties.
    ranked = torch.where(cand_real[:, None, :], -scores.float().cpu(), float("inf"))
    order = torch.sort(ranked, dim=-1, stable=True).indices
    kept = []
    for b in range(B):
        for h in range(Hkv):
            k = min(int(capacities[b][h]), C)
            chosen = order[b, h, :k].sort().values.tolist()
            kept.append(chosen + list(range(C, N)))
    return kept


def select_kv(scores, keys, values, capacity, window, key_mask=None):
    """Uniform capacity: (keys [B, Hkv, k+W, D], values, indices [B, Hkv, k+W] int32),
    k = min(capacity, C)."""
    B, Hkv, N, D = keys.shape
    kept = _kept_indices(scores, [[capacity] * Hkv] * B, window, key_mask, N)
    idx = torch.tensor(kept, dtype=torch.long, device=keys.device).view(B, Hkv, -1)
    gather = idx[..., None].expand(-1, -1, -1, D)
    return keys.gather(2, gather), values.gather(2, gather), idx.to(torch.int32)


def select_kv_ragged(scores, keys, values, capacity, window, key_mask=None):
    """Per-head capacities [B, Hkv]: segments in (b, h) order. Returns (keys [T, D], values [T, D],
    indices [T] int32, offsets [B*Hkv + 1] int32); segment (b, h) is offsets[b*Hkv+h] ..
    offsets[b*Hkv+h+1]."""
    B, Hkv, N, D = keys.shape
    kept = _kept_indices(scores, capacity.tolist(), window, key_mask, N)
    ks, vs = [], []
    for s, pos in enumerate(kept):
        b, h = divmod(s, Hkv)
        p = torch.tensor(pos, dtype=torch.long, device=keys.device)
        ks.append(keys[b, h, p])
        vs.append(values[b, h, p])
    lengths = torch.tensor([0] + [len(p) for p in kept])
    offsets = lengths.cumsum(0).to(torch.int32)
    flat_idx = torch.tensor([j for pos in kept for j in pos], dtype=torch.int32)
    return torch.cat(ks), torch.cat(vs), flat_idx.to(keys.device), offsets.to(keys.device)


def _scores(q_window, keys, values, key_mask, window, mode, redundancy, pool_kernel, pooling,
            gqa_reduce, scaling):
    A = window_importance(q_window, keys, key_mask, pool_kernel, pooling, gqa_reduce, scaling)
    V = value_norm(values, window, key_mask) if mode in ("vnorm", "mix3", "mixkv") else None
    Dv, r = (key_diversity(keys, window, key_mask) if mode in ("keydiff", "mix3", "mixkv")
             else (None, None))
    if redundancy is not None:
        r = redundancy.float().expand(keys.shape[0], keys.shape[1])
    return A, mix_scores(A, V, Dv, r, mode, key_mask)


def compress(q_window, keys, values, key_mask=None, budget=128, window=32, mode="mixkv",
             redundancy=None, pool_kernel=5, pooling="avg", gqa_reduce="mean", scaling=None):
    """Uniform budgets (the SnapKV base): kept (keys, values, indices) as from select_kv."""
    _, S = _scores(q_window, keys, values, key_mask, window, mode, redundancy, pool_kernel,
                   pooling, gqa_reduce, scaling)
    return select_kv(S, keys, values, budget - window, window, key_mask)


def compress_ragged(q_window, keys, values, key_mask=None, budget=128, window=32, mode="mixkv",
                    redundancy=None, pool_kernel=5, pooling="avg", gqa_reduce="mean", scaling=None,
                    policy="adaptive", floor_alpha=0.2, normalize=True, layer=0, num_layers=1,
                    pyramid_beta=20, profile=None):
    """Head-wise budgets: ragged (keys, values, indices, offsets) as from select_kv_ragged."""
    A, S = _scores(q_window, keys, values, key_mask, window, mode, redundancy, pool_kernel,
                   pooling, gqa_reduce, scaling)
    caps = head_budgets(A, budget - window, policy, floor_alpha, normalize, key_mask, layer,
                        num_layers, pyramid_beta, profile)
    return select_kv_ragged(S, keys, values, caps, window, key_mask)


def ragged_attention(query, keys, values, starts, lengths, valid=None, scaling=None):
    """Attention of the q newest tokens of every (row, KV head) segment: [B, q, Hq, D] in
    query's dtype. Segment (b, h) is rows starts[b, h] .. starts[b, h] + lengths[b, h] of
    keys/values [S, D]; query i sees segment tokens t < lengths[b, h] - q + i + 1 with valid[t]
    (zeros when it sees none)."""
    B, Hq, q, D = query.shape
    Hkv = starts.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scaling is None else scaling
    out = torch.zeros(B, q, Hq, D, dtype=torch.float32, device=query.device)
    for b in range(B):
        for h in range(Hkv):
            start, L = int(starts[b, h]), int(lengths[b, h])
            k, v = keys[start:start + L].float(), values[start:start + L].float()
            logits = (query[b, h * G:(h + 1) * G].float() @ k.T) * scale          # [G, q, L]
            limit = L - q + torch.arange(q, device=query.device) + 1
            visible = torch.arange(L, device=query.device)[None, :] < limit[:, None]   # [q, L]
            if valid is not None:
                visible = visible & valid[start:start + L][None, :]
            probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            probs = torch.where(visible.any(-1)[:, None], probs, torch.zeros_like(probs))
            out[b, :, h * G:(h + 1) * G] = (probs @ v).transpose(0, 1)
    return out.to(query.dtype)
