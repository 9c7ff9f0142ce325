"""Shared helpers of the tests: random inputs, padding masks, shape tables, tie-aware
comparisons, torch's thread count. A plain module (``from helpers import ...``), not a conftest:
every test folder may have a conftest.py of its own."""

import contextlib
import itertools
import re

import pytest
import torch

import mixkv  # noqa: F401  (loads the op library)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 80, 128]
GROUPS = [1, 2, 4, 8]
BATCHES = [1, 3]
WINDOW = 8


def lengths_for(window):
    return [window, window + 1, 97, 1025]


def shape_cases():
    """Covering set of (B, Hq, Hkv, N, D, dtype, padded): every N x dtype x padding, with head
    dims, GQA groups and batch sizes cycled so each value appears with each N."""
    cases = []
    for i, (N, dtype, padded) in enumerate(
            itertools.product(lengths_for(WINDOW), DTYPES, [False, True])):
        G = GROUPS[i % len(GROUPS)]
        Hkv = 2 if G < 8 else 1
        cases.append(pytest.param(BATCHES[(i // 2) % 2], G * Hkv, Hkv, N, HEAD_DIMS[i % 3], dtype,
                                  padded, id=f"N{N}-{str(dtype)[6:]}-G{G}-{'pad' if padded else 'nopad'}"))
    return cases


def make_inputs(B, Hq, Hkv, N, D, dtype, padded, window=WINDOW, seed=0):
    """Random q_window/keys/values (never zero) and a left-padding key_mask (or None)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, window, D, generator=g).to(dtype)
    k = (torch.randn(B, Hkv, N, D, generator=g) + 0.3 * torch.randn(1, Hkv, 1, D, generator=g)).to(dtype)
    v = torch.randn(B, Hkv, N, D, generator=g).to(dtype)
    mask = None
    if padded:
        mask = torch.ones(B, N, dtype=torch.bool)
        for b in range(1, B):  # row 0 unpadded; others lose a random share of the candidates
            mask[b, : int(torch.randint(1, max(2, N - window), (1,), generator=g))] = False
        if B == 1:
            mask[0, : (N - window) // 3] = False
    return q, k, v, mask


def exactly(message):
    """A pytest.raises pattern that matches `message` in full."""
    return "^" + re.escape(message) + "$"


def close(actual, expected, rel=1e-4):
    """float32 comparison with tolerance relative to the magnitude of the expected values."""
    expected = expected.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected, rtol=rel, atol=rel * max(scale, 1e-30))


def assert_same_selection(op_kept, ref_kept, ref_scores, C, rel=1e-4):
    """Kept positions of one head compared as sets. A difference is legal only between
    candidates whose reference scores tie (within rounding) at the selection boundary: the op
    and the reference accumulate in a different order, so near-equal scores may swap."""
    op_set, ref_set = set(op_kept), set(ref_kept)
    assert len(op_kept) == len(ref_kept)
    if op_set == ref_set:
        return
    only_op, only_ref = op_set - ref_set, ref_set - op_set
    assert all(j < C for j in only_op | only_ref), "the window must always be kept"
    scale = ref_scores.abs().max().item()
    # Every swapped pair must tie, so the farthest one decides: the best candidate only the
    # reference kept against the worst one only the op kept.
    highest_ref = max(ref_scores[j].item() for j in only_ref)
    lowest_op = min(ref_scores[j].item() for j in only_op)
    assert highest_ref - lowest_op <= rel * scale, (
        f"selection differs beyond a tie: op kept {sorted(only_op)}, reference {sorted(only_ref)}")


def unmatched_rows(got, want, atol):
    """Rows of `got` and of `want` ([k, D] each, e.g. one head's kept keys from two runs that
    drift by float rounding) that have no partner within `atol` in the other: (index tensors)."""
    close = ((got[:, None, :] - want[None, :, :]).abs().amax(-1) <= atol)   # [k_got, k_want]
    return (~close.any(1)).nonzero().flatten(), (~close.any(0)).nonzero().flatten()


def assert_same_kept_rows(got, want, atol, score=None, tie=0.0) -> bool:
    """One head's kept rows from two runs are the same tokens (within `atol`), or differ only
    by tokens whose scores (`score`: rows -> [k] scores, None: no difference allowed) all tie
    within `tie`: rounding that differs between the runs (a batch and a single row, one CPU's
    vectorised reductions and another's) may flip a near-tie at the selection boundary.
    Returns whether a tie flipped, so that callers can assert flips stay rare."""
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    only_got, only_want = unmatched_rows(got, want, atol)
    if not len(only_got) and not len(only_want):
        return False
    assert score is not None, f"kept rows differ: {only_got.tolist()} vs {only_want.tolist()}"
    swapped = torch.cat([score(got[only_got]), score(want[only_want])])
    spread = (swapped.max() - swapped.min()).item()
    assert spread <= tie, (f"kept rows differ beyond a tie: scores {swapped.tolist()} spread "
                           f"{spread:.3g} > {tie}")
    return True


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block, then as before."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


WORDS = ("the keeper wrote down the wind and the sea every night while the lamp turned "
         "slowly above the rocks and the gulls waited for the weather to change ").split()


def document(words: int, seed: int = 0) -> str:
    """A plain-text document of `words` words, a paragraph break every 40 (corpus tests)."""
    lines = []
    for i in range(words):
        lines.append(WORDS[(i * 7 + seed) % len(WORDS)] + ("\n\n" if i % 40 == 39 else " "))
    return "".join(lines).strip()
