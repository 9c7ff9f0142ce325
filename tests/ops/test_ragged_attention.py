"""ragged_attention (attention over the head-wise cache) against mixkv.reference and dense SDPA,
opcheck, and bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from mixkv import ops, reference as R

from helpers import BATCHES, DTYPES, HEAD_DIMS, close

QUERY_TOKENS = [1, 3, 7]
GROUPS = [1, 2, 4]
REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # ~ one output ulp


def make_cache(B, Hq, Hkv, q, D, dtype, lengths, seed=0):
    """Random query [B, Hq, q, D] and a flat K/V buffer with segment (b, h) of lengths[b*Hkv+h]
    rows; segments lie in shuffled order with 0-2 random spare rows after each (never read)."""
    g = torch.Generator().manual_seed(seed)
    n = B * Hkv
    starts, pos = [0] * n, 0
    for s in torch.randperm(n, generator=g).tolist():
        starts[s] = pos
        pos += lengths[s] + s % 3
    query = torch.randn(B, Hq, q, D, generator=g).to(dtype)
    keys = (torch.randn(pos, D, generator=g) + 0.3 * torch.randn(D, generator=g)).to(dtype)
    values = torch.randn(pos, D, generator=g).to(dtype)
    table = lambda x: torch.tensor(x, dtype=torch.int32).view(B, Hkv)  # noqa: E731
    return query, keys, values, table(starts), table(lengths)


def random_valid(S, seed=1):
    return torch.rand(S, generator=torch.Generator().manual_seed(seed)) > 0.2


def cases():
    """Every q x dtype x with/without valid, with batch, GQA group and head dim cycled."""
    out = []
    for i, (q, dtype, with_valid) in enumerate(
            itertools.product(QUERY_TOKENS, DTYPES, [False, True])):
        B, G, D = BATCHES[(i // 2) % 2], GROUPS[i % 3], HEAD_DIMS[(i // 3) % 3]
        out.append(pytest.param(B, G, D, q, dtype, with_valid,
                                id=f"B{B}-G{G}-D{D}-q{q}-{str(dtype)[6:]}-"
                                   f"{'valid' if with_valid else 'all'}"))
    return out


@pytest.mark.parametrize("B,G,D,q,dtype,with_valid", cases())
def test_matches_reference(B, G, D, q, dtype, with_valid):
    Hkv = 2
    # Lengths from exactly q to several CPU/CUDA split chunks.
    lengths = [[q, 1500, q + 1, 37, 300, 2 * q][s] for s in range(B * Hkv)]
    query, keys, values, starts, lens = make_cache(B, G * Hkv, Hkv, q, D, dtype, lengths)
    valid = random_valid(keys.shape[0]) if with_valid else None
    got = ops.ragged_attention(query, keys, values, starts, lens, valid)
    assert got.shape == (B, q, G * Hkv, D) and got.dtype == dtype
    close(got, R.ragged_attention(query, keys, values, starts, lens, valid), rel=REL[dtype])
    assert torch.isfinite(got).all()


def test_scaling_and_noncontiguous_query():
    query, keys, values, starts, lens = make_cache(3, 8, 2, 3, 64, torch.float32,
                                                   [5, 90, 700, 3, 4, 1200])
    query_t = query.transpose(1, 2).contiguous().transpose(1, 2)  # as transformers passes it
    close(ops.ragged_attention(query_t, keys, values, starts, lens, None, 0.05),
          R.ragged_attention(query, keys, values, starts, lens, None, 0.05))


def test_invisible_tokens_give_zeros():
    """Query 0 of segment 0 sees only invalid tokens; segment 1 is entirely invalid."""
    q = 3
    query, keys, values, starts, lens = make_cache(1, 4, 2, q, 64, torch.float32, [6, 5])
    valid = torch.ones(keys.shape[0], dtype=torch.bool)
    s0, s1 = int(starts[0, 0]), int(starts[0, 1])
    valid[s0:s0 + 4] = False  # query 0 sees tokens 0..3, query 1 also sees token 4
    valid[s1:s1 + 5] = False
    got = ops.ragged_attention(query, keys, values, starts, lens, valid)
    want = R.ragged_attention(query, keys, values, starts, lens, valid)
    assert (got[0, 0, :2] == 0).all() and (got[0, :, 2:] == 0).all()
    assert (got[0, 1:, :2] != 0).all()
    close(got, want)


def test_padding_slots_are_never_read():
    """Invalid slots and spare rows may hold anything, NaN included."""
    query, keys, values, starts, lens = make_cache(3, 4, 2, 2, 64, torch.bfloat16,
                                                   [9, 600, 2, 30, 4, 700])
    valid = random_valid(keys.shape[0])
    want = R.ragged_attention(query, keys, values, starts, lens, valid)
    inside = torch.zeros_like(valid)
    for s, L in zip(starts.flatten().tolist(), lens.flatten().tolist()):
        inside[s:s + L] = True
    garbage = ~valid | ~inside
    keys[garbage], values[garbage] = float("nan"), float("inf")
    close(ops.ragged_attention(query, keys, values, starts, lens, valid), want,
          rel=REL[torch.bfloat16])


@pytest.mark.parametrize("q,L", [(5, 50), (1, 700), (16, 16)])
def test_equals_dense_sdpa(q, L):
    """Equal lengths, no spare rows: the same as dense attention with bottom-right causality."""
    B, Hq, Hkv, D = 2, 8, 2, 64
    g = torch.Generator().manual_seed(3)
    query = torch.randn(B, Hq, q, D, generator=g)
    keys, values = torch.randn(2, B, Hkv, L, D, generator=g)
    starts = (torch.arange(B * Hkv, dtype=torch.int32) * L).view(B, Hkv)
    lens = torch.full((B, Hkv), L, dtype=torch.int32)
    mask = torch.arange(L)[None, :] <= torch.arange(L - q, L)[:, None]  # [q, L]
    dense = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    got = ops.ragged_attention(query, keys.reshape(-1, D), values.reshape(-1, D), starts, lens)
    torch.testing.assert_close(got, dense.transpose(1, 2), rtol=1e-5, atol=1e-5)


def _opcheck_samples():
    query, keys, values, starts, lens = make_cache(3, 8, 2, 3, 80, torch.bfloat16,
                                                   [3, 40, 9, 700, 5, 6])
    q1, k1, v1, s1, l1 = make_cache(1, 4, 4, 1, 64, torch.float32, [1, 2, 30, 600])
    return [((query, keys, values, starts, lens, random_valid(keys.shape[0])), {"scaling": 0.2}),
            ((q1, k1, v1, s1, l1), {})]


@pytest.mark.parametrize("case", range(2))
def test_opcheck(case):
    args, kwargs = _opcheck_samples()[case]
    torch.library.opcheck(torch.ops.mixkv.ragged_attention, args, kwargs)


def test_meta_shape():
    query = torch.empty(2, 8, 3, 128, dtype=torch.float16, device="meta")
    kv = torch.empty(500, 128, dtype=torch.float16, device="meta")
    table = torch.empty(2, 2, dtype=torch.int32, device="meta")
    out = ops.ragged_attention(query, kv, kv, table, table)
    assert out.shape == (2, 3, 8, 128) and out.dtype == torch.float16 and out.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("G,q", [(1, 1), (4, 1), (8, 1), (4, 7), (2, 3)])
def test_cuda_matches_cpu(dtype, G, q):
    Hkv, B = 2, 3
    lengths = [q, 5000, 37, 1500, 300, q + 1]
    query, keys, values, starts, lens = make_cache(B, G * Hkv, Hkv, q, 128, dtype, lengths)
    valid = random_valid(keys.shape[0])
    want = ops.ragged_attention(query, keys, values, starts, lens, valid)
    keys[~valid] = values[~valid] = float("nan")  # padding is never read
    got = ops.ragged_attention(*[t.cuda() for t in (query, keys, values, starts, lens, valid)])
    close(got.cpu(), want, rel=REL[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bad_segment_gives_nan():
    query, keys, values, starts, lens = make_cache(1, 2, 2, 2, 64, torch.float32, [4, 4])
    lens[0, 1] = 1  # shorter than q
    got = ops.ragged_attention(*[t.cuda() for t in (query, keys, values, starts, lens)]).cpu()
    assert torch.isnan(got[0, :, 1]).all() and torch.isfinite(got[0, :, 0]).all()


# Bad input: errors name the op and the argument.

def raises(arg):
    return pytest.raises((ValueError, TypeError), match=rf"mixkv::ragged_attention: .*{arg}")


@pytest.fixture
def cache():
    return make_cache(2, 4, 2, 3, 8, torch.float32, [3, 4, 5, 6])


def test_bad_shapes(cache):
    query, keys, values, starts, lens = cache
    with raises("query must be \\[B, Hq, q, D\\], got \\[4, 3, 8\\]"):
        ops.ragged_attention(query[0], keys, values, starts, lens)
    with raises("keys must be \\[S, D\\]"):
        ops.ragged_attention(query, keys[None], values, starts, lens)
    with raises("values must have the shape of keys"):
        ops.ragged_attention(query, keys, values[:-1], starts, lens)
    with raises("keys head dim 7 differs from query head dim D = 8"):
        ops.ragged_attention(query, keys[:, :7], values[:, :7], starts, lens)
    with raises("query heads Hq = 4 must be a positive multiple of the KV heads "
                "Hkv = starts.size\\(1\\) = 3"):
        ops.ragged_attention(query, keys, values, starts[:, [0, 1, 1]], lens[:, [0, 1, 1]])
    with raises("starts must be \\[B, Hkv\\] = \\[2, 2\\], got \\[1, 2\\]"):
        ops.ragged_attention(query, keys, values, starts[:1], lens)
    with raises("starts must be \\[B, Hkv\\], got \\[4\\]"):
        ops.ragged_attention(query, keys, values, starts.flatten(), lens)
    with raises("lengths must be \\[B, Hkv\\] = \\[2, 2\\], got \\[2, 1\\]"):
        ops.ragged_attention(query, keys, values, starts, lens[:, :1])
    with raises("valid must be \\[S\\]"):
        ops.ragged_attention(query, keys, values, starts, lens, torch.ones(3, dtype=torch.bool))


def test_bad_dtypes_and_devices(cache):
    query, keys, values, starts, lens = cache
    with raises("query must be float32, float16 or bfloat16"):
        ops.ragged_attention(query.double(), keys.double(), values.double(), starts, lens)
    with raises("keys has dtype Half but query has Float"):
        ops.ragged_attention(query, keys.half(), values.half(), starts, lens)
    with raises("values has dtype"):
        ops.ragged_attention(query, keys, values.bfloat16(), starts, lens)
    with raises("starts must be int32"):
        ops.ragged_attention(query, keys, values, starts.long(), lens)
    with raises("lengths must be int32"):
        ops.ragged_attention(query, keys, values, starts, lens.long())
    with raises("valid must be bool"):
        ops.ragged_attention(query, keys, values, starts, lens, torch.ones(keys.shape[0]))
    with raises("keys is on meta but query is on cpu"):
        ops.ragged_attention(query, keys.to("meta"), values.to("meta"), starts, lens)
    with raises("lengths is on meta but query is on cpu"):
        ops.ragged_attention(query, keys, values, starts, lens.to("meta"))


def test_bad_segments(cache):
    query, keys, values, starts, lens = cache
    short = lens.clone()
    short[1, 0] = 2
    with raises("lengths must be >= q = 3 \\(a segment ends with its query tokens\\), "
                "got 2 at \\[1, 0\\]"):
        ops.ragged_attention(query, keys, values, starts, short)
    beyond = starts.clone()
    beyond[0, 1] = keys.shape[0] - 3
    with raises(f"segment \\[0, 1\\] \\(starts \\+ lengths = {keys.shape[0] - 3} \\+ 4\\) "
                f"exceeds the S = {keys.shape[0]} rows of keys"):
        ops.ragged_attention(query, keys, values, beyond, lens)
    negative = starts.clone()
    negative[1, 1] = -1
    with raises("starts must be >= 0, got -1 at \\[1, 1\\]"):
        ops.ragged_attention(query, keys, values, negative, lens)
