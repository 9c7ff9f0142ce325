"""Every op against mixkv.reference on random inputs: odd lengths, head dims 64/80/128, GQA groups
1/2/4/8, batch 1 and 3, float32/bfloat16/float16, with and without left padding. Every test runs
with the CPU's fast row kernels (AVX2+FMA where available) and with the portable ones."""

import pytest
import torch

from mixkv import ops, reference as R

from helpers import WINDOW, assert_same_selection, close, make_inputs, shape_cases

W = WINDOW

pytestmark = pytest.mark.usefixtures("cpu_kernels")


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
@pytest.mark.parametrize("pooling,gqa_reduce", [("avg", "mean"), ("max", "max")])
def test_window_importance(B, Hq, Hkv, N, D, dtype, padded, pooling, gqa_reduce):
    q, k, _, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded)
    got = ops.window_importance(q, k, mask, 5, pooling, gqa_reduce)
    want = R.window_importance(q, k, mask, 5, pooling, gqa_reduce)
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, N - W)
    close(got, want)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("pool_kernel,scaling", [(1, None), (3, 0.05), (7, None)])
def test_window_importance_kernel_and_scaling(pool_kernel, scaling):
    q, k, _, mask = make_inputs(3, 8, 2, 97, 64, torch.float32, True)
    close(ops.window_importance(q, k, mask, pool_kernel, "avg", "mean", scaling),
          R.window_importance(q, k, mask, pool_kernel, "avg", "mean", scaling))


# Shapes the covering set above does not reach: window-query columns R = G * W that are not a
# multiple of 8 (zero-padded columns) or leave a 8/16/24-wide last panel of the tiled GEMM, head
# dims with a scalar tail (D % 8 != 0), and key counts past one 512-key block with a row tail.
ODD_WIDTHS = [  # (Hq, Hkv, window, N, D)
    (3, 1, 5, 1030, 72),     # R = 15 -> 16 columns
    (14, 2, 7, 600, 100),    # R = 49 -> 56 = 32 + 24
    (6, 2, 3, 514, 36),      # R = 9 -> 16
    (32, 4, 5, 1537, 128),   # R = 40 -> 32 + 8
    (9, 3, 33, 700, 64),     # R = 99 -> 104 = 3 * 32 + 8
]


@pytest.mark.parametrize("Hq,Hkv,window,N,D", ODD_WIDTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_ops_odd_widths(Hq, Hkv, window, N, D, dtype):
    q, k, v, mask = make_inputs(2, Hq, Hkv, N, D, dtype, True, window=window, seed=N)
    close(ops.window_importance(q, k, mask, 5, "avg", "mean"),
          R.window_importance(q, k, mask, 5, "avg", "mean"))
    close(ops.window_importance(q, k, mask, 3, "max", "max"),
          R.window_importance(q, k, mask, 3, "max", "max"))
    close(ops.value_norm(v, window, mask), R.value_norm(v, window, mask), rel=1e-5)
    diversity, redundancy = ops.key_diversity(k, window, mask)
    want_div, want_red = R.key_diversity(k, window, mask)
    close(diversity, want_div)
    torch.testing.assert_close(redundancy, want_red, rtol=1e-4, atol=1e-6)


def test_window_importance_far_tail_logits():
    """Logits spread over +-150 (scaling 4): most softmax weights underflow, the exp's cut-off
    below -87.3 included, and the result still matches the reference with nothing non-finite."""
    q, k, _, mask = make_inputs(2, 8, 2, 900, 64, torch.float32, True, window=6)
    got = ops.window_importance(q, k, mask, 5, "avg", "mean", 4.0)
    assert torch.isfinite(got).all()
    close(got, R.window_importance(q, k, mask, 5, "avg", "mean", 4.0))


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_value_norm(B, Hq, Hkv, N, D, dtype, padded):
    _, _, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded)
    got = ops.value_norm(v, W, mask)
    close(got, R.value_norm(v, W, mask), rel=1e-5)
    if mask is not None:
        assert (got[~mask[:, None, : N - W].expand_as(got)] == 0).all()


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_key_diversity(B, Hq, Hkv, N, D, dtype, padded):
    _, k, _, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded)
    diversity, redundancy = ops.key_diversity(k, W, mask)
    want_div, want_red = R.key_diversity(k, W, mask)
    close(diversity, want_div)
    torch.testing.assert_close(redundancy, want_red, rtol=1e-4, atol=1e-6)
    assert ((redundancy >= 0) & (redundancy <= 1)).all()


