"""The reconstruction pass of scorers with ``needs_reconstruction`` (KVzip, ``methods/kvzip.py``).

After the prefill the model re-reads its context: a short repeat prompt, then the context
tokens again, chunk by chunk, with the prefilled cache as past. Each layer's attention call is
seen first by an interceptor (``capture.intercepting``, in front of the shim's own) which keeps,
for every cached context key, the largest softmax attention it receives from the fed queries:
prompt and re-read tokens, every query head of the key's group. The softmax is the model's own
(the module's scaling, logit soft-capping, the same keys and mask), recomputed in float32 from
the call's queries and keys, blocked so that at most ~16M logits (64 MiB) exist at a time.

``crop_chunks`` (the default): after every chunk the cache is cropped back to the context
(DynamicLayer: a slice; any other layer, e.g. sliding-window ones, is put back as it was), so
the extra KV memory is prompt + chunk tokens per layer, and every chunk starts with the
prompt at the positions right after the context. Otherwise the re-read continues across chunks
(the scores equal those of a single pass over [context, prompt, context]) and the cache is
cropped back once at the end. Either way the extra cost is one more forward pass over the
context (plus the prompt per chunk) and its attention.

Padded batches: each row re-reads its own real tokens at positions continuing its own (the
prefill's ``position_ids`` when it had them); rows whose chunk is shorter are padded on the
right and their padding never counts.

:class:`DeferredCompression` is the shim's side: the per-layer hooks hand their prefill over
instead of compressing it, and after the decoder's prefill forward it runs the pass and
compresses every layer with ``Prefill.reconstruction`` set.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer

from . import capture
from .model import attention_scaling, cache_keyword, find_attention_modules

LOGITS_PER_BLOCK = 1 << 24   # float32 logits (64 MiB) held at once by one layer call's scoring
SCORE_LOGITS_PER_HEAD = 1 << 18   # the fused pass's scoring block per KV head (1 MiB)


def _flash(query: Tensor, keys: Tensor, values: Tensor, mask: Optional[Tensor],
           causal: bool = False, scale: float = 1.0) -> Optional[Tuple[Tensor, Tensor]]:
    """(output [B, Hq, t, D], log-sum-exp [B, Hq, t]) of attention from PyTorch's fused CPU
    kernel (nothing [t, K] is written), or None where that kernel is not available.
    ``keys``/``values`` [B, Hkv, K, D], each KV head broadcast (not copied) to its query heads;
    ``mask`` additive [B|1, 1, t, K] or None; ``causal``: query i sees key j <= i (top-left).
    A query that sees no key gets output 0 and log-sum-exp 0 from the kernel: callers that
    can have such rows must mark them themselves."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or query.device.type != "cpu":
        return None
    B, Hq, t = query.shape[:3]
    Hkv, K, D = keys.shape[1:]
    G = Hq // Hkv
    try:
        parts = [op(query[:, h * G:(h + 1) * G], keys[:, h:h + 1].expand(B, G, K, D),
                    values[:, h:h + 1].expand(B, G, K, values.shape[-1]), 0.0, causal,
                    attn_mask=mask, scale=scale) for h in range(Hkv)]
    except (RuntimeError, TypeError):
        return None
    return torch.cat([o for o, _ in parts], dim=1), torch.cat([l for _, l in parts], dim=1)


def _flash_lse(query: Tensor, keys: Tensor, mask: Tensor) -> Optional[Tensor]:
    """Log-sum-exp of each query's logits [B, Hq, t] from the fused CPU kernel (``query``
    already scaled; ``mask`` additive [B|1, 1, t, K]), or None without that kernel."""
    result = _flash(query, keys, keys, mask)
    return None if result is None else result[1]


