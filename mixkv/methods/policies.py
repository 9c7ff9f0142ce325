"""The budget policies, registered under the base names of ``"NAME+BASE"``: snapkv (uniform),
pyramidkv (pyramid), adakv (adaptive), explicit (a capacity profile). docs/design.md section 4,
step 6, defines each; ``torch.ops.mixkv.head_budgets`` computes them."""

from __future__ import annotations

from typing import Optional

from .base import BudgetPolicy, Prefill, Scorer, load_profile, profile_row, register_policy


@register_policy("snapkv")
class Uniform(BudgetPolicy):
    """Every head keeps the same number of candidates (SnapKV): a dense cache."""

    headwise = False
    op_policy = "uniform"


@register_policy("pyramidkv")
class Pyramid(BudgetPolicy):
    """Per-layer capacities, linear from 2c - c//beta (first layer) down to c//beta (PyramidKV)."""

    op_policy = "pyramid"

    def __init__(self, scorer: Optional[Scorer] = None, pyramid_beta: int = 20):
        super().__init__(scorer)
        self.pyramid_beta = pyramid_beta

    def op_arguments(self, p: Prefill) -> tuple:
        return (self.op_policy, 0.2, True, p.layer, p.num_layers, self.pyramid_beta, None)


@register_policy("adakv")
class Adaptive(BudgetPolicy):
    """Each head's share of the layer's global top-k importance, floored (AdaKV)."""

    op_policy = "adaptive"

    def __init__(self, scorer: Optional[Scorer] = None, floor_alpha: float = 0.2,
                 normalize: bool = True):
        super().__init__(scorer)
        self.floor_alpha, self.normalize = floor_alpha, normalize

    def op_arguments(self, p: Prefill) -> tuple:
        return (self.op_policy, self.floor_alpha, self.normalize, p.layer, p.num_layers, 20,
                None)


@register_policy("explicit")
class Explicit(BudgetPolicy):
    """Per-head weights from an [L, Hkv] capacity ``profile`` split each layer's total."""

    op_policy = "explicit"

    def __init__(self, scorer: Optional[Scorer] = None, profile=None):
        super().__init__(scorer)
        self.profile = load_profile(profile, "profile")
        if self.profile is None:
            raise ValueError("mixkv: base='explicit' needs profile=[num_layers, num_kv_heads] "
                             "(a tensor or a file saved with torch.save)")

    def op_arguments(self, p: Prefill) -> tuple:
        return (self.op_policy, 0.2, True, p.layer, p.num_layers, 20,
                profile_row(self.profile, "capacity", p))


# The names papers use for SnapKV's scorer under each policy.
PyramidKV, AdaKV = Pyramid, Adaptive
