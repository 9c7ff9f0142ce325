"""Defined behaviour on adversarial inputs: ties, all-equal scores, huge/tiny magnitudes, one
candidate, rows shorter than the window, prompt shorter than the budget. No NaN ever leaks.
Every test runs with the CPU's fast row kernels and with the portable ones."""

import pytest
import torch

from mixkv import ops, reference as R

from helpers import make_inputs

W = 4

pytestmark = pytest.mark.usefixtures("cpu_kernels")


def test_all_equal_scores_keep_the_earliest_positions():
    k = torch.randn(2, 2, 20, 16)
    scores = torch.full((2, 2, 16), 0.5)
    keys, _, idx = ops.select_kv(scores, k, k, 5, W)
    expected = list(range(5)) + list(range(16, 20))
    assert (idx == torch.tensor(expected, dtype=torch.int32)).all()
    assert torch.equal(keys, k[:, :, expected])


def test_ties_go_to_the_lower_position():
    k = torch.randn(1, 1, 10, 8)
    scores = torch.tensor([[[0.1, 0.9, 0.5, 0.9, 0.9, 0.2]]])
    _, _, idx = ops.select_kv(scores, k, k, 2, W)
    assert idx[0, 0].tolist() == [1, 3, 6, 7, 8, 9]


def test_constant_inputs_give_finite_scores():
    """All-equal keys/values/queries: every statistic is constant, normalisation must yield zeros
    (not 0/0) and redundancy is 1. Diversity is then constant, so keydiff falls back to the
    earliest positions; attention is constant too except at the two ends, where avg pooling
    counts the zero padding, so attn prefers the earliest positions away from the ends."""
    q = torch.ones(1, 4, W, 32)
    k = torch.ones(1, 2, 40, 32)
    v = torch.ones(1, 2, 40, 32)
    A = ops.window_importance(q, k)
    V = ops.value_norm(v, W)
    Dv, r = ops.key_diversity(k, W)
    assert torch.allclose(r, torch.ones(1, 2))
    for mode in R.MODES:
        S = ops.mix_scores(A, V, Dv, r, mode)
        assert torch.isfinite(S).all()
        torch.testing.assert_close(S, R.mix_scores(A, V, Dv, r, mode))
    _, _, idx = ops.compress(q, k, v, budget=W + 6, window=W, mode="keydiff")
    assert idx[0, 0].tolist() == list(range(6)) + list(range(36, 40))
    _, _, idx = ops.compress(q, k, v, budget=W + 6, window=W, mode="attn")
    assert idx[0, 0].tolist() == list(range(2, 8)) + list(range(36, 40))


