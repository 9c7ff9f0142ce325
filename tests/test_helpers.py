"""The shared checks of helpers.py must reject what they exist to reject: a check that accepts
a wrong op guards nothing."""

import pytest
import torch

from helpers import assert_same_selection

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


def test_kept_rows_may_differ_only_by_a_tie():
    from helpers import assert_same_kept_rows

    keys = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 2.0 + 1e-5]])
    norm = lambda rows: rows.norm(dim=-1)  # noqa: E731
    # the same rows, drifted by rounding: no flip
    assert not assert_same_kept_rows(keys[:3], keys[:3] + 1e-4, 1e-3)
    # row 1 and row 3 tie (norms 2 and 2 + 1e-5): a flip, accepted and reported
    assert assert_same_kept_rows(keys[:3], keys[[0, 3, 2]], 1e-6, norm, 1e-4)
    with pytest.raises(AssertionError, match="beyond a tie"):   # 2 against 1.41: no tie
        assert_same_kept_rows(keys[:2], keys[[0, 2]], 1e-6, norm, 1e-4)
    with pytest.raises(AssertionError, match="kept rows differ"):  # no score: no flip allowed
        assert_same_kept_rows(keys[:3], keys[[0, 3, 2]], 1e-6)
    with pytest.raises(AssertionError):  # a different count of kept rows
        assert_same_kept_rows(keys[:3], keys[:2], 1e-3, norm, 1.0)
