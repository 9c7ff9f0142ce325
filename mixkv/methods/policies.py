"""The budget policies, registered under the base names of ``"NAME+BASE"``: snapkv (uniform),
pyramidkv (pyramid), adakv (adaptive), explicit (a capacity profile), global (one top-k over
every compressed layer and head). docs/design.md section 4, step 6, defines each;
``torch.ops.mixkv.head_budgets`` computes the first four, :func:`global_capacities` the last."""

from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Sequence, Union

import torch
from torch import Tensor

from .base import (BudgetPolicy, Prefill, load_profile, options_dataclass, profile_row,
                   register_policy)


@register_policy("snapkv")
@options_dataclass
class Uniform(BudgetPolicy):
    """Every head keeps the same number of candidates (SnapKV): a dense cache."""

    headwise: ClassVar[bool] = False
    op_policy: ClassVar[str] = "uniform"


@register_policy("pyramidkv")
@options_dataclass
class PyramidKV(BudgetPolicy):
    """Per-layer capacities, linear from 2c - c//beta (first layer) down to c//beta (PyramidKV).
    ``Pyramid`` is the same class."""

    op_policy: ClassVar[str] = "pyramid"

    pyramid_beta: int = 20

    def op_arguments(self, p: Prefill) -> Dict[str, Any]:
        return dict(super().op_arguments(p), pyramid_beta=self.pyramid_beta)


@register_policy("adakv")
@options_dataclass
class AdaKV(BudgetPolicy):
    """Each head's share of the layer's global top-k importance, floored (AdaKV; the op's
    policy "adaptive"). ``Adaptive`` is the same class."""

    op_policy: ClassVar[str] = "adaptive"

    floor_alpha: float = 0.2
    normalize: bool = True

    def op_arguments(self, p: Prefill) -> Dict[str, Any]:
        return dict(super().op_arguments(p), floor_alpha=self.floor_alpha,
                    normalize=self.normalize)


@register_policy("explicit")
@options_dataclass
class Explicit(BudgetPolicy):
    """Per-head weights from an [L, Hkv] capacity ``profile`` split each layer's total
    (a tensor or a torch.save file; loaded into a float32 tensor)."""

    op_policy: ClassVar[str] = "explicit"

    profile: Union[Tensor, str, None] = None

    def __post_init__(self):
        self.profile = load_profile(self.profile, "profile")
        if self.profile is None:
            raise ValueError("mixkv: base='explicit' needs profile=[num_layers, num_kv_heads] "
                             "(a tensor or a file saved with torch.save)")

    def op_arguments(self, p: Prefill) -> Dict[str, Any]:
        return dict(super().op_arguments(p), profile=profile_row(self.profile, "capacity", p))