@pytest.mark.parametrize("magnitude", [1e-20, 1e-4, 1e4, 6e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_magnitudes(magnitude, dtype):
    if dtype == torch.float16 and magnitude < 1e-6:
        magnitude = 1e-6  # below float16's subnormals everything is zero, tested separately
    q, k, v, mask = make_inputs(2, 4, 2, 50, 64, torch.float32, True, window=W)
    q, k, v = [(t / t.abs().max() * magnitude).to(dtype) for t in (q, k, v)]
    A = ops.window_importance(q, k, mask)
    _, r = ops.key_diversity(k, W, mask)
    for out in [A, ops.value_norm(v, W, mask), *ops.key_diversity(k, W, mask)]:
        assert torch.isfinite(out).all()
    for mode in R.MODES:
        keys, values, idx = ops.compress(q, k, v, mask, budget=W + 10, window=W, mode=mode)
        assert torch.isfinite(keys.float()).all() and idx.shape == (2, 2, W + 10)
    torch.testing.assert_close(A, R.window_importance(q, k, mask), rtol=1e-4, atol=1e-6)


def test_zero_keys_do_not_divide_by_zero():
    k = torch.zeros(1, 1, 12, 8)
    diversity, redundancy = ops.key_diversity(k, W)
    assert torch.equal(diversity, torch.zeros(1, 1, 8)) and torch.isfinite(redundancy).all()


def test_one_candidate():
    q, k, v, _ = make_inputs(1, 2, 1, W + 1, 16, torch.float32, False, window=W)
    keys, _, idx = ops.compress(q, k, v, budget=W + 1, window=W)
    assert idx[0, 0].tolist() == list(range(W + 1))
    A = ops.window_importance(q, k)
    torch.testing.assert_close(A, R.window_importance(q, k))


def test_window_equals_prompt():
    q, k, v, _ = make_inputs(2, 4, 2, W, 16, torch.float32, False, window=W)
    assert ops.window_importance(q, k).shape == (2, 2, 0)
    keys, values, idx = ops.compress(q, k, v, budget=W + 3, window=W)
    assert torch.equal(keys, k) and idx.shape == (2, 2, W)


def test_row_shorter_than_the_window():
    """A row with fewer real tokens than W: its padded window queries see nothing and contribute
    nothing; the row keeps all its real tokens and stays left padded."""
    q, k, v, _ = make_inputs(2, 4, 2, 30, 16, torch.float32, False, window=W)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, :28] = False  # 2 real tokens, both inside the window
    A = ops.window_importance(q, k, mask)
    assert torch.isfinite(A).all() and (A[1] == 0).all()
    torch.testing.assert_close(A, R.window_importance(q, k, mask))
    _, r = ops.key_diversity(k, W, mask)
    assert torch.isfinite(r).all()
    keys, _, idx = ops.compress(q, k, v, mask, budget=W + 5, window=W)
    assert idx[1, 0].tolist() == [0, 1, 2, 3, 4] + list(range(26, 30))
    assert torch.equal(idx, R.compress(q, k, v, mask, W + 5, W)[2])


def test_padding_is_never_kept_while_real_candidates_remain():
    q, k, v, mask = make_inputs(3, 4, 2, 97, 64, torch.float32, True)
    real = mask[:, : 97 - 8].sum(-1)
    keys, values, idx = ops.compress(q, k, v, mask, budget=8 + 20, window=8)
    for b in range(3):
        kept_real = mask[b, idx[b].long()]
        expected_pads = max(0, 20 - real[b].item())
        assert (~kept_real).sum(-1).tolist() == [expected_pads] * 2
        # padded slots come first: the output is itself left padded
        assert kept_real.int().diff(dim=-1).min() >= 0


def test_padded_row_matches_the_row_alone():
    """A left-padded row selects exactly the tokens it selects when run alone, unpadded."""
    q, k, v, mask = make_inputs(3, 8, 2, 120, 64, torch.float32, True, window=8)
    for policy in ["uniform", "adaptive", "pyramid"]:
        batched = ops.compress(q, k, v, mask, budget=40, window=8, policy=policy, num_layers=3)
        for b in range(3):
            pads = int((~mask[b]).sum())
            alone = ops.compress(q[b:b + 1], k[b:b + 1, :, pads:], v[b:b + 1, :, pads:],
                                 budget=40, window=8, policy=policy, num_layers=3)
            if policy == "uniform":
                row_idx = batched[2][b]
                real = row_idx[row_idx >= pads] - pads
                assert torch.equal(real.view(2, -1), alone[2][0])
            else:
                offsets, alone_offsets = batched[3], alone[3]
                for h in range(2):
                    seg = batched[2][offsets[b * 2 + h]:offsets[b * 2 + h + 1]]
                    alone_seg = alone[2][alone_offsets[h]:alone_offsets[h + 1]]
                    assert torch.equal(seg - pads, alone_seg), (policy, b, h)


def test_non_finite_user_scores_are_rejected_but_ignored_at_padding():
    g = torch.Generator().manual_seed(5)
    k = torch.randn(1, 1, 12, 8, generator=g)
    scores = torch.rand(1, 1, 8, generator=g)
    scores[0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="mixkv::select_kv: scores must be finite"):
        ops.select_kv(scores, k, k, 2, W)
    with pytest.raises(ValueError, match="mixkv::select_kv_ragged: scores must be finite"):
        ops.select_kv(scores, k, k, torch.tensor([[2]], dtype=torch.int32), W)
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[0, :4] = False
    _, _, idx = ops.select_kv(scores, k, k, 2, W, mask)
    assert all(j >= 4 for j in idx[0, 0, :2].tolist())


def test_long_left_padding_with_very_negative_logits_stays_finite():
    # The CPU kernel runs its softmax block by block (512 keys) against a running max: a
    # block of padding only, followed by real keys with logits near -150, must give the
    # reference's importance and never inf * 0 = NaN.
    torch.manual_seed(3)
    N, pad, D = 1300, 700, 16
    direction = torch.randn(D)
    keys = (direction + 0.05 * torch.randn(1, 2, N, D)) * 4.0
    q_window = -(direction + 0.05 * torch.randn(1, 4, W, D)) * 4.0 * 4.0  # logits ~ -150 * 4
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[:, :pad] = False
    got = ops.window_importance(q_window, keys, mask)
    want = R.window_importance(q_window, keys, mask)
    assert torch.isfinite(got).all()
    assert (got[..., :pad] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_inputs_that_require_grad_are_accepted():
    # Models run without torch.no_grad() hand the ops tensors that require grad; the scores
    # carry none, and the ops must not refuse them.
    q, k, v, _ = make_inputs(1, 4, 2, 40, 16, torch.float32, padded=False, window=W)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    keys, values, idx = torch.ops.mixkv.compress(q, k, v, None, 12, W)
    want_keys, _, want_idx = torch.ops.mixkv.compress(
        q.detach(), k.detach(), v.detach(), None, 12, W)
    assert torch.equal(idx, want_idx) and torch.equal(keys.detach(), want_keys)