def test_redundancy_is_mean_pairwise_cosine():
    """The O(nD) formula equals the O(n^2 D) definition it replaces."""
    _, k, _, _ = make_inputs(2, 4, 2, 61, 64, torch.float32, False)
    unit = torch.nn.functional.normalize(k.float(), dim=-1)
    cos = unit @ unit.transpose(-1, -2)
    n = k.shape[2]
    pairwise = (cos.sum((-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))
    _, redundancy = ops.key_diversity(k, W)
    torch.testing.assert_close(redundancy, pairwise.clamp(0, 1), rtol=1e-4, atol=1e-6)
    assert (pairwise > 0).all()  # the shared direction in make_inputs makes keys redundant


@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("padded", [False, True])
def test_mix_scores(mode, padded):
    q, k, v, mask = make_inputs(3, 8, 2, 97, 64, torch.float32, padded)
    A = R.window_importance(q, k, mask)
    V = R.value_norm(v, W, mask)
    Dv, r = R.key_diversity(k, W, mask)
    got = ops.mix_scores(A, V, Dv, r, mode, mask)
    close(got, R.mix_scores(A, V, Dv, r, mode, mask))
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("policy", R.POLICIES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("capacity", [1, 17, 60, 200])
def test_head_budgets(policy, padded, capacity):
    q, k, _, mask = make_inputs(3, 16, 4, 97, 64, torch.float32, padded)
    A = R.window_importance(q, k, mask)
    profile = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) + 0.05
    args = (A, capacity, policy, 0.2, True, mask, 2, 6, 20, profile)
    got = ops.head_budgets(*args)
    assert got.dtype == torch.int32 and got.shape == (3, 4)
    assert torch.equal(got, R.head_budgets(*args))
    real = (torch.ones(3, 89, dtype=torch.bool) if mask is None else mask[:, :89]).sum(-1)
    assert (got <= real[:, None]).all() and (got >= 0).all()
    if policy != "pyramid":
        assert torch.equal(got.sum(-1), 4 * torch.clamp(real, max=capacity).int())


def test_pyramid_totals_over_layers():
    A = torch.rand(1, 2, 500)
    for c in [10, 64, 130, 300]:
        per_layer = [ops.head_budgets(A, c, "pyramid", layer=l, num_layers=7)[0, 0].item()
                     for l in range(7)]
        assert sum(per_layer) == 7 * c, (c, per_layer)
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] <= 500


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_select_kv(B, Hq, Hkv, N, D, dtype, padded):
    _, k, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded)
    scores = torch.rand(B, Hkv, N - W, generator=torch.Generator().manual_seed(3))
    for capacity in [0, 5, N]:
        got = ops.select_kv(scores, k, v, capacity, W, mask)
        want = R.select_kv(scores, k, v, capacity, W, mask)
        for a, b in zip(got, want):  # continuous random scores: no ties, exact match
            assert torch.equal(a, b)


@pytest.mark.parametrize("padded", [False, True])
def test_select_kv_ragged(padded):
    _, k, v, mask = make_inputs(3, 8, 4, 97, 80, torch.bfloat16, padded)
    scores = torch.rand(3, 4, 89)
    capacity = torch.randint(0, 120, (3, 4), dtype=torch.int32)
    got = ops.select_kv(scores, k, v, capacity, W, mask)
    want = R.select_kv_ragged(scores, k, v, capacity, W, mask)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    lengths = got[3].diff()
    assert torch.equal(lengths, (capacity.clamp(max=89) + W).flatten())


