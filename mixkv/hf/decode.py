"""Compression during generation: ``mixkv.patch(model, method, decode_budget=..., interval=...)``.

After the prefill compression (``budget``), every ``interval`` decoded tokens each compressed
layer is cut back to ``decode_budget`` tokens per KV head (window included), so a generation of
any length holds at most ``decode_budget + interval`` tokens per head (head-wise budgets: per
head on average over a row's heads; PyramidKV: the layer's own share). The method scores the
cached tokens as at prefill, with the latest ``window`` queries as the window: the shim's
attention wrapper keeps a rolling buffer of each layer's last ``window`` post-RoPE queries
(:meth:`DecodeCompression.observe`), and the window (the ``window`` most recent tokens, whose
queries those are) is always kept.

The trigger is a count of decoded tokens, the same for every row, so a row of a left-padded
batch is compressed at the same steps as the row run alone; a row that holds at most
``decode_budget`` real tokens keeps all of them. A layer whose every head holds at most
``decode_budget`` tokens is left as it is, bit for bit.

Dense caches (uniform budgets): :meth:`Method.compress` on the layer's K/V, the real-token mask
following the layer (``CompressedLayer.kept_real`` plus the decoded tokens). Head-wise caches:
each (row, KV head) segment is laid out left-padded as a row of its own (one KV head, a key mask
of its own), scored by the method's scorer, the policy splits each row's capacity from the
segments' importance (padding: importance 0; each head capped at its real candidates), and
``select_kv_ragged`` picks the tokens; the result is a new :class:`HeadwiseLayer` with
``interval`` tokens of headroom, so decoding until the next compression appends in place.

Scorers whose scores are per token and static (``Scorer.static_scores``: KVzap) score each
token once, when its K/V enters the cache (the prefill, then every decode call, from the
attention module's input), and those scores are kept beside each layer in the layout
``_segments`` gives (``[B * Hkv, tokens]``; left-padded segments for a head-wise layer),
gathered with the kept positions at every compression (``_kept_scores``): a compression ranks
old and new tokens by their stored scores, and no hidden state is kept.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

from ..methods import Method, Prefill, Selection, resolve
from . import capture
from .compressor import LayerInput
from .layers import CompressedLayer, HeadwiseLayer
from .headwise import segment_layout
from .model import layer_of

DEFAULT_INTERVAL = 64


class DecodeCompression:
    """Per-layer state of compression during generation; ``handle.decoding`` of a patch."""

    def __init__(self, method: Method, decode_budget, interval=None):
        self.method = method
        self.decode_budget, self.interval = check_options(decode_budget, interval,
                                                          method.window)
        check_method(method)
        self.window = method.window
        self.handle = None
        self.compressions = 0      # layer compressions done during decoding (all layers)
        self._queries = {}         # layer -> [B, Hq, <= W, D] the latest queries
        self._since = {}           # layer -> tokens decoded since the prefill / last compression
        self._decoding = {}        # layer -> the current call is a decode call
        self._key_mask = {}        # layer -> [B, N] real keys of a plain layer's decode call
        self._pending = {}         # layer -> (module, cache) awaiting a global split
        self._scores = {}          # layer -> [B*Hkv, tokens] static per-token scores (KVzap)

    @classmethod
    def resolve(cls, method, decode_budget, interval, options: dict):
        """(Method, DecodeCompression) for ``mixkv.patch(model, method, decode_budget=...,
        interval=..., **options)``: the arguments are checked against the method's window
        before anything else (its budget defaults to ``decode_budget``)."""
        if isinstance(method, Method):
            resolved = method
            check_options(decode_budget, interval, resolved.window)
        else:
            # The window first (window=, or the one a scorer sets), with a stand-in budget.
            window = resolve(method, **{**options, "budget": None, "ratio": 0.0}).window
            check_options(decode_budget, interval, window)
            if options.get("budget") is None and options.get("ratio") is None:
                options = dict(options, budget=decode_budget)
            resolved = resolve(method, **options)
        return resolved, cls(resolved, decode_budget, interval)

    def start(self, window_queries: dict) -> None:
        """Start the query buffers from a prefill's window queries ({layer: [B, Hq, >= W, D]}),
        as a patched prefill would (``handle.compress_cache`` calls this)."""
        for idx, queries in window_queries.items():
            self._queries[idx] = queries[..., -self.window:, :].detach().clone()
            self._since[idx] = 0
            self._key_mask.pop(idx, None)

    @contextlib.contextmanager
    def side_branch(self):
        """Decode on a copy of the cache and come back (the evaluation's teacher forcing of a
        gold target): the per-layer query buffers and counters that the real cache's decoding
        continues from are put back afterwards; compressions done on the copy still count."""
        saved = [dict(state) for state in (self._queries, self._since, self._decoding,
                                           self._key_mask, self._scores)]
        try:
            yield
        finally:
            self._queries, self._since, self._decoding, self._key_mask, self._scores = saved

    @staticmethod
    def check_generate(model, kwargs) -> None:
        """Refuse generate options the query buffers cannot follow: beam search reorders the
        cache's rows, assisted decoding crops them."""
        beams = kwargs.get("num_beams")
        for config in (kwargs.get("generation_config"), getattr(model, "generation_config", None)):
            if beams is None and config is not None:
                beams = getattr(config, "num_beams", None)
        if beams is not None and beams > 1:
            raise NotImplementedError("mixkv: decode_budget does not support beam search "
                                      f"(num_beams={beams}); use greedy or sampling")
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens"):
            raise NotImplementedError("mixkv: decode_budget does not support assisted or "
                                      "prompt-lookup decoding (they crop the cache)")

    # -- the attention call (from the shim's interceptor) -----------------------------------
    def observe(self, state, query: torch.Tensor, key: torch.Tensor, attention_mask) -> None:
        """Record this call's queries: a prefill starts the buffer, decode calls roll it."""
        idx = state.layer_idx
        layer = layer_of(state.cache, idx)
        query = query.detach()
        if not isinstance(layer, HeadwiseLayer) and capture.is_prefill(query, key):
            self._queries[idx] = query[..., -self.window:, :].clone()
            self._since[idx] = 0
            self._decoding[idx] = False
            self._key_mask.pop(idx, None)
            self._scores.pop(idx, None)   # the prefill's compression keeps them anew
            return
        held = self._queries.get(idx)
        if held is not None and held.shape[:2] != query.shape[:2]:
            held = None  # another batch: a cache this run did not prefill
        latest = query if held is None else torch.cat([held, query], dim=-2)
        self._queries[idx] = latest[..., -self.window:, :].contiguous()
        self._since[idx] = self._since.get(idx, 0) + query.shape[-2]
        self._decoding[idx] = True
        if type(layer) is DynamicLayer:  # not compressed at prefill: the model's mask holds
            self._key_mask[idx] = capture.real_keys(attention_mask, key.shape[0],
                                                    key.shape[-2])

    # -- after the attention call (from the shim's forward hook) ---------------------------
    def after_attention(self, module, cache, idx: int, hidden=None) -> bool:
        """Compress layer `idx` when `interval` tokens were decoded since the last time; True
        when this call was a decode call (nothing left for the prefill path). ``hidden``: the
        call's attention input [B, q, hidden], which static per-token scores are computed from."""
        if not self._decoding.pop(idx, False):
            return False
        if self.method.static_scorer is not None and idx in self._scores:
            new = self._token_scores(hidden, idx)
            self._scores[idx] = torch.cat([self._scores[idx], new.to(self._scores[idx].device)
                                           .flatten(0, 1)], dim=-1)
        if self._since.get(idx, 0) < self.interval:
            return True
        self._since[idx] = 0
        layer = layer_of(cache, idx)
        if idx in self.handle.sliding_layers or getattr(layer, "is_sliding", False):
            return True
        with torch.no_grad():
            if self.method.spans_layers:   # one budget over every layer: after the last one
                if isinstance(layer, (HeadwiseLayer, DynamicLayer)):
                    self._pending[idx] = (module, cache)
                if idx == self._last_layer():
                    pending, self._pending = self._pending, {}
                    self._compress_global(pending)
            elif isinstance(layer, HeadwiseLayer):
                self._compress_headwise(module, cache, idx, layer)
            elif type(layer) in (DynamicLayer, CompressedLayer):
                self._compress_dense(module, cache, idx, layer)
        return True

    def _last_layer(self) -> int:
        """The last layer the shim compresses (a global policy splits after it)."""
        return max(m.layer_idx for m in self.handle.modules
                   if m.layer_idx not in self.handle.sliding_layers)

    def _prefill(self, module, cache, queries, keys, values, key_mask) -> Prefill:
        """The method's input for these [B, Hkv, N, D] K/V of `module`'s layer, with the
        layer's kept per-token scores (static scorers)."""
        B, Hkv, N = keys.shape[:3]
        return self.handle.compressor.prefill(
            LayerInput(module, cache, queries), keys, values, key_mask,
            self._stored_scores(module.layer_idx, B, Hkv, N))

    # -- static per-token scores (Scorer.static_scores) --------------------------------------
    def _token_scores(self, hidden, idx) -> torch.Tensor:
        """[B, Hkv, n] scores of the n tokens whose attention input is ``hidden``."""
        if hidden is None:
            raise ValueError(f"mixkv: method {self.method.label!r} scores each token from its "
                             "hidden states, which this call did not capture")
        return self.method.static_scorer.token_scores(hidden, idx, self.handle.decoder)

    def keep_scores(self, idx: int, token_scores, kept=None) -> None:
        """Keep the per-token scores [B, Hkv, N] of layer `idx` (static scorers) that a
        compression (at prefill or during decoding) started from, gathered with its ``kept``
        selection when there was one (the layer compressor's listener call)."""
        if self.method.static_scorer is None or token_scores is None:
            return
        scores = token_scores.flatten(0, 1)
        self._scores[idx] = scores if kept is None else \
            _kept_scores(scores, kept.positions, kept.offsets)

    def _stored_scores(self, idx, batch: int, kv_heads: int, tokens: int):
        """The layer's kept per-token scores [batch, kv_heads, tokens] (static scorers; else
        None), checked against the layout they must follow."""
        if self.method.static_scorer is None:
            return None
        segments = batch * kv_heads
        scores = self._scores.get(idx)
        if scores is None or tuple(scores.shape) != (segments, tokens):
            got = "none" if scores is None else list(scores.shape)
            raise RuntimeError(
                f"mixkv: method {self.method.label!r} keeps a score per cached token, but layer "
                f"{idx} has {got} for its [{segments}, {tokens}] tokens (a cache this patch did "
                "not prefill?)")
        return scores.view(batch, kv_heads, tokens)

    def _window_queries(self, idx, device) -> Optional[torch.Tensor]:
        queries = self._queries.get(idx)
        if queries is None or queries.shape[-2] < self.window:
            return None  # fewer queries than the window so far: wait for more
        return queries.to(device)

    def _real_tokens(self, idx, layer):
        """A dense layer's real-token mask [B, N], None when every token is real: a compressed
        layer's kept mask extended by the tokens appended since, else the prefill's padding."""
        if not isinstance(layer, CompressedLayer):
            return self._key_mask.get(idx)
        real = layer.kept_real
        if real is None:
            return None
        B, N = layer.keys.shape[0], layer.keys.shape[-2]
        return torch.cat([real, real.new_ones(B, N - real.shape[1])], 1)

    def _compress_dense(self, module, cache, idx, layer) -> None:
        B, Hkv, N, _ = layer.keys.shape
        queries = self._window_queries(idx, layer.keys.device)
        if N <= self.decode_budget or queries is None:
            return
        item = LayerInput(module, cache, queries, self._real_tokens(idx, layer),
                          token_scores=self._stored_scores(idx, B, Hkv, N))
        # Head-wise budgets on a layer the prefill left whole give a HeadwiseLayer.
        self.handle.compressor.compress([item], budget=self.decode_budget,
                                        headroom=self.interval, record=False)
        self.compressions += 1

    def _segments(self, idx, layer):
        """Each (row, KV head) of a layer as a left-padded row of its own: keys, values
        [S, longest, D], real-token mask [S, longest], current lengths [S] (S = B * Hkv)."""
        if isinstance(layer, HeadwiseLayer):
            keys, values, mask = layer.padded()
            return keys, values, mask, layer.lengths, layer.batch, layer.kv_heads
        B, Hkv, N, D = layer.keys.shape     # a dense layer (left whole at prefill)
        real = self._real_tokens(idx, layer)
        real = torch.ones(B, N, dtype=torch.bool, device=layer.keys.device) if real is None \
            else real.to(layer.keys.device).bool()
        mask = real[:, None, :].expand(B, Hkv, N).reshape(B * Hkv, N)
        lengths = torch.full((B * Hkv,), N, dtype=torch.long, device=layer.keys.device)
        return (layer.keys.reshape(B * Hkv, N, D), layer.values.reshape(B * Hkv, N, D), mask,
                lengths, B, Hkv)

    def _score_segments(self, module, cache, keys, values, mask, queries, B, Hkv):
        """(importance, scores) [B, Hkv, C] of the segments, importance 0 at padding."""
        S, longest = mask.shape
        W = self.window
        Hq, Dq = queries.shape[1], queries.shape[-1]
        per_segment = queries.reshape(B, Hkv, Hq // Hkv, W, Dq).reshape(S, Hq // Hkv, W, Dq)
        # Every segment is a row with one KV head: its own key mask.
        segments = self._prefill(module, cache, per_segment.contiguous(), keys[:, None],
                                 values[:, None], mask)   # token_scores [S, 1, longest]
        importance, scores = self.method.scored(segments)
        C = longest - W
        importance = torch.where(mask[:, None, :C], importance, 0.0).view(B, Hkv, C)
        return importance.contiguous(), scores.contiguous()

    def _install(self, cache, idx, keys, values, mask, lengths, scores, capacities, B,
                 Hkv) -> None:
        """select_kv_ragged with per-segment ``capacities`` [B, Hkv]; a new HeadwiseLayer
        unless nothing is removed."""
        S = B * Hkv
        kept = Selection(*torch.ops.mixkv.select_kv_ragged(
            scores, keys[:, None], values[:, None], capacities.reshape(S, 1).to(torch.int32),
            self.window, mask))
        if torch.equal(kept.offsets.diff().long(), lengths.to(kept.offsets.device).long()):
            return  # nothing removed (a policy may keep more than decode_budget in a head)
        self.handle.compressor.install(cache, idx, kept, mask, B, Hkv, headroom=self.interval,
                                       token_scores=self._stored_scores(idx, B, Hkv,
                                                                        mask.shape[1]))
        self.compressions += 1

    def _compress_headwise(self, module, cache, idx, layer: HeadwiseLayer) -> None:
        W, budget = self.window, self.decode_budget
        queries = self._window_queries(idx, layer.device)
        if int(layer.lengths.max()) <= budget or queries is None:
            return
        keys, values, mask, lengths, B, Hkv = self._segments(idx, layer)
        longest = mask.shape[1]
        importance, scores = self._score_segments(module, cache, keys, values, mask, queries,
                                                  B, Hkv)
        real = mask[:, :longest - W]
        # Head-wise layers exist only under head-wise policies. The policy sees each row's
        # heads together; a slot is real there when it is real in some head, and each head is
        # then capped at its own real candidates.
        D = keys.shape[-1]
        row_mask = mask.view(B, Hkv, longest).any(1)
        whole = self._prefill(module, cache, queries, keys.view(B, Hkv, longest, D),
                              values.view(B, Hkv, longest, D), row_mask)
        capacities = self.method.policy.capacities(importance, budget - W, whole)
        capacities = torch.minimum(capacities.to(layer.device).long(),
                                   real.sum(-1).view(B, Hkv))
        self._install(cache, idx, keys, values, mask, lengths, scores, capacities, B, Hkv)

    def _compress_global(self, pending: dict) -> None:
        """A policy over every layer (global): each pending layer's segments scored, one split
        of decode_budget x Hkv x layers over all of them, then each layer's selection. Left
        alone when every segment of every layer holds at most decode_budget tokens."""
        W, budget = self.window, self.decode_budget
        layers = {}
        for idx, (module, cache) in sorted(pending.items()):
            layer = layer_of(cache, idx)
            device = layer.device if isinstance(layer, HeadwiseLayer) else layer.keys.device
            queries = self._window_queries(idx, device)
            if queries is None:
                return   # fewer queries than the window so far somewhere: wait for more
            layers[idx] = (module, cache, layer, queries)
        longest = [int(l.lengths.max()) if isinstance(l, HeadwiseLayer) else l.keys.shape[-2]
                   for _, _, l, _ in layers.values()]
        if not layers or max(longest) <= budget:
            return
        scored = {}
        for idx, (module, cache, layer, queries) in layers.items():
            keys, values, mask, lengths, B, Hkv = self._segments(idx, layer)
            if mask.shape[1] <= W:
                continue      # nothing but the window: kept as it is
            importance, scores = self._score_segments(module, cache, keys, values, mask,
                                                      queries, B, Hkv)
            real = mask[:, :mask.shape[1] - W].view(B, Hkv, -1)
            scored[idx] = (cache, keys, values, mask, lengths, scores, importance, real, B, Hkv)
        order = sorted(scored)
        capacities = self.method.policy.split([scored[i][6] for i in order],
                                              [scored[i][7] for i in order], budget - W)
        for idx, capacity in zip(order, capacities):
            cache, keys, values, mask, lengths, scores, _, _, B, Hkv = scored[idx]
            self._install(cache, idx, keys, values, mask, lengths, scores, capacity, B, Hkv)


def _kept_scores(scores: torch.Tensor, positions: torch.Tensor, offsets) -> torch.Tensor:
    """Per-token scores [S, N] (S = B * Hkv rows of the compressed layout) of the tokens a
    selection kept: dense ``positions`` [B, Hkv, k] give [S, k]; ragged ones (flat, with
    ``offsets`` [S + 1]) the left-padded [S, longest] layout of the head-wise layer they
    become (``HeadwiseLayer.padded``'s), 0 at padding."""
    if offsets is None:
        return scores.view(*positions.shape[:2], -1).gather(
            -1, positions.long().to(scores.device)).flatten(0, 1)
    lengths = offsets.diff().long().to(scores.device)
    segment, _, slot, longest = segment_layout(lengths)
    out = scores.new_zeros(len(lengths), longest)
    out[segment, slot] = scores[segment, positions.long().to(scores.device)]
    return out


def check_options(decode_budget, interval, window: int):
    """Validated (decode_budget, interval) for a method with this window; errors name the
    argument. (None, None) when neither is given."""
    if decode_budget is None:
        if interval is not None:
            raise ValueError(f"mixkv: interval={interval!r} needs decode_budget= (the tokens per "
                             "KV head a generation keeps)")
        return None, None
    if isinstance(decode_budget, bool) or not isinstance(decode_budget, int):
        raise TypeError(f"mixkv: decode_budget must be an int (tokens per KV head, window "
                        f"included), got {decode_budget!r}")
    if interval is None:
        interval = DEFAULT_INTERVAL
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"mixkv: interval must be an int >= 1 (decoded tokens between "
                         f"compressions), got {interval!r}")
    if decode_budget <= window:
        raise ValueError(f"mixkv: decode_budget ({decode_budget}) must be larger than window "
                         f"({window}): the budget counts the window")
    return decode_budget, interval


def check_method(method: Method) -> None:
    """Methods compression during generation cannot run: clear errors."""
    if method.scorer is None:
        raise ValueError("mixkv: decode_budget needs a compressing method, not 'full'")
    if method.needs_reconstruction:
        raise NotImplementedError(
            f"mixkv: decode_budget does not support {method.label!r}: its scores come "
            "from a pass that re-reads the whole context (kvzip), not from the latest "
            "queries; use another scorer for compression during generation")
    if any(p.needs_hidden_states and not p.static_scores for p in method.scorer.parts()):
        raise NotImplementedError(
            f"mixkv: decode_budget does not support method {method.label!r}: its scorer reads "
            "the layers' hidden states, which decoding does not keep")
    if method.spans_layers and not hasattr(method.policy, "split"):
        raise NotImplementedError(
            f"mixkv: decode_budget does not support policy {method.policy.label!r}: a policy "
            "over every layer needs a split(importances, reals, capacity) for the segments")
    if method.headwise and method.redundancy is not None:
        raise NotImplementedError(
            "mixkv: decode_budget with head-wise budgets does not support an offline "
            "redundancy profile yet; use redundancy='online' or base='snapkv'")