def global_capacities(importances: Sequence[Tensor], real: Sequence[Tensor], capacity: int,
                      where: str = "global", floor: int = 0) -> List[Tensor]:
    """One top-k per batch row over every layer's and head's candidates: how many of them each
    (layer, row, head) has among the row's ``capacity x Hkv x layers`` best (all of its real
    candidates if it has fewer).

    ``importances``: per layer [B, Hkv, C_l] (C_l may differ between layers); ``real``: per
    layer [B, Hkv, C_l] or [B, C_l] bool, the candidates that compete (others count 0).
    Ranked by importance, higher first; equal importance goes to the lower (layer, head,
    position), so the result is deterministic. ``floor``: each head's ``min(floor, capacity)``
    best real candidates are taken first (0: no floor). Returns [B, Hkv] int32 per layer; the
    counts of a row sum to min(capacity x Hkv x layers, its real candidates)."""
    if capacity < 0:
        raise ValueError(f"mixkv: policy {where!r}: capacity must be >= 0, got {capacity}")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"mixkv: policy {where!r}: floor must be an int >= 0, got {floor!r}")
    floor = min(floor, capacity)
    if not importances:
        return []
    B, Hkv = importances[0].shape[:2]
    flat, sizes = [], []
    for layer, (x, r) in enumerate(zip(importances, real)):
        if x.dim() != 3 or tuple(x.shape[:2]) != (B, Hkv):
            raise ValueError(f"mixkv: policy {where!r}: importance of layer {layer} has shape "
                             f"{tuple(x.shape)}, expected [{B}, {Hkv}, candidates]")
        r = r.to(device=x.device, dtype=torch.bool)
        if r.dim() == 2 and tuple(r.shape) == (B, x.shape[-1]):
            r = r[:, None, :].expand_as(x)
        if tuple(r.shape) != tuple(x.shape):
            raise ValueError(f"mixkv: policy {where!r}: real-candidate mask of layer {layer} "
                             f"has shape {tuple(r.shape)}, expected {tuple(x.shape)}")
        x = x.float()
        if not bool(torch.isfinite(x[r]).all()):
            raise ValueError(f"mixkv: policy {where!r}: importance of layer {layer} is NaN or "
                             "infinite at a real candidate")
        x = torch.where(r, x, float("-inf"))
        if floor:   # a head's best `floor` real candidates go first: +inf
            order = torch.sort(x, dim=-1, descending=True, stable=True).indices
            first = torch.zeros_like(r).scatter_(
                -1, order, torch.arange(x.shape[-1], device=x.device).expand_as(x) < floor)
            x = torch.where(first & r, float("inf"), x)
        flat.append(x.reshape(B, -1))
        sizes.append(x.shape[1] * x.shape[2])
    scores = torch.cat([f.to(flat[0].device) for f in flat], dim=1)          # [B, total]
    real_count = (scores > float("-inf")).sum(1)                              # [B]
    k = torch.clamp(real_count, max=capacity * Hkv * len(importances))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.arange(scores.shape[1], device=scores.device).expand(B, -1)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, rank < k[:, None])
    out = []
    for part, x in zip(chosen.split(sizes, dim=1), importances):
        out.append(part.reshape(x.shape).sum(-1).to(torch.int32).to(x.device))
    return out


@register_policy("global")
@options_dataclass
class Global(BudgetPolicy):
    """One top-k over every compressed layer's and KV head's candidates (KVzip's "pair" level,
    kvpress's KVzipPress with ``layerwise=False``): the whole cache keeps budget x Hkv x layers
    tokens, the window of every head included, and each head's share follows its candidates'
    importance, raw (no normalisation: attention probabilities, as KVzip's and SnapKV's
    importance are, share one scale across layers). ``floor`` (0, as kvpress and the official
    code): candidates each head keeps before the global top-k (its best ones); every head keeps
    its window anyway. Needs every layer's scores, so the shim compresses after the whole
    prefill. On one layer alone (``capacities``) it is the layer's own top-k over its heads."""

    spans_layers: ClassVar[bool] = True

    floor: int = 0

    def __post_init__(self):
        if isinstance(self.floor, bool) or not isinstance(self.floor, int) or self.floor < 0:
            raise ValueError(f"mixkv: policy 'global': floor must be an int >= 0, got "
                             f"{self.floor!r}")

    def capacities(self, importance: Tensor, capacity: int, prefill: Prefill) -> Tensor:
        return self.layer_capacities({prefill.layer: importance}, capacity,
                                     {prefill.layer: prefill})[prefill.layer]

    def layer_capacities(self, importances: Dict[int, Tensor], capacity: int,
                         prefills: Dict[int, Prefill]) -> Dict[int, Tensor]:
        layers = sorted(importances)
        counts = self.split([importances[i] for i in layers],
                            [prefills[i].real_candidates() for i in layers], capacity)
        return dict(zip(layers, counts))

    def split(self, importances: Sequence[Tensor], real: Sequence[Tensor],
              capacity: int) -> List[Tensor]:
        """:func:`global_capacities` with this policy's floor (``real`` per layer [B, C] or
        per head [B, Hkv, C]; decoding splits per-head segments with it)."""
        return global_capacities(importances, real, capacity, self.label, self.floor)


# Former class names, the same classes (docs/design.md section 6, "One spelling").
Pyramid, Adaptive = PyramidKV, AdaKV
