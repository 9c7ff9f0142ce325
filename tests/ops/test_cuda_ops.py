"""The CUDA kernel of every op against the CPU kernel and mixkv.reference, on random inputs
(never zero): odd lengths N = W, W+1, 97, 1025, head dims 64/80/128, GQA groups 1/2/4/8, batch
1 and 3, float32/bfloat16/float16, with and without left padding (helpers.shape_cases).

Every CUDA call runs on a poisoned caching allocator: just before the call, blocks of both the
small and the large pool are filled with 0xFF bytes (NaN in every float dtype, -1 as int32) and
freed, so an output element the kernel never writes shows up as NaN or a wrong index. Also:
opcheck of every op on CUDA tensors, ragged_attention against dense SDPA over the same kept
tokens, and the Hugging Face shim on CUDA (head-wise cache appends, generate == hand-written
loop, CUDA == CPU).

Skipped without CUDA. ``MIXKV_TEST_DEVICE=cpu`` runs the same tests with the CPU standing in for
the device (a self-test of this file on machines without a GPU: every comparison is then CPU
against CPU and reference).
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from mixkv import ops, reference as R

import hf_models
import test_ragged_attention as RA
from helpers import DTYPES, WINDOW, assert_same_selection, close, make_inputs, shape_cases
from test_opcheck import _samples as opcheck_samples

DEVICE = torch.device(os.environ.get("MIXKV_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs CUDA")
W = WINDOW
OPS = ("window_importance", "value_norm", "key_diversity", "mix_scores", "head_budgets",
       "select_kv", "select_kv_ragged", "compress", "compress_ragged", "ragged_attention")
SCORE_REL = 1e-4  # fp32 accumulation in another order: the CPU op's tolerance to the reference


# -- helpers ------------------------------------------------------------------------------------

def poison_allocator():
    """Fill freed blocks of the CUDA caching allocator with 0xFF bytes: the next outputs are
    carved from them, so unwritten elements read NaN (floats) or -1 (int32). The cache is
    emptied first, so that no unpoisoned free block is left for the allocator to pick."""
    if DEVICE.type != "cuda":
        return
    torch.cuda.empty_cache()
    blocks = [torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)]       # large pool
    blocks += [torch.empty(512 << 10, dtype=torch.uint8, device=DEVICE)       # small pool
               for _ in range(64)]
    for block in blocks:
        block.fill_(0xFF)
    del blocks


def to_dev(x):
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, (list, tuple)):
        return type(x)(to_dev(t) for t in x)
    if isinstance(x, dict):
        return {k: to_dev(v) for k, v in x.items()}
    return x


def on_device(fn, *args, **kwargs):
    """Run fn on device copies of the tensor arguments, after poisoning the allocator; every
    output must live on the device. Returns the outputs copied back to the CPU."""
    args, kwargs = to_dev(args), to_dev(kwargs)
    poison_allocator()
    out = fn(*args, **kwargs)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for t in outs:
        assert t.device.type == DEVICE.type, f"output on {t.device}, expected {DEVICE}"
    moved = tuple(t.cpu() for t in outs)
    return moved if isinstance(out, (tuple, list)) else moved[0]


def assert_selections(got_idx, want_idx, ref_scores, C):
    """[B, Hkv, K] kept positions, head by head: equal sets up to boundary ties, ascending."""
    assert got_idx.shape == want_idx.shape and got_idx.dtype == torch.int32
    for b in range(got_idx.shape[0]):
        for h in range(got_idx.shape[1]):
            kept = got_idx[b, h].tolist()
            assert kept == sorted(kept), (b, h)
            assert_same_selection(kept, want_idx[b, h].tolist(), ref_scores[b, h], C)


def assert_rows_at(keys, values, idx, k, v):
    """Dense kept K/V are exactly the input rows at the kept positions."""
    gather = idx.long()[..., None].expand(-1, -1, -1, k.shape[-1])
    assert torch.equal(keys, k.gather(2, gather)) and torch.equal(values, v.gather(2, gather))


def test_every_op_has_a_cuda_kernel():
    if DEVICE.type != "cuda":
        pytest.skip("device is not CUDA")
    missing = [op for op in OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mixkv::{op}", "CUDA")]
    assert not missing, f"no CUDA kernel registered for: {', '.join(missing)}"


def test_poisoned_allocator_shows_unwritten_outputs():
    """The poisoning itself works: a fresh empty tensor reads NaN / -1."""
    if DEVICE.type != "cuda":
        pytest.skip("device is not CUDA")
    poison_allocator()
    small = torch.empty(1000, device=DEVICE)
    large = torch.empty(3 << 20, dtype=torch.bfloat16, device=DEVICE)
    ints = torch.empty(100, dtype=torch.int32, device=DEVICE)
    assert torch.isnan(small).all() and torch.isnan(large).all() and (ints == -1).all()


# -- scoring ops --------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
@pytest.mark.parametrize("pooling,gqa_reduce", [("avg", "mean"), ("max", "max")])
def test_window_importance(B, Hq, Hkv, N, D, dtype, padded, pooling, gqa_reduce):
    q, k, _, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=11)
    got = on_device(ops.window_importance, q, k, mask, 5, pooling, gqa_reduce)
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, N - W)
    assert torch.isfinite(got).all()
    close(got, ops.window_importance(q, k, mask, 5, pooling, gqa_reduce), rel=SCORE_REL)
    close(got, R.window_importance(q, k, mask, 5, pooling, gqa_reduce), rel=SCORE_REL)


@pytest.mark.parametrize("pool_kernel,scaling", [(1, None), (3, 0.05), (7, None)])
def test_window_importance_kernel_and_scaling(pool_kernel, scaling):
    q, k, _, mask = make_inputs(3, 8, 2, 97, 64, torch.float32, True, seed=12)
    got = on_device(ops.window_importance, q, k, mask, pool_kernel, "avg", "mean", scaling)
    close(got, R.window_importance(q, k, mask, pool_kernel, "avg", "mean", scaling),
          rel=SCORE_REL)


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_value_norm(B, Hq, Hkv, N, D, dtype, padded):
    _, _, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=13)
    got = on_device(ops.value_norm, v, W, mask)
    assert got.dtype == torch.float32 and got.shape == (B, Hkv, N - W)
    close(got, ops.value_norm(v, W, mask), rel=1e-5)
    close(got, R.value_norm(v, W, mask), rel=1e-5)
    if mask is not None:
        assert (got[~mask[:, None, : N - W].expand_as(got)] == 0).all()


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_key_diversity(B, Hq, Hkv, N, D, dtype, padded):
    _, k, _, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=14)
    diversity, redundancy = on_device(ops.key_diversity, k, W, mask)
    assert diversity.shape == (B, Hkv, N - W) and redundancy.shape == (B, Hkv)
    for want_div, want_red in (ops.key_diversity(k, W, mask), R.key_diversity(k, W, mask)):
        close(diversity, want_div, rel=SCORE_REL)
        torch.testing.assert_close(redundancy, want_red, rtol=1e-4, atol=1e-6)
    assert ((redundancy >= 0) & (redundancy <= 1)).all()


@pytest.mark.parametrize("mode", R.MODES)
@pytest.mark.parametrize("B,N,padded", [(3, 97, False), (3, 97, True), (1, 1025, True),
                                        (3, W + 1, True)])
def test_mix_scores(mode, B, N, padded):
    q, k, v, mask = make_inputs(B, 8, 2, N, 64, torch.float32, padded, seed=15)
    A = R.window_importance(q, k, mask)
    V = R.value_norm(v, W, mask)
    Dv, r = R.key_diversity(k, W, mask)
    got = on_device(ops.mix_scores, A, V, Dv, r, mode, mask)
    assert torch.isfinite(got).all() and got.shape == A.shape
    close(got, ops.mix_scores(A, V, Dv, r, mode, mask), rel=1e-5)
    close(got, R.mix_scores(A, V, Dv, r, mode, mask), rel=1e-5)


def test_mix_scores_degenerate_heads():
    """Constant value norms / diversities (max == min) and redundancy 0 and 1: no NaN."""
    q, k, v, mask = make_inputs(2, 4, 2, 97, 64, torch.float32, True, seed=16)
    A = R.window_importance(q, k, mask)
    V = torch.full_like(A, 3.0)
    Dv = R.key_diversity(k, W, mask)[0]
    Dv[:, 1] = -0.5
    r = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for mode in R.MODES:
        got = on_device(ops.mix_scores, A, V, Dv, r, mode, mask)
        assert torch.isfinite(got).all()
        close(got, R.mix_scores(A, V, Dv, r, mode, mask), rel=1e-5)


@pytest.mark.parametrize("policy", R.POLICIES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("capacity", [1, 17, 60, 200])
def test_head_budgets(policy, padded, capacity):
    q, k, _, mask = make_inputs(3, 16, 4, 97, 64, torch.float32, padded, seed=17)
    A = R.window_importance(q, k, mask)
    profile = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)) + 0.05
    args = (A, capacity, policy, 0.2, True, mask, 2, 6, 20, profile)
    got = on_device(ops.head_budgets, *args)
    assert got.dtype == torch.int32 and got.shape == (3, 4)
    assert torch.equal(got, ops.head_budgets(*args))
    assert torch.equal(got, R.head_budgets(*args))


def test_head_budgets_large_layer():
    """Adaptive budgets over a long prompt (global top-k over many candidates)."""
    q, k, _, mask = make_inputs(1, 32, 8, 4133, 128, torch.bfloat16, True, seed=18)
    A = R.window_importance(q, k, mask)
    for capacity in [100, 1000]:
        args = (A, capacity, "adaptive", 0.2, True, mask)
        got = on_device(ops.head_budgets, *args)
        assert torch.equal(got, ops.head_budgets(*args))


# -- selection ----------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_select_kv(B, Hq, Hkv, N, D, dtype, padded):
    _, k, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=19)
    scores = torch.rand(B, Hkv, N - W, generator=torch.Generator().manual_seed(3))
    for capacity in [0, 5, (N - W) // 2, N]:
        got = on_device(ops.select_kv, scores, k, v, capacity, W, mask)
        for a, b, c in zip(got, ops.select_kv(scores, k, v, capacity, W, mask),
                           R.select_kv(scores, k, v, capacity, W, mask)):
            assert torch.equal(a, b) and torch.equal(a, c)  # no ties: exact


@pytest.mark.parametrize("padded", [False, True])
def test_select_kv_ties_go_to_the_lower_position(padded):
    _, k, v, mask = make_inputs(3, 8, 2, 1025, 64, torch.float16, padded, seed=20)
    g = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 7, (3, 2, 1025 - W), generator=g).float() / 7  # many ties
    for capacity in [1, 100, 500]:
        got = on_device(ops.select_kv, scores, k, v, capacity, W, mask)
        for a, b in zip(got, R.select_kv(scores, k, v, capacity, W, mask)):
            assert torch.equal(a, b)


def test_select_kv_rejects_nonfinite_scores():
    _, k, v, _ = make_inputs(1, 4, 2, 97, 64, torch.float32, False, seed=21)
    scores = torch.rand(1, 2, 97 - W, generator=torch.Generator().manual_seed(22))
    scores[0, 1, 7] = float("nan")
    with pytest.raises((RuntimeError, ValueError), match="mixkv::select_kv"):
        on_device(ops.select_kv, scores, k, v, 10, W)


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded",
                         [c for i, c in enumerate(shape_cases()) if i % 2 == 0 or i >= 18])
def test_select_kv_ragged(B, Hq, Hkv, N, D, dtype, padded):
    _, k, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=22)
    g = torch.Generator().manual_seed(5)
    scores = torch.rand(B, Hkv, N - W, generator=g)
    capacity = torch.randint(0, N + 5, (B, Hkv), generator=g, dtype=torch.int32)
    capacity[0, 0] = 0
    got = on_device(ops.select_kv, scores, k, v, capacity, W, mask)
    for a, b, c in zip(got, ops.select_kv(scores, k, v, capacity, W, mask),
                       R.select_kv_ragged(scores, k, v, capacity, W, mask)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(got[3].diff(), (capacity.clamp(max=N - W) + W).flatten())


# -- fused paths --------------------------------------------------------------------------------

@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
@pytest.mark.parametrize("mode", ["mixkv", "attn"])
def test_compress(B, Hq, Hkv, N, D, dtype, padded, mode):
    q, k, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=23)
    budget = W + max(1, (N - W) // 3)
    keys, values, idx = on_device(ops.compress, q, k, v, mask, budget=budget, window=W,
                                  mode=mode)
    _, S = R._scores(q, k, v, mask, W, mode, None, 5, "avg", "mean", None)
    assert_selections(idx, R.compress(q, k, v, mask, budget, W, mode=mode)[2], S, N - W)
    assert_selections(idx, ops.compress(q, k, v, mask, budget=budget, window=W, mode=mode)[2],
                      S, N - W)
    assert_rows_at(keys, values, idx, k, v)


@pytest.mark.parametrize("mode", R.MODES)
def test_compress_modes_and_offline_redundancy(mode):
    q, k, v, mask = make_inputs(3, 8, 2, 200, 64, torch.float16, True, seed=24)
    keys, values, idx = on_device(ops.compress, q, k, v, mask, budget=48, window=W, mode=mode)
    _, S = R._scores(q, k, v, mask, W, mode, None, 5, "avg", "mean", None)
    assert_selections(idx, R.compress(q, k, v, mask, 48, W, mode=mode)[2], S, 200 - W)
    assert_rows_at(keys, values, idx, k, v)
    if mode == "mixkv":
        profile = torch.tensor([0.9, 0.1])
        got = on_device(ops.compress, q, k, v, mask, budget=48, window=W, redundancy=profile)
        _, S = R._scores(q, k, v, mask, W, mode, profile, 5, "avg", "mean", None)
        assert_selections(got[2], R.compress(q, k, v, mask, 48, W, redundancy=profile)[2], S,
                          200 - W)


@pytest.mark.parametrize("options", [dict(pool_kernel=7, pooling="max", gqa_reduce="max"),
                                     dict(pool_kernel=1, scaling=0.05)])
def test_compress_options(options):
    q, k, v, mask = make_inputs(3, 16, 4, 300, 128, torch.bfloat16, True, seed=25)
    got = on_device(ops.compress, q, k, v, mask, budget=72, window=W, **options)
    full = {**dict(pool_kernel=5, pooling="avg", gqa_reduce="mean", scaling=None), **options}
    _, S = R._scores(q, k, v, mask, W, "mixkv", None, full["pool_kernel"], full["pooling"],
                     full["gqa_reduce"], full["scaling"])
    want = R.compress(q, k, v, mask, 72, W, **options)
    assert_selections(got[2], want[2], S, 300 - W)


def test_compress_budget_at_least_prompt_keeps_everything():
    q, k, v, _ = make_inputs(2, 4, 2, 50, 64, torch.bfloat16, False, seed=26)
    for budget in [50, 51, 4096]:
        keys, values, idx = on_device(ops.compress, q, k, v, budget=budget, window=W)
        assert torch.equal(keys, k) and torch.equal(values, v)
        assert torch.equal(idx, torch.arange(50, dtype=torch.int32).expand(2, 2, 50))


def ragged_compress(q, k, v, mask, budget, policy, layer=0, num_layers=1, profile=None):
    """torch.ops.mixkv.compress_ragged with MixKV defaults (any policy, "uniform" included)."""
    return torch.ops.mixkv.compress_ragged(q, k, v, mask, budget, W, "mixkv", None, 5, "avg",
                                           "mean", None, policy, 0.2, True, layer, num_layers,
                                           20, profile)


def _check_ragged(got, q, k, v, mask, budget, policy, layer=0, num_layers=1, profile=None):
    keys, values, idx, offsets = got
    args = (q, k, v, mask, budget, policy, layer, num_layers, profile)
    cpu = ragged_compress(*args)
    want = R.compress_ragged(q, k, v, mask, budget, W, policy=policy, layer=layer,
                             num_layers=num_layers, profile=profile)
    # Capacities come from the importance A; a different count would need a tie at the
    # global top-k boundary, which random inputs do not produce.
    assert torch.equal(offsets, want[3]) and torch.equal(offsets, cpu[3])
    _, S = R._scores(q, k, v, mask, W, "mixkv", None, 5, "avg", "mean", None)
    B, Hkv, N, _ = k.shape
    for s in range(B * Hkv):
        b, h = divmod(s, Hkv)
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        kept = idx[lo:hi].tolist()
        assert kept == sorted(kept)
        assert_same_selection(kept, want[2][lo:hi].tolist(), S[b, h], N - W)
        assert_same_selection(kept, cpu[2][lo:hi].tolist(), S[b, h], N - W)
        assert torch.equal(keys[lo:hi], k[b, h, idx[lo:hi].long()])
        assert torch.equal(values[lo:hi], v[b, h, idx[lo:hi].long()])


@pytest.mark.parametrize("B,Hq,Hkv,N,D,dtype,padded", shape_cases())
def test_compress_ragged_adaptive(B, Hq, Hkv, N, D, dtype, padded):
    q, k, v, mask = make_inputs(B, Hq, Hkv, N, D, dtype, padded, seed=27)
    budget = W + max(1, (N - W) // 3)
    got = on_device(ragged_compress, q, k, v, mask, budget, "adaptive")
    _check_ragged(got, q, k, v, mask, budget, "adaptive")


@pytest.mark.parametrize("policy", ["pyramid", "explicit", "uniform"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compress_ragged_policies(policy, dtype):
    q, k, v, mask = make_inputs(3, 16, 4, 300, 128, dtype, True, seed=28)
    profile = torch.rand(4, 4, generator=torch.Generator().manual_seed(6)) + 0.1
    args = (q, k, v, mask, 72, policy, 1, 4, profile if policy == "explicit" else None)
    _check_ragged(on_device(ragged_compress, *args), *args)


# -- ragged_attention ---------------------------------------------------------------------------

@pytest.mark.parametrize("B,G,D,q,dtype,with_valid", RA.cases())
def test_ragged_attention(B, G, D, q, dtype, with_valid):
    Hkv = 2
    lengths = [[q, 5000, q + 1, 37, 1500, 2 * q][s] for s in range(B * Hkv)]
    query, keys, values, starts, lens = RA.make_cache(B, G * Hkv, Hkv, q, D, dtype, lengths,
                                                      seed=29)
    valid = RA.random_valid(keys.shape[0]) if with_valid else None
    want_cpu = ops.ragged_attention(query, keys, values, starts, lens, valid)
    want_ref = R.ragged_attention(query, keys, values, starts, lens, valid)
    inside = torch.zeros(keys.shape[0], dtype=torch.bool)  # spare and invalid rows: never read
    for s, L in zip(starts.flatten().tolist(), lens.flatten().tolist()):
        inside[s:s + L] = True
    garbage = ~inside if valid is None else ~inside | ~valid
    keys, values = keys.clone(), values.clone()
    keys[garbage], values[garbage] = float("nan"), float("inf")
    got = on_device(ops.ragged_attention, query, keys, values, starts, lens, valid)
    assert got.shape == (B, q, G * Hkv, D) and got.dtype == dtype
    assert not torch.isnan(got).any()
    close(got, want_cpu, rel=RA.REL[dtype])
    close(got, want_ref, rel=RA.REL[dtype])


def test_ragged_attention_scaling_and_noncontiguous_query():
    query, keys, values, starts, lens = RA.make_cache(3, 8, 2, 3, 64, torch.float32,
                                                      [5, 90, 700, 3, 4, 1200], seed=30)
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)
    got = on_device(ops.ragged_attention, query_t, keys, values, starts, lens, None, 0.05)
    close(got, R.ragged_attention(query, keys, values, starts, lens, None, 0.05))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,q", [(1, 1), (4, 1), (4, 3), (1, 6)])
def test_ragged_attention_equals_dense_sdpa(dtype, G, q):
    """Per (row, KV head): dense SDPA over exactly that segment's kept tokens (bottom-right
    causal for the q appended tokens, padding masked) on the device, in float32."""
    B, Hkv, D = 2, 4, 128
    lengths = [q, 2049, 64 + q, 700, 3 * q, 4097, 33 + q, 1024][: B * Hkv]
    query, keys, values, starts, lens = RA.make_cache(B, G * Hkv, Hkv, q, D, dtype, lengths,
                                                      seed=31)
    valid = RA.random_valid(keys.shape[0], seed=7)
    for s, L in zip(starts.flatten().tolist(), lens.flatten().tolist()):
        valid[s + L - q:s + L] = True  # the appended tokens are real
    got = on_device(ops.ragged_attention, query, keys, values, starts, lens, valid)
    qd, kd, vd, vald = to_dev((query, keys, values, valid))
    for b in range(B):
        for h in range(Hkv):
            start, L = int(starts[b, h]), int(lens[b, h])
            k, v = kd[start:start + L].float(), vd[start:start + L].float()
            causal = (torch.arange(L, device=DEVICE)[None, :]
                      <= torch.arange(L - q, L, device=DEVICE)[:, None])
            mask = causal & vald[start:start + L][None, :]
            dense = F.scaled_dot_product_attention(qd[b, h * G:(h + 1) * G].float(),
                                                   k.expand(G, L, D), v.expand(G, L, D),
                                                   attn_mask=mask.expand(G, q, L))
            close(got[b, :, h * G:(h + 1) * G], dense.transpose(0, 1).cpu(), rel=RA.REL[dtype])


# -- opcheck ------------------------------------------------------------------------------------

def _all_opcheck_samples():
    samples = [(op, args, kwargs) for op, args, kwargs in opcheck_samples()]
    samples += [(torch.ops.mixkv.ragged_attention, args, kwargs)
                for args, kwargs in RA._opcheck_samples()]
    return samples


@pytest.mark.parametrize("case", range(len(_all_opcheck_samples())))
def test_opcheck(case):
    op, args, kwargs = _all_opcheck_samples()[case]
    torch.library.opcheck(op, to_dev(args), to_dev(kwargs))


# -- the Hugging Face shim on the device ----------------------------------------------------------

def tiny_llama(layers=2, seed=0):
    """hf_models' tiny Llama with larger weights (initializer_range 0.2): peaked attention, so
    the kept tokens and greedy tokens have clear margins and CUDA == CPU holds exactly."""
    transformers = pytest.importorskip("transformers")
    return hf_models._build(transformers.LlamaConfig, transformers.LlamaForCausalLM, "sdpa",
                            seed, num_hidden_layers=layers, initializer_range=0.2)


def _cache_layers_on(cache, device):
    from mixkv.hf import HeadwiseLayer

    for i, layer in enumerate(cache.layers):
        tensor = layer.key_buffer if isinstance(layer, HeadwiseLayer) else layer.keys
        assert tensor.device.type == device.type, f"layer {i} cache on {tensor.device}"


@pytest.mark.parametrize("method,base", [("adakv", "snapkv"), ("mixkv", "adakv"),
                                         ("mixkv", "pyramidkv")])
def test_headwise_decode_on_device(method, base):
    """Head-wise cache on the device: generate == a hand-written loop (70 steps: the segments
    outgrow their 64-token headroom), the cache stays on the device, appends are in place."""
    import mixkv
    from mixkv.hf import HeadwiseLayer
    from transformers import DynamicCache

    model = tiny_llama(layers=3).to(DEVICE)
    ids = hf_models._text_prompt(120).to(DEVICE)
    steps, budget = 70, 40
    kw = hf_models.cache_kwarg()
    with torch.no_grad(), mixkv.patch(model, method, budget=budget, window=W, base=base):
        seq = model.generate(input_ids=ids, max_new_tokens=steps + 1, do_sample=False)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        assert all(isinstance(layer, HeadwiseLayer) for layer in cache.layers)
        _cache_layers_on(cache, DEVICE)
        before = [layer.kept_tokens() for layer in cache.layers]
        assert all(int(n.sum()) == 2 * budget for n in before) or base == "pyramidkv"
        buffer = cache.layers[0].key_buffer
        tokens = [out.logits[:, -1].argmax(-1)]
        for step in range(steps):
            if step == 5:
                assert cache.layers[0].key_buffer is buffer  # appended in place
            position = torch.tensor([[120 + step]], device=DEVICE)
            out = model(input_ids=tokens[-1][:, None], position_ids=position, use_cache=True,
                        **{kw: cache})
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(seq[0, 120:].cpu(), torch.cat(tokens).cpu())
    _cache_layers_on(cache, DEVICE)
    for layer, n in zip(cache.layers, before):
        assert torch.equal(layer.kept_tokens(), n + steps)


@pytest.mark.parametrize("method,base", [("mixkv", "snapkv"), ("snapkv", "snapkv"),
                                         ("mixkv", "adakv"), ("adakv", "snapkv")])
@pytest.mark.parametrize("padded", [False, True])
def test_patched_generate_device_equals_cpu(method, base, padded):
    """The same patched model generates the same tokens on the device as on the CPU (dense and
    head-wise caches, with and without left padding)."""
    import mixkv

    model = tiny_llama()
    if padded:
        rows = [hf_models._text_prompt(90, seed=2)[0], hf_models._text_prompt(61, seed=3)[0]]
        ids = torch.zeros(2, 90, dtype=torch.long)
        mask = torch.zeros(2, 90, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, 90 - len(r):], mask[b, 90 - len(r):] = r, 1
    else:
        ids = hf_models._text_prompt(90)
        mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    with mixkv.patch(model, method, budget=32, window=W, base=base):
        want = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    device_model = copy.deepcopy(model).to(DEVICE)
    with mixkv.patch(device_model, method, budget=32, window=W, base=base):
        got = device_model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE),
                                    **kwargs)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    torch.testing.assert_close(torch.stack(got.logits).cpu(), torch.stack(want.logits),
                               rtol=1e-3, atol=1e-3)
