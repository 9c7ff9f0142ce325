"""The cache layers the shim installs after compression.

- :class:`CompressedLayer`: a dense layer (every head keeps the same number of tokens) that owns
  its kept-real mask, so a padded batch's decode mask is rebuilt from the layer itself.
- :class:`HeadwiseLayer` (``headwise.py``): per-(row, KV head) lengths for head-wise budgets.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import DynamicLayer

from .headwise import HeadwiseLayer

__all__ = ["CompressedLayer", "HeadwiseLayer"]


class CompressedLayer(DynamicLayer):
    """Kept K/V [B, Hkv, k, D] of one layer plus, for a padded batch, which kept tokens are
    real (``kept_real`` [B, k]; padded slots come first in each row, the same for every head).
    Tokens appended by decoding are real."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor,
                 kept_real: Optional[torch.Tensor] = None):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.kept_real = keys, values, kept_real

    def decode_mask(self, query: torch.Tensor, key: torch.Tensor,
                    additive_dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
        """Mask [B, 1, q, kv]: kept real tokens plus the causal appended ones (bool for sdpa,
        additive in `additive_dtype` for eager); None when no token is padding."""
        if self.kept_real is None:
            return None
        B, q, kv = query.shape[0], query.shape[-2], key.shape[-2]
        kept = self.kept_real.shape[1]
        real = torch.cat([self.kept_real, self.kept_real.new_ones(B, kv - kept)], dim=1)
        position = torch.arange(kv, device=key.device)
        causal = position[None, :] <= (kv - q + torch.arange(q, device=key.device))[:, None]
        allowed = real[:, None, None, :] & causal[None, None]
        if additive_dtype is None:
            return allowed
        zero = torch.zeros((), dtype=additive_dtype, device=key.device)
        return torch.where(allowed, zero, torch.finfo(additive_dtype).min)

    # The mask follows the rows and the length of the K/V.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.kept_real is not None:
            self.kept_real = self.kept_real[:, :self.keys.shape[-2]]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.kept_real is not None:
            self.kept_real = self.kept_real.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.kept_real is not None:
            self.kept_real = self.kept_real[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.kept_real is not None:
            self.kept_real = self.kept_real.index_select(0, beam_idx.to(self.kept_real.device))


def layer_from_kept(kept, key_mask: Optional[torch.Tensor], batch: int, kv_heads: int,
                    headroom: Optional[int] = None) -> DynamicLayer:
    """The cache layer holding a compression's kept tokens (a ``methods.Kept``): a
    :class:`HeadwiseLayer` when heads keep different counts (``kept.offsets``), else a
    :class:`CompressedLayer`. ``key_mask`` marks the real tokens the selection chose from
    (None: no padding): [B, N] per row, or, for a head-wise selection, [B * Hkv, N] per
    (row, KV head) segment (a head-wise layer's ``padded`` view); the layer remembers which kept
    tokens are real so decoding masks the rest."""
    if kept.offsets is not None:
        valid = torch.ones_like(kept.positions, dtype=torch.bool)
        if key_mask is not None:
            segment = torch.arange(batch * kv_heads, device=key_mask.device)
            row = segment if key_mask.shape[0] == batch * kv_heads else segment // kv_heads
            valid = key_mask[row.repeat_interleave(kept.offsets.diff().long()),
                             kept.positions.long()]
        extra = {} if headroom is None else dict(headroom=headroom)
        return HeadwiseLayer(kept.keys, kept.values, kept.offsets, valid, batch, kv_heads,
                             **extra)
    # Padded slots rank last and kept positions ascend, so they come first in every head:
    # head 0's positions say which kept tokens are real for the whole row.
    kept_real = None if key_mask is None else key_mask.gather(1, kept.positions[:, 0].long())
    return CompressedLayer(kept.keys, kept.values, kept_real)