def max_attention(query: Tensor, key: Tensor, context: int, key_real: Tensor,
                  query_real: Tensor, scaling: Optional[float], softcap: Optional[float],
                  out: Tensor) -> None:
    """``out`` [B, Hkv, context] = max(out, the largest softmax attention each of the first
    `context` keys receives from a real query, over the queries and each KV head's query heads).

    ``query`` [B, Hq, T, D] are the last T positions of ``key`` [B, Hkv, K, D] (K - T >=
    context: the context keys come before every query); query i sees key j when
    ``key_real[b, j]`` and j <= K - T + i (causal); ``query_real`` [B, T].

    max_i softmax(l_i)_j = exp(max_i (l_ij - logsumexp(l_i))): each query's log-sum-exp (from
    the fused CPU attention kernel when it is there, else from the logits), then the logits of
    the context columns only, shifted, and a max over queries and the group."""
    B, Hq, T, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scaling is None else float(scaling)
    past = K - T                                # keys before the first query: seen by all
    keys = key.float()
    keys_t = keys.transpose(-1, -2)                                       # [B, Hkv, D, K]
    padded_keys = not bool(key_real.all())
    padded_queries = not bool(query_real.all())
    best = torch.full((B, Hkv, context), float("-inf"), device=key.device)
    rows = max(1, LOGITS_PER_BLOCK // max(1, B * Hq * K))
    for begin in range(0, T, rows):
        end = min(T, begin + rows)
        t = end - begin
        q = query[:, :, begin:end].float() * scale                          # [B, Hq, t, D]
        # causal among the fed tokens: query begin+i does not see fed key f > begin+i
        hidden = torch.arange(T, device=key.device)[None, :] > \
            torch.arange(begin, end, device=key.device)[:, None]              # [t, T]
        lse = None
        if not softcap:
            allowed = torch.cat([torch.ones(t, past, dtype=torch.bool, device=key.device),
                                 ~hidden], dim=1)[None, None] \
                & key_real[:, None, None, :]                                  # [B, 1, t, K]
            lse = _flash_lse(q, keys, _additive(allowed))
        if lse is not None:
            shifted = torch.matmul(q.reshape(B, Hkv, G * t, D), keys_t[..., :context])
            shifted = shifted.view(B, Hkv, G, t, context)
            if padded_keys:
                shifted.masked_fill_(~key_real[:, None, None, None, :context], float("-inf"))
            shifted.sub_(lse.view(B, Hkv, G, t, 1))
        else:
            logits = torch.matmul(q.reshape(B, Hkv, G * t, D), keys_t).view(B, Hkv, G, t, K)
            if softcap:
                logits.div_(softcap).tanh_().mul_(softcap)
            logits[..., past:].masked_fill_(hidden, float("-inf"))
            if padded_keys:
                logits.masked_fill_(~key_real[:, None, None, None, :], float("-inf"))
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            shifted = logits[..., :context].sub_(lse)
        if padded_queries:
            shifted.masked_fill_(~query_real[:, None, None, begin:end, None], float("-inf"))
        torch.maximum(best, shifted.amax(dim=(2, 3)), out=best)
    torch.maximum(out, best.exp_(), out=out)


def _columns(selected: Tensor) -> Tuple[Tensor, Tensor]:
    """Each row's selected columns of ``selected`` [B, P] in order, padded to the longest row:
    (indices [B, L], valid [B, L])."""
    count = selected.sum(1)
    width = int(count.max()) if selected.numel() else 0
    index = _real_order(selected)[:, :width]
    return index, torch.arange(width, device=selected.device)[None, :] < count[:, None]


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, P, D] at each row's token indices [B, L] -> [B, H, L, D]."""
    B, H, _, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def _additive(allowed: Tensor) -> Tensor:
    """The additive attention mask of a boolean one: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed,
                                                                          float("-inf"))


def _blocked(valid: Tensor, queries: int) -> Optional[Tensor]:
    """Additive mask [B, 1, queries, L] hiding each row's invalid columns; None if none."""
    if bool(valid.all()):
        return None
    return _additive(valid)[:, None, None, :].expand(-1, 1, queries, -1)


