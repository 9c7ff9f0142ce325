"""Which inputs each score mode of ``torch.ops.mixkv.mix_scores`` reads (docs/design.md section
4, step 5): the one Python table, used by the mixers, the kvpress presses and the demo.
``csrc/mixkv/mix.h`` says the same in C++ and ``mixkv.reference`` keeps its own copy on purpose
(the independent oracle); tests/methods/test_methods.py checks that the three agree."""

from __future__ import annotations

from typing import Dict, FrozenSet

VALUE_NORM, DIVERSITY, REDUNDANCY = "value_norm", "diversity", "redundancy"

# Every mode reads the importance A; these are the other inputs, in the demo's order.
MODE_INPUTS: Dict[str, FrozenSet[str]] = {
    "attn": frozenset(),                                  # S = A (SnapKV)
    "vnorm": frozenset({VALUE_NORM}),                     # S = A + V~
    "keydiff": frozenset({DIVERSITY}),                    # S = D~
    "mix3": frozenset({VALUE_NORM, DIVERSITY}),           # S = (A + V~ + D~) / 3
    "mixkv": frozenset({VALUE_NORM, DIVERSITY, REDUNDANCY}),  # S = r D~ + (1 - r)(A + V~)
}
MODES = tuple(MODE_INPUTS)


def reads(mode: str, what: str) -> bool:
    """Whether score mode `mode` reads input `what` (value_norm, diversity, redundancy)."""
    return what in MODE_INPUTS[mode]