def _check_compress(got, q, k, v, mask, budget, ref_scores):
    """Kept indices vs the reference (tie-aware), and kept K/V are exactly the indexed rows."""
    keys, values, idx = got
    want_idx = R.compress(q, k, v, mask, budget, W)[2]
    B, Hkv, N, _ = k.shape
    assert idx.shape == want_idx.shape
    for b in range(B):
        for h in range(Hkv):
            assert_same_selection(idx[b, h].tolist(), want_idx[b, h].tolist(), ref_scores[b, h], N - W)
            assert idx[b, h].tolist() == sorted(idx[b, h].tolist())
    gathered = idx.long()[..., None].expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(keys, k.gather(2, gathered)) and torch.equal(values, v.gather(2, gathered))


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
@pytest.mark.parametrize("mode", ["mixkv", "attn"])
def test_compress(B, Hq, Hkv, N, D, dtype, padded, mode):
    q, k, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded)
    budget = W + max(1, (N - W) // 3)
    got = ops.compress(q, k, v, mask, budget=budget, window=W, mode=mode)
    _, S = R._scores(q, k, v, mask, W, mode, None, 5, "avg", "mean", None)
    if mode == "mixkv":
        _check_compress(got, q, k, v, mask, budget, S)
    else:
        want = R.compress(q, k, v, mask, budget, W, mode=mode)
        for b in range(B):
            for h in range(Hkv):
                assert_same_selection(got[2][b, h].tolist(), want[2][b, h].tolist(), S[b, h], N - W)


@pytest.mark.parametrize("mode", R.MODES)
def test_compress_modes_and_offline_redundancy(mode):
    q, k, v, mask = make_inputs(3, 8, 2, 200, 64, torch.float16, True)
    got = ops.compress(q, k, v, mask, budget=48, window=W, mode=mode)
    _, S = R._scores(q, k, v, mask, W, mode, None, 5, "avg", "mean", None)
    want = R.compress(q, k, v, mask, 48, W, mode=mode)
    for b in range(3):
        for h in range(2):
            assert_same_selection(got[2][b, h].tolist(), want[2][b, h].tolist(), S[b, h], 192)
    if mode == "mixkv":
        profile = torch.tensor([0.9, 0.1])
        got = ops.compress(q, k, v, mask, budget=48, window=W, redundancy=profile)
        want = R.compress(q, k, v, mask, 48, W, redundancy=profile)
        assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("policy", ["adaptive", "pyramid", "explicit"])
def test_compress_ragged(policy):
    q, k, v, mask = make_inputs(3, 16, 4, 300, 128, torch.bfloat16, True)
    profile = torch.rand(4, 4) + 0.1
    kwargs = dict(policy=policy, layer=1, num_layers=4, profile=profile)
    keys, values, idx, offsets = ops.compress(q, k, v, mask, budget=72, window=W, **kwargs)
    want = R.compress_ragged(q, k, v, mask, 72, W, **kwargs)
    assert torch.equal(offsets, want[3])
    assert torch.equal(idx, want[2]) and torch.equal(keys, want[0]) and torch.equal(values, want[1])


def test_budget_at_least_prompt_keeps_everything():
    q, k, v, _ = make_inputs(2, 4, 2, 50, 64, torch.float32, False)
    for budget in [50, 51, 4096]:
        keys, values, idx = ops.compress(q, k, v, budget=budget, window=W)
        assert torch.equal(keys, k) and torch.equal(values, v)
        assert torch.equal(idx, torch.arange(50, dtype=torch.int32).expand(2, 2, 50))
        assert keys.data_ptr() != k.data_ptr()  # a copy: the op never aliases its inputs