def attend_and_score(query: Tensor, key: Tensor, value: Tensor, context: int,
                     model_real: Tensor, score_real: Tensor, query_real: Tensor,
                     scaling: Optional[float], out: Tensor) -> Optional[Tensor]:
    """The re-read's attention call and its scores in one computation: returns the layer's
    attention output [B, T, Hq, Dv] (what the model's own attention would return, up to
    rounding) and sets ``out`` = max(out, the scores :func:`max_attention` gives); None where
    the fused CPU kernel is not available (then nothing is written).

    The T queries are the last T positions of ``key``/``value`` [B, Hkv, K, D]; the model
    attends the keys ``model_real`` [B, K] (causal among the fed ones), the scores' softmax
    the keys ``score_real`` [B, K] (a subset: the kept tokens and the chunk's span under
    ``softmax="span"``). The keys are split into three sets, each one fused attention call
    returning its output and log-sum-exp: A, the scored past keys; F, the fed keys (causal);
    O, the past keys only the model attends. The model's output is their log-sum-exp-weighted
    merge; the scores' normaliser is logaddexp(lse_A, lse_F), so the only work added to the
    model's own attention is the logits of A's context columns and their max."""
    B, Hq, T, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    G, past = Hq // Hkv, K - T
    scale = D ** -0.5 if scaling is None else float(scaling)
    q = query.float()
    keys, values = key.float(), value.float()
    fed_real = model_real[:, past:]
    index_a, valid_a = _columns(score_real[:, :past])
    index_o, valid_o = _columns(model_real[:, :past] & ~score_real[:, :past])
    keys_a = _gather_tokens(keys[:, :, :past], index_a)
    part_a = _flash(q, keys_a, _gather_tokens(values[:, :, :past], index_a),
                    _blocked(valid_a, T), scale=scale)
    if part_a is None:
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=key.device).tril_()
    sees_f = causal[None] & fed_real[:, None, :]                          # [B, T, T]
    if bool(fed_real.all()):
        part_f = _flash(q, keys[:, :, past:], values[:, :, past:], None, causal=True,
                        scale=scale)
    else:
        part_f = _flash(q, keys[:, :, past:], values[:, :, past:], _additive(sees_f)[:, None],
                        scale=scale)
    parts = [(part_a, valid_a.any(1)[:, None]), (part_f, sees_f.any(2))]
    if index_o.shape[1]:
        part_o = _flash(q, _gather_tokens(keys[:, :, :past], index_o),
                        _gather_tokens(values[:, :, :past], index_o),
                        _blocked(valid_o, T), scale=scale)
        parts.append((part_o, valid_o.any(1)[:, None]))
    # the kernel gives a query that sees nothing lse 0: mark it -inf
    lses = [torch.where(sees[:, None, :], lse, float("-inf")) for (_, lse), sees in parts]
    top = torch.stack(lses).amax(0)
    top = torch.where(torch.isinf(top), 0.0, top)                         # [B, Hq, T]
    weights = [torch.exp(lse - top) for lse in lses]
    total = sum(weights)
    merged = sum(w[..., None] * o for ((o, _), _), w in zip(parts, weights))
    output = merged / torch.where(total > 0, total, 1.0)[..., None]

    # the scores: A's context columns, normalised over A and F
    norm = torch.logaddexp(lses[0], lses[1]).view(B, Hkv, G, T, 1)
    width = keys_a.shape[2]
    best = torch.full((B, Hkv, width), float("-inf"), device=key.device)
    keys_t = keys_a.transpose(-1, -2)                                     # [B, Hkv, D, L]
    scaled = q * scale
    # blocks of queries whose logits stay in cache (~1 MiB per KV head): about 3x faster on a
    # CPU than blocks of LOGITS_PER_BLOCK, whose logits are written to memory and read back
    rows = max(1, SCORE_LOGITS_PER_HEAD // max(1, B * G * width))
    for begin in range(0, T, rows):
        end = min(T, begin + rows)
        logits = torch.matmul(scaled[:, :, begin:end].reshape(B, Hkv, G * (end - begin), D),
                              keys_t).view(B, Hkv, G, end - begin, width)
        logits.sub_(norm[:, :, :, begin:end])
        if not bool(query_real[:, begin:end].all()):
            logits.masked_fill_(~query_real[:, None, None, begin:end, None], float("-inf"))
        torch.maximum(best, logits.amax(dim=(2, 3)), out=best)
    scored = valid_a & (index_a < context)
    target = torch.where(scored, index_a, context)[:, None, :].expand(B, Hkv, width)
    full = torch.full((B, Hkv, context + 1), float("-inf"), device=key.device)
    full.scatter_reduce_(2, target, best, "amax")
    torch.maximum(out, full[..., :context].exp_(), out=out)
    return output.transpose(1, 2).contiguous().to(query.dtype)


def _real_order(real: Tensor) -> Tensor:
    """[B, N] indices of each row's real tokens first (in order), then its padding."""
    return torch.sort((~real).to(torch.int8), dim=1, stable=True).indices


def _row_prefix(ids: Optional[Tensor], order: Tensor, lengths: Tensor,
                prefix: Tensor) -> Tensor:
    """[B] how many of each row's first real tokens are exactly ``prefix`` (its length, or 0
    where the row does not start with it, or without ids)."""
    B = order.shape[0]
    P = prefix.numel()
    out = torch.zeros(B, dtype=torch.long, device=order.device)
    if ids is None or P == 0:
        return out
    for b in range(B):
        if int(lengths[b]) >= P and torch.equal(ids[b, order[b, :P]], prefix.to(ids.device)):
            out[b] = P
    return out


def _shift_rows(order: Tensor, skip: Tensor) -> Tensor:
    """Each row of ``order`` [B, N] rotated left by ``skip[b]`` (the skipped tokens go last)."""
    N = order.shape[1]
    index = (torch.arange(N, device=order.device)[None, :] + skip[:, None]) % N
    return order.gather(1, index)


class _Scored(Exception):
    """Raised after the last scored layer's attention call: ends the re-read's forward."""


def _fusable(layer, kwargs) -> bool:
    """Whether :func:`attend_and_score` can stand in for this attention call: a plain cache
    layer, no soft-capping, no sliding window, no dropout, no attention sinks."""
    return (type(layer) is DynamicLayer and not kwargs.get("softcap")
            and kwargs.get("sliding_window") is None and not kwargs.get("dropout")
            and kwargs.get("s_aux") is None and kwargs.get("sinks") is None)


def reconstruction_scores(model: nn.Module, cache, *, prompt_ids: Iterable[int] = (),
                          chunk_size: int = 2048, crop_chunks: bool = True,
                          input_ids: Optional[Tensor] = None,
                          inputs_embeds: Optional[Tensor] = None,
                          key_mask: Optional[Tensor] = None,
                          positions: Optional[Tensor] = None,
                          layers: Optional[Iterable[int]] = None,
                          on_chunk: Optional[Callable[[int, object], None]] = None,
                          chunk_prompt_ids: Optional[Iterable[int]] = None, overlap: int = 0,
                          header_ids: Iterable[int] = (), prefix_ids: Iterable[int] = (),
                          reread: str = "all", sinks: Union[str, int] = 0,
                          softmax: str = "all", fused: bool = True) -> Dict[int, Tensor]:
    """Run the reconstruction pass over a full prefill ``cache`` of `model`'s context and return
    ``{layer: [B, Hkv, N] float32}`` (0 at padding, +inf at the tokens the plan keeps). The
    cache is left as it was.

    The context is ``input_ids`` [B, N] (or ``inputs_embeds`` [B, N, hidden], as the decoder
    got them), ``key_mask`` [B, N] its real tokens (None: all), ``positions`` [B, N] the
    prefill's position ids (None: 0 .. N-1). ``layers``: the decoder layers to score (default:
    every layer). ``on_chunk(index, cache)`` is called after each chunk once the cache is
    restored (crop_chunks) or still extended (otherwise).

    How the context is re-read (``KVzip``'s options, its ``reconstruction_plan``): every chunk
    is fed after a lead, ``prompt_ids`` + ``header_ids`` for the first (and, without
    ``chunk_prompt_ids``, for every) chunk, ``chunk_prompt_ids`` + the previous chunk's last
    ``overlap`` tokens + ``header_ids`` for later ones (crop_chunks only). ``prefix_ids``: a
    row whose real tokens start with them has that prefix (the chat template's); ``reread``
    "context" re-reads only the tokens after it, "all" every real token. ``sinks`` "prefix"
    marks the prefix as kept, an int n the first n real tokens (+inf scores). ``softmax``
    "all": each fed query's softmax is the model's own over every key; "span": over the kept
    tokens, the chunk's own span of the context and the fed tokens only (the official code's
    and kvpress's), so a chunk scores only its own span.

    ``fused`` (True): on the CPU, a scored layer's attention call is computed by
    :func:`attend_and_score` (its output and the scores from one set of fused attention calls,
    instead of the model's attention plus a second one for the log-sum-exp), and the re-read's
    forward stops after the last scored layer's attention. Soft-capped, sliding-window and
    other devices' calls, and ``fused=False``, use the model's own attention and
    :func:`max_attention`; the scores agree within float rounding."""
    if reread not in ("all", "context"):
        raise ValueError(f"mixkv: the reconstruction pass's reread must be 'all' or "
                         f"'context', got {reread!r}")
    if softmax not in ("all", "span"):
        raise ValueError(f"mixkv: the reconstruction pass's softmax must be 'all' or 'span', "
                         f"got {softmax!r}")
    if not (sinks == "prefix" or (isinstance(sinks, int) and not isinstance(sinks, bool)
                                  and sinks >= 0)):
        raise ValueError(f"mixkv: the reconstruction pass's sinks must be 'prefix' or an int "
                         f">= 0, got {sinks!r}")
    decoder, modules = find_attention_modules(model)
    context = input_ids if input_ids is not None else inputs_embeds
    if context is None:
        raise ValueError("mixkv: the reconstruction pass needs the context's input_ids or "
                         "inputs_embeds")
    B, N = context.shape[:2]
    device = context.device
    real = torch.ones(B, N, dtype=torch.bool, device=device) if key_mask is None \
        else key_mask.to(device).bool()
    if positions is None:
        positions = torch.arange(N, device=device).expand(B, N)
    if positions.dim() != 2 or tuple(positions.shape) != (B, N):
        raise NotImplementedError(
            f"mixkv: the reconstruction pass needs position ids [rows, tokens] = [{B}, {N}], "
            f"got {tuple(positions.shape)} (multimodal RoPE models are not supported)")
    positions = positions.to(device)
    wanted = set(range(len(modules)) if layers is None else layers)
    if not wanted:
        return {}
    as_ids = lambda x: torch.tensor([int(t) for t in x], dtype=torch.long, device=device)
    prompt, header = as_ids(prompt_ids), as_ids(header_ids)
    later = None if chunk_prompt_ids is None else as_ids(chunk_prompt_ids)
    chunk_size = max(1, int(chunk_size))
    overlap = max(0, min(int(overlap), chunk_size))

    order = _real_order(real)                                      # real ones first
    prefix = _row_prefix(input_ids, order, real.sum(1), as_ids(prefix_ids))   # [B]
    skip = prefix if reread == "context" else torch.zeros_like(prefix)
    order = _shift_rows(order, skip)                               # re-read tokens first
    lengths = real.sum(1) - skip                                   # re-read tokens per row
    rank = torch.empty_like(order).scatter_(
        1, _real_order(real), torch.arange(N, device=device).expand(B, N))  # i-th real token
    kept_count = prefix if sinks == "prefix" else torch.full_like(prefix, int(sinks))
    kept = real & (rank < kept_count[:, None])                     # [B, N] always kept
    next_position = torch.where(real, positions, positions.new_full((), -1)).amax(1) + 1
    embed = decoder.get_input_embeddings() if inputs_embeds is not None else None
    keyword = cache_keyword(decoder)

    scores: Dict[int, Tensor] = {}
    for i in sorted(wanted):
        keys = cache.layers[i].keys
        scores[i] = torch.zeros(B, keys.shape[1], N, dtype=torch.float32, device=keys.device)
    if not scores:
        return scores
    snapshot = _Snapshot(cache)
    state = dict(key_real=real, model_real=None, query_real=None)
    last = max(scores)

    def score(next_fn, module, query, key, value, attention_mask, *args, **kwargs):
        idx = module.layer_idx
        if idx not in scores or capture.is_prefill(query, key):
            return next_fn(module, query, key, value, attention_mask, *args, **kwargs)
        scaling = attention_scaling(module, kwargs)
        score_real = state["key_real"].to(key.device)
        query_real = state["query_real"].to(key.device)
        output = None
        if fused and _fusable(cache.layers[idx], kwargs):
            output = attend_and_score(query, key, value, N, state["model_real"].to(key.device),
                                      score_real, query_real, scaling, scores[idx])
        if output is None:
            max_attention(query, key, N, score_real, query_real, scaling,
                          kwargs.get("softcap"), scores[idx])
        if fused and idx == last:
            raise _Scored   # nothing after the last scored layer's attention is needed
        if output is not None:
            return output, None
        return next_fn(module, query, key, value, attention_mask, *args, **kwargs)

    chunks = max(1, -(-int(lengths.max()) // chunk_size))
    key_real = real       # the keys the model attends (its attention mask)
    try:
        with capture.intercepting(modules, score), torch.no_grad():
            for c in range(chunks):
                start = c * chunk_size
                take = (lengths - start).clamp(0, chunk_size)                 # [B]
                width = int(take.max())
                picked = order[:, start:start + width]                       # [B, width]
                fed_chunk = torch.arange(width, device=device)[None, :] < take[:, None]
                if not (crop_chunks or c == 0):
                    lead = prompt.new_zeros(B, 0)
                elif c == 0 or later is None:
                    lead = torch.cat([prompt, header])[None].expand(B, -1)
                else:
                    tail = order[:, start - overlap:start]                    # [B, overlap]
                    tail_ids = input_ids.gather(1, tail) if input_ids is not None else None
                    lead = torch.cat([later[None].expand(B, -1),
                                      tail_ids if tail_ids is not None
                                      else prompt.new_zeros(B, 0),
                                      header[None].expand(B, -1)], dim=1)
                R = lead.shape[1]
                # a row with nothing left to re-read feeds nothing real (as its own run would)
                lead_real = (take > 0)[:, None].expand(B, R) if c > 0 else \
                    torch.ones(B, R, dtype=torch.bool, device=device)
                fed_real = torch.cat([lead_real, fed_chunk], dim=1)          # [B, R + width]
                attended = key_real
                if softmax == "span":                # the kept tokens and this chunk's span
                    span = torch.zeros(B, N, dtype=torch.bool, device=device).scatter_(
                        1, picked, fed_chunk)
                    attended = torch.cat([key_real[:, :N] & (kept | span),
                                          key_real[:, N:]], dim=1)
                state["key_real"] = torch.cat([attended, fed_real], dim=1)
                state["model_real"] = torch.cat([key_real, fed_real], dim=1)
                state["query_real"] = fed_real
                fed_positions = next_position[:, None] + torch.arange(R + width, device=device)
                if input_ids is not None:
                    tokens = torch.cat([lead, input_ids.gather(1, picked)], dim=1)
                    feed = dict(input_ids=tokens)
                else:
                    gathered = inputs_embeds.gather(
                        1, picked[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
                    lead_embeds = embed(lead).to(gathered.dtype)
                    feed = dict(inputs_embeds=torch.cat([lead_embeds, gathered], dim=1))
                try:
                    decoder(**feed, attention_mask=state["model_real"].long(),
                            position_ids=fed_positions, use_cache=True,
                            **{keyword: cache})
                except _Scored:
                    pass
                if crop_chunks:
                    snapshot.restore(cache)
                else:
                    key_real = torch.cat([key_real, fed_real], dim=1)
                    next_position = next_position + R + width
                if on_chunk is not None:
                    on_chunk(c, cache)
    finally:
        snapshot.restore(cache, final=True)
    if bool(kept.any()):
        for i in scores:
            scores[i].masked_fill_(kept.to(scores[i].device)[:, None, :], float("inf"))
    return scores


class _Snapshot:
    """What the pass must put back: each DynamicLayer's length (cropped back, a slice), every
    other layer's attributes as they were (their updates build new tensors, never in place)."""

    def __init__(self, cache):
        self.layers = []
        for layer in cache.layers:
            if type(layer) is DynamicLayer:
                self.layers.append((layer, layer.keys.shape[-2], None))
            else:
                self.layers.append((layer, None, dict(vars(layer))))
        self.count = len(cache.layers)

    def restore(self, cache, final: bool = False) -> None:
        del cache.layers[self.count:]
        for i, (layer, length, attributes) in enumerate(self.layers):
            cache.layers[i] = layer
            if attributes is not None:
                layer.__dict__.clear()
                layer.__dict__.update(attributes)
            elif layer.keys.shape[-2] != length or final:
                keys, values = layer.keys[..., :length, :], layer.values[..., :length, :]
                if final and keys.untyped_storage().nbytes() > keys.nbytes:
                    keys, values = keys.clone(), values.clone()   # free the pass's tokens
                layer.keys, layer.values = keys, values


# -- the shim's side ---------------------------------------------------------------------------

def plan_for(method, encode=None, tokenizer=None) -> dict:
    """The reconstruction plan of a method's reconstruction scorer (``encode``: text -> ids,
    ``tokenizer``: a Hugging Face tokenizer for its chat template, when the caller has one)."""
    scorer = method.reconstruction_scorer
    if tokenizer is not None and "tokenizer" in inspect.signature(
            scorer.reconstruction_plan).parameters:
        return scorer.reconstruction_plan(encode, tokenizer=tokenizer)
    return scorer.reconstruction_plan(encode)


def plan_key(plan: dict) -> tuple:
    """A hashable key of a reconstruction plan (lists as tuples), to reuse a pass's scores."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in plan.items()))


def scores_for(handle, cache, *, input_ids=None, inputs_embeds=None, key_mask=None,
               positions=None, encode=None, layers=None, on_chunk=None,
               tokenizer=None) -> Dict[int, Tensor]:
    """The reconstruction pass of a patch handle's method over ``cache`` (default layers: the
    ones the shim compresses)."""
    if layers is None:
        layers = [m.layer_idx for m in handle.modules if handle.compressible(cache, m.layer_idx)]
    layers = [i for i in layers
              if handle.method.budget_for(cache.layers[i].keys.shape[-2])
              < cache.layers[i].keys.shape[-2]]   # a layer kept whole needs no scores
    return reconstruction_scores(handle.model, cache, input_ids=input_ids,
                                 inputs_embeds=inputs_embeds, key_mask=key_mask,
                                 positions=positions, layers=layers, on_chunk=on_chunk,
                                 **plan_for(handle.method, encode, tokenizer))


class DeferredCompression:
    """Compression after the whole prefill forward, for methods that need a reconstruction
    pass or whose policy splits one budget over every layer (global): the shim's per-layer hook
    calls :meth:`hold` instead of compressing; a forward hook on the decoder then runs the pass
    (if the method has one) over the held layers and compresses them (together, under a
    policy over every layer)."""

    def __init__(self, handle):
        self.handle = handle
        self.held: Dict[int, object] = {}   # layer -> its compressor.LayerInput
        self.context: Optional[dict] = None
        self.running = False
        decoder = handle.decoder
        self.hooks = [decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                      decoder.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, decoder, args, kwargs):
        if self.running:
            return
        self.held.clear()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        self.context = dict(input_ids=input_ids if embeds is None else None,
                            inputs_embeds=embeds, positions=kwargs.get("position_ids"))

    def hold(self, item) -> None:
        """Keep a layer's ``compressor.LayerInput`` until the prefill forward ends."""
        self.held[item.layer] = item

    def _after(self, decoder, args, kwargs, output):
        if self.running or not self.held:
            return
        held, self.held = self.held, {}
        context, self.context = self.context or {}, None
        handle = self.handle
        first = next(iter(held.values()))
        self.running = True
        try:
            with torch.no_grad():
                if handle.method.needs_reconstruction:
                    scores = scores_for(handle, first.cache, key_mask=first.key_mask,
                                        layers=list(held), **context)
                    for idx, item in held.items():
                        item.reconstruction = scores.get(idx)
                handle.compressor.compress([held[idx] for idx in sorted(held)])
        finally:
            self.running = False

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
