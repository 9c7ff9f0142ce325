"""Expected-attention variants for ``mixkv-eval --import benchmarks/ea_variants.py``
(benchmarks/RESULTS.md, "Expected attention against kvpress"):

- ``expected_attention_sinks0``: mixkv's scorer as it was before its ``sinks`` option
  (``sinks=0``: no token forced, the softmax over every real key);
- ``expected_attention_lb``: the scorer of kvpress's leaderboard entry "expected_attention"
  (kvpress evaluation/evaluate_registry.py: ``AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))``),
  to be run as ``expected_attention_lb+adakv``.
"""

from mixkv.methods import register_scorer
from mixkv.methods.scorers import ExpectedAttention


@register_scorer("expected_attention_sinks0")
class ExpectedAttentionSinks0(ExpectedAttention):
    def __init__(self, sinks: int = 0, **options):
        super().__init__(sinks=sinks, **options)


@register_scorer("expected_attention_lb")
class ExpectedAttentionLeaderboard(ExpectedAttention):
    def __init__(self, epsilon: float = 1e-2, **options):
        super().__init__(epsilon=epsilon, **options)
