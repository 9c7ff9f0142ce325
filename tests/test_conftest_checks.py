"""The shared checks of conftest.py must reject what they exist to reject: a check that accepts
a wrong op guards nothing."""

import pytest
import torch

from conftest import assert_same_selection

# Candidates 2 and 3 tie at the boundary of a top-3 selection; 0 is the best, 4 the worst.
SCORES = torch.tensor([9.0, 5.0, 3.0, 3.0, 1.0])
REFERENCE = [0, 1, 2]


def test_same_selection_passes():
    assert_same_selection([0, 1, 2], REFERENCE, SCORES, C=5)


def test_a_boundary_tie_may_swap():
    assert_same_selection([0, 1, 3], REFERENCE, SCORES, C=5)


@pytest.mark.parametrize("op_kept", [
    [0, 1, 4],  # the worst candidate instead of a tied one
    [1, 3, 4],  # one legal tie swap, plus the worst candidate instead of the best
    [1, 2, 4],  # the worst instead of the best, no tie involved
])
def test_a_swap_beyond_a_tie_fails(op_kept):
    with pytest.raises(AssertionError, match="beyond a tie"):
        assert_same_selection(op_kept, REFERENCE, SCORES, C=5)


def test_dropping_the_window_fails():
    with pytest.raises(AssertionError, match="window"):
        assert_same_selection([0, 1, 5], REFERENCE, torch.tensor([9.0, 5, 3, 3, 1, 0]), C=5)
