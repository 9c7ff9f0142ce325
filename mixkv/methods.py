"""What a user picks: a compression method and its budget, resolved into op options.

Methods (docs/design.md section 6): ``full`` (no compression), ``random``, ``streamingllm``
(attention sinks + the most recent tokens), ``knorm`` (lowest key norm), ``vnorm`` (importance +
value norm), ``snapkv``, ``pyramidkv``, ``adakv`` (attention importance with uniform, pyramid or
adaptive budgets), ``keydiff`` (diversity only), ``mix3`` and ``mixkv``. ``mixkv`` and the
score-only methods (vnorm, keydiff, mix3) run on a ``base`` that decides how many tokens each
head keeps: "snapkv" (uniform), "pyramidkv", "adakv" or "explicit" (per-head capacity weights
from a profile), so any base runs plain (``method=base``) or "+MixKV" (``method="mixkv",
base=...``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Union

import torch

METHODS = ("full", "random", "streamingllm", "knorm", "vnorm", "snapkv", "pyramidkv", "adakv",
           "keydiff", "mix3", "mixkv")
BASES = {"snapkv": "uniform", "pyramidkv": "pyramid", "adakv": "adaptive", "explicit": "explicit"}
# Methods whose scores come from the fused op, with their mix mode.
OP_MODES = {"snapkv": "attn", "pyramidkv": "attn", "adakv": "attn", "vnorm": "vnorm",
            "keydiff": "keydiff", "mix3": "mix3", "mixkv": "mixkv"}
# Methods that score tokens in Python and select with torch.ops.mixkv.select_kv.
PLAIN_SCORES = ("random", "streamingllm", "knorm")


@dataclasses.dataclass(frozen=True)
class Method:
    """A resolved method: everything the shim needs to compress one layer."""

    name: str
    budget: Optional[int] = None       # tokens kept per head, window included
    ratio: Optional[float] = None      # or: fraction of the prompt removed (kvpress convention)
    window: int = 32
    pool_kernel: int = 5
    pooling: str = "avg"
    gqa_reduce: str = "mean"
    policy: str = "uniform"            # uniform | pyramid | adaptive | explicit
    redundancy: Optional[torch.Tensor] = None   # [L, Hkv] offline profile, or None = online
    profile: Optional[torch.Tensor] = None      # [L, Hkv] capacity weights for policy explicit
    floor_alpha: float = 0.2
    pyramid_beta: int = 20
    sinks: int = 4
    seed: int = 0

    @property
    def mode(self) -> Optional[str]:
        return OP_MODES.get(self.name)

    @property
    def headwise(self) -> bool:
        """Per-head or per-layer capacities need the head-wise cache."""
        return self.policy != "uniform"

    def budget_for(self, prompt_len: int) -> int:
        """Tokens to keep per head for a prompt of this length (window included)."""
        if self.budget is not None:
            return self.budget
        return max(self.window + 1, int(round(prompt_len * (1.0 - self.ratio))))


def _load_profile(value, what: str) -> Optional[torch.Tensor]:
    if value is None or (isinstance(value, str) and value == "online"):
        return None
    if isinstance(value, (str, os.PathLike)):
        loaded = torch.load(value, map_location="cpu", weights_only=True)
        value = loaded[what] if isinstance(loaded, dict) else loaded
    profile = torch.as_tensor(value, dtype=torch.float32).cpu()
    if profile.dim() != 2:
        raise ValueError(f"mixkv: {what} profile must be [num_layers, num_kv_heads], "
                         f"got shape {tuple(profile.shape)}")
    if not torch.isfinite(profile).all() or (profile < 0).any():
        raise ValueError(f"mixkv: {what} profile must hold finite values >= 0")
    return profile


def resolve(method: str = "mixkv", *, budget: Optional[int] = None,
            ratio: Optional[float] = None, window: int = 32, pool_kernel: int = 5,
            pooling: str = "avg", gqa_reduce: str = "mean", base: str = "snapkv",
            redundancy: Union[str, os.PathLike, torch.Tensor, None] = "online",
            profile: Union[str, os.PathLike, torch.Tensor, None] = None,
            floor_alpha: float = 0.2, pyramid_beta: int = 20, sinks: int = 4,
            seed: int = 0) -> Method:
    """Validate the user's choice and turn it into a :class:`Method` (clear errors on bad input)."""
    if method not in METHODS:
        raise ValueError(f"mixkv: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if base not in BASES:
        raise ValueError(f"mixkv: unknown base {base!r}; choose one of {', '.join(BASES)}")
    if method != "full":
        if (budget is None) == (ratio is None):
            raise ValueError("mixkv: give exactly one of budget= (tokens kept per head, window "
                             "included) or ratio= (fraction of the prompt removed)")
        if budget is not None and budget <= window:
            raise ValueError(f"mixkv: budget ({budget}) must be larger than window ({window}): "
                             "the budget counts the window")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"mixkv: ratio must be in [0, 1), got {ratio}")
    if window < 1:
        raise ValueError(f"mixkv: window must be >= 1, got {window}")
    # The base decides the capacities of mixkv and the score-only modes; the named baselines
    # carry their own.
    policy = {"snapkv": "uniform", "pyramidkv": "pyramid", "adakv": "adaptive"}.get(method)
    if policy is None:
        policy = BASES[base] if method in ("mixkv", "vnorm", "keydiff", "mix3") else "uniform"
    if method in PLAIN_SCORES and base != "snapkv":
        raise ValueError(f"mixkv: method {method!r} keeps a uniform budget; base={base!r} "
                         "applies to mixkv, vnorm, keydiff and mix3")
    redundancy_profile = _load_profile(redundancy, "redundancy")
    if redundancy_profile is not None and method != "mixkv":
        raise ValueError("mixkv: an offline redundancy profile is only used by method 'mixkv'")
    capacity_profile = _load_profile(profile, "profile")
    if policy == "explicit" and capacity_profile is None:
        raise ValueError("mixkv: base='explicit' needs profile=[num_layers, num_kv_heads] "
                         "(a tensor or a file saved with torch.save)")
    return Method(name=method, budget=budget, ratio=ratio, window=window,
                  pool_kernel=pool_kernel, pooling=pooling, gqa_reduce=gqa_reduce, policy=policy,
                  redundancy=redundancy_profile, profile=capacity_profile,
                  floor_alpha=floor_alpha, pyramid_beta=pyramid_beta, sinks=sinks, seed=seed)
