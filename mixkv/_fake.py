"""Fake (meta) kernels of the ops whose output length depends on the data.

select_kv_ragged and compress_ragged return as many rows as the per-head capacities add up to,
which only the data knows: a C++ Meta kernel cannot express that, so their fake kernels create
an unbacked size here (as torch.nonzero does). The fixed-shape ops have C++ Meta kernels.
"""

import torch

from .constants import DEFAULT_WINDOW


def _ragged(keys, values, scores_like_batch_heads):
    B, Hkv = scores_like_batch_heads
    total = torch.library.get_ctx().new_dynamic_size()
    D = keys.shape[-1]
    return (keys.new_empty(total, D), values.new_empty(total, D),
            keys.new_empty(total, dtype=torch.int32),
            keys.new_empty(B * Hkv + 1, dtype=torch.int32))


@torch.library.register_fake("mixkv::select_kv_ragged")
def _select_kv_ragged_fake(scores, keys, values, capacity, window, key_mask=None):
    return _ragged(keys, values, keys.shape[:2])


@torch.library.register_fake("mixkv::compress_ragged")
def _compress_ragged_fake(q_window, keys, values, key_mask, budget, window=DEFAULT_WINDOW, *args, **kwargs):
    return _ragged(keys, values, keys.shape[:2])
