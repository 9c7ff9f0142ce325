"""A cache layer with per-(row, KV head) lengths: the memory-saving home of head-wise budgets.

Each (row b, KV head h) owns one segment of a flat [S, D] buffer, with spare rows after its kept
tokens so that decoding appends in place; when a segment runs out of room every segment gets
new headroom in one copy (amortised: one copy per ``headroom`` steps, never one per step).
Attention over it is ``torch.ops.mixkv.ragged_attention``, which the shim's attention wrapper
calls for this layer instead of the model's attention function.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class HeadwiseLayer(DynamicLayer):
    """Ragged K/V of one decoder layer after head-wise compression."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 valid: torch.Tensor, batch: int, kv_heads: int, headroom: int = 64):
        """``keys``/``values`` [T, D] and ``offsets`` [B*Hkv + 1] as returned by
        ``select_kv_ragged``; ``valid`` [T] marks the real (non-padding) kept tokens."""
        super().__init__()
        self.batch, self.kv_heads, self.headroom = batch, kv_heads, headroom
        self.device = keys.device
        lengths = offsets.diff().long()
        self._allocate(lengths + headroom, lengths, keys.shape[-1], keys.dtype)
        rows = self._rows(lengths)
        self.key_buffer[rows] = keys
        self.value_buffer[rows] = values
        self.valid[rows] = valid
        self.is_initialized = True

    def _allocate(self, capacity, lengths, head_dim, dtype):
        self.capacity, self.lengths = capacity, lengths
        self.starts = capacity.cumsum(0) - capacity
        total = int(capacity.sum())
        self.key_buffer = torch.zeros(total, head_dim, dtype=dtype, device=self.device)
        self.value_buffer = torch.zeros(total, head_dim, dtype=dtype, device=self.device)
        self.valid = torch.zeros(total, dtype=torch.bool, device=self.device)
        self._starts32 = self.starts.int().view(self.batch, self.kv_heads)
        self._max_length = int(lengths.max())  # B * Hkv >= 1 segments
        # Room left in the fullest segment, tracked on the host: every append adds the same q
        # tokens to every segment, so decoding never waits on the device to know it fits.
        self._spare = int((capacity - lengths).min())

    def _rows(self, count: torch.Tensor) -> torch.Tensor:
        """Buffer rows starts[s] + (0 .. count[s]-1) of every segment s, in order."""
        segment, local, _, _ = segment_layout(count)
        return self.starts[segment] + local

    def _grow(self, needed: int) -> None:
        """Give every segment room for `needed` more tokens plus fresh headroom (one copy)."""
        old_rows = self._rows(self.lengths)
        keys, values, valid = (self.key_buffer[old_rows], self.value_buffer[old_rows],
                               self.valid[old_rows])
        headroom = max(self.headroom, needed, int(self.lengths.max()) // 4)
        self._allocate(self.lengths + needed + headroom, self.lengths,
                       keys.shape[-1], keys.dtype)
        rows = self._rows(self.lengths)
        self.key_buffer[rows], self.value_buffer[rows], self.valid[rows] = keys, values, valid

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append the q new tokens [B, Hkv, q, D] to every segment, in place."""
        B, H, q, D = key_states.shape
        if (B, H) != (self.batch, self.kv_heads):
            raise RuntimeError(f"mixkv: head-wise cache holds [{self.batch}, {self.kv_heads}] "
                               f"(rows, KV heads) but the model appended [{B}, {H}]")
        if q > self._spare:
            self._grow(q)
        # Segment s takes rows starts[s] + lengths[s] + (0 .. q-1): the (b, h, t) order of
        # key_states, computed without a host sync.
        rows = ((self.starts + self.lengths).unsqueeze(1)
                + torch.arange(q, device=self.device)).reshape(-1)
        self.key_buffer[rows] = key_states.reshape(B * H * q, D).to(self.key_buffer.dtype)
        self.value_buffer[rows] = value_states.reshape(B * H * q, D).to(self.value_buffer.dtype)
        self.valid[rows] = True
        self.lengths = self.lengths + q
        self._max_length += q
        self._spare -= q
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling) -> tuple[torch.Tensor, None]:
        """Attention of the q newest queries [B, Hq, q, D] over every segment: [B, q, Hq, D]."""
        out = torch.ops.mixkv.ragged_attention(
            query, self.key_buffer, self.value_buffer, self._starts32,
            self.lengths.int().view(self.batch, self.kv_heads), self.valid, scaling)
        return out, None

    # -- what the rest of transformers asks of a layer -------------------------------------
    def get_seq_length(self) -> int:
        return self._max_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers 5.3 and older pass this call's cache_position (a tensor) instead
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[-1]
        return self._max_length + int(query_length), 0

    def kept_tokens(self) -> torch.Tensor:
        """Tokens held per (row, KV head): [B, Hkv]."""
        return self.lengths.view(self.batch, self.kv_heads).clone()

    def held(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The held tokens in segment order ((row, KV head) major, then position): keys,
        values [T, D] and which are real [T] (T = the sum of ``kept_tokens()``)."""
        rows = self._rows(self.lengths)
        return self.key_buffer[rows], self.value_buffer[rows], self.valid[rows]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each (row, KV head) segment as a left-padded row of its own: keys, values
        [B * Hkv, longest, D] and the real-token mask [B * Hkv, longest] (False at padding)."""
        segment, local, slot, longest = segment_layout(self.lengths)
        rows = self.starts[segment] + local
        S, D = self.batch * self.kv_heads, self.key_buffer.shape[-1]
        keys = self.key_buffer.new_zeros(S, longest, D)
        values = self.value_buffer.new_zeros(S, longest, D)
        mask = torch.zeros(S, longest, dtype=torch.bool, device=self.device)
        keys[segment, slot] = self.key_buffer[rows]
        values[segment, slot] = self.value_buffer[rows]
        mask[segment, slot] = self.valid[rows]
        return keys, values, mask

    def nbytes(self) -> int:
        """Bytes of the K/V buffers (headroom included)."""
        return self.key_buffer.nbytes + self.value_buffer.nbytes

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("mixkv: a head-wise compressed cache cannot be cropped, "
                                  "reordered (beam search) or re-batched")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported


def segment_layout(lengths: torch.Tensor):
    """Segments of these ``lengths`` [S] laid out left-padded in [S, longest]: for every token,
    in segment order, its segment, its index in the segment and its slot
    (longest - length + index); and longest."""
    longest = int(lengths.max()) if len(lengths) else 0
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    local = torch.arange(int(lengths.sum()), device=lengths.device) - \
        torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    return segment, local, longest - lengths[segment] + local, longest
