"""The shim's one layer compressor: from what was captured for a layer to its kept layer in the
cache. Every caller goes through it: the prefill hook (``patch.py``), ``compress_cache``, the
compression deferred to the end of the prefill forward (``reconstruct.DeferredCompression``) and
compression during generation (``decode.py``, dense layers through :meth:`compress`, head-wise
ones through :meth:`prefill` and :meth:`install`).

It builds each layer's :class:`~mixkv.methods.Prefill`, runs the method (per layer, or every
layer at once under a policy that splits one budget over all of them), installs the kept tokens
as a :class:`CompressedLayer` or :class:`HeadwiseLayer` and records the byte statistics
``MixKVPatch.stats()`` reports.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..methods import Method, Prefill, Selection
from .layers import layer_from_kept
from .model import attention_scaling, layer_of


@dataclasses.dataclass
class LayerInput:
    """What the compressor needs of one layer besides its cached K/V."""

    module: nn.Module                       # the layer's attention module
    cache: object                           # the Cache holding the layer
    queries: Tensor                         # [B, Hq, >= W, D] window queries (the last W)
    key_mask: Optional[Tensor] = None       # [B, N] real tokens; None: no padding
    hidden: Optional[Tensor] = None         # [B, N, hidden] the module's input, if captured
    reconstruction: Optional[Tensor] = None   # [B, Hkv, N] a reconstruction pass's scores
    token_scores: Optional[Tensor] = None     # [B, Hkv, N] static scores kept by decoding

    @property
    def layer(self) -> int:
        return self.module.layer_idx


class LayerCompressor:
    """Compresses layers of a patched model's caches with one method; ``statistics`` holds the
    last prefill compression of each layer. ``listener`` (a ``DecodeCompression``) is told the
    kept selection of every layer, to keep its per-token scores in step."""

    def __init__(self, method: Method, decoder: nn.Module, num_layers: int):
        self.method, self.decoder, self.num_layers = method, decoder, num_layers
        self.listener = None
        self.statistics: Dict[int, dict] = {}

    def prefill(self, item: LayerInput, keys: Tensor, values: Tensor,
                key_mask: Optional[Tensor], token_scores: Optional[Tensor] = None) -> Prefill:
        """The method's input for these K/V of `item`'s layer (the last W queries)."""
        W = self.method.window
        return Prefill(queries=item.queries[..., -W:, :].to(keys.device), keys=keys,
                       values=values, key_mask=key_mask, window=W, layer=item.layer,
                       num_layers=self.num_layers,
                       scaling=attention_scaling(item.module), module=item.module,
                       decoder=self.decoder, hidden_states=item.hidden,
                       reconstruction=item.reconstruction, token_scores=token_scores)

    def compress(self, items: List[LayerInput], budget: Optional[int] = None,
                 headroom: Optional[int] = None, record: bool = True) -> Dict[int, Selection]:
        """Compress these layers in place to ``budget`` tokens per KV head (None: the method's
        budget for the prompt); per layer, or together under a policy that spans layers. A
        layer holding at most the budget stays as it is, bit for bit. ``headroom``: room for
        decoded tokens in a new head-wise layer; ``record``: keep byte statistics (prefill
        compressions). Returns the selections made, by layer."""
        if self.method.spans_layers:
            return self._compress_together(items, budget, headroom, record)
        selections = {}
        for item in items:  # one at a time: each layer's full K/V is freed before the next
            selections.update(self._compress_together([item], budget, headroom, record))
        return selections

    def _compress_together(self, items, budget, headroom, record) -> Dict[int, Selection]:
        m = self.method
        static = m.static_scorer
        prefills, budgets = {}, {}
        for item in items:
            idx = item.layer
            layer = layer_of(item.cache, idx)
            keys, values = layer.keys, layer.values
            B, Hkv, N, _ = keys.shape
            keep = m.budget_for(N) if budget is None else budget
            tokens = item.token_scores
            # Per-token static scores (KVzap): computed once, kept for decoding (decode.py).
            if tokens is None and static is not None and item.hidden is not None and \
                    (N > keep or self.listener is not None):
                tokens = static.token_scores(item.hidden, idx, self.decoder).to(keys.device)
            if N <= keep:  # nothing to remove: the cache stays as it is, bit for bit
                if record:
                    self._record(idx, torch.full((B, Hkv), N), keys, values, N)
                if self.listener is not None:
                    self.listener.keep_scores(idx, tokens)
                continue
            if item.hidden is None and any(
                    p.needs_hidden_states and not (p.static_scores and tokens is not None)
                    for p in m.parts):
                raise ValueError(f"mixkv: method {m.label!r} needs the layer's hidden states; "
                                 "pass hidden_states= to compress_cache")
            key_mask = None if item.key_mask is None else item.key_mask.to(keys.device)
            prefills[idx] = self.prefill(item, keys, values, key_mask, tokens)
            budgets[idx] = keep
        if not prefills:
            return {}
        if m.spans_layers:
            if len(set(budgets.values())) > 1:
                raise ValueError(f"mixkv: method {m.label!r} splits one budget over every "
                                 "layer, but the layers hold prompts of different lengths "
                                 f"(budgets {sorted(set(budgets.values()))})")
            selections = m.compress_layers(prefills, next(iter(budgets.values())))
        else:
            selections = {i: m.compress(p, budgets[i]) for i, p in prefills.items()}
        caches = {item.layer: item.cache for item in items}
        for idx, kept in selections.items():
            p = prefills[idx]
            self.install(caches[idx], idx, kept, p.key_mask, *p.keys.shape[:2],
                         headroom=headroom, token_scores=p.token_scores)
            if record:
                counts = torch.full(p.keys.shape[:2], kept.keys.shape[-2]) \
                    if kept.offsets is None else kept.offsets.diff().view(p.keys.shape[:2]).cpu()
                self._record(idx, counts, p.keys, p.values, p.keys.shape[-2],
                             after=kept.keys.nbytes + kept.values.nbytes)
        return selections

    def install(self, cache, idx: int, kept: Selection, key_mask: Optional[Tensor], batch: int,
                kv_heads: int, headroom: Optional[int] = None,
                token_scores: Optional[Tensor] = None) -> None:
        """Put a selection's kept tokens in ``cache.layers[idx]`` (``layers.layer_from_kept``;
        ``key_mask`` per row [B, N] or per segment [B * Hkv, N]) and tell the listener, with the
        layer's per-token scores before the selection (``token_scores``, if kept)."""
        cache.layers[idx] = layer_from_kept(kept, key_mask, batch, kv_heads, headroom=headroom)
        if self.listener is not None:
            self.listener.keep_scores(idx, token_scores, kept)

    def _record(self, idx, kept_counts, keys, values, prompt, after=None) -> None:
        before = keys.nbytes + values.nbytes
        self.statistics[idx] = dict(kept=kept_counts, bytes_before=before,
                                    bytes_after=before if after is None else after,
                                    prompt=prompt)

    def stats(self) -> dict:
        """The last compression: per layer kept tokens [B, Hkv] and K/V bytes before/after;
        totals under "total"."""
        layers = {i: dict(s) for i, s in sorted(self.statistics.items())}
        before = sum(s["bytes_before"] for s in layers.values())
        after = sum(s["bytes_after"] for s in layers.values())
        return dict(layers=layers, total=dict(bytes_before=before, bytes_after=after,
                                              ratio=after / before if before else 1.0))
