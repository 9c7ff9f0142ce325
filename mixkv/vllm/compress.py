"""One request's selection in one layer, from vLLM's packed tensors; no vLLM import here.

The backend hands over the prefill rows of a request as vLLM lays them out ([tokens, heads,
D]); the method sees them as mixkv.patch's shim would (``Prefill``, [1, heads, tokens, D]), so
every uniform scorer works, fused (``torch.ops.mixkv.compress``) or not.
"""

from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from ..methods import Method, Prefill


def select(method: Method, queries: Tensor, keys: Tensor, values: Tensor, kept: int, *,
           layer: int, num_layers: int, scale: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """Kept keys and values ``[kept, Hkv, D]`` (rank j of every head in row j: the form
    vLLM's reshape-and-cache op writes as one token per row) and their prompt positions
    ``[Hkv, kept]``, of a prompt whose post-RoPE ``queries`` ``[N, Hq, D]``, ``keys`` and
    ``values`` ``[N, Hkv, D]`` this layer saw."""
    W = method.window
    prefill = Prefill(queries=queries[-W:].transpose(0, 1)[None],
                      keys=keys.transpose(0, 1)[None], values=values.transpose(0, 1)[None],
                      key_mask=None, window=W, layer=layer, num_layers=num_layers,
                      scaling=scale)
    chosen = method.compress(prefill, kept)
    if chosen.offsets is not None or chosen.keys.shape[-2] != kept:
        raise RuntimeError(f"mixkv: method {method.label!r} did not keep {kept} tokens per head "
                           "in a dense selection, which the vLLM plugin needs")
    return (chosen.keys[0].transpose(0, 1).contiguous(),
            chosen.values[0].transpose(0, 1).contiguous(), chosen.positions[0])
