"""torch.library.opcheck on every op (schema, fake/meta kernels, dynamic shapes, aot dispatch),
and torch.compile(fullgraph=True) of compress."""

import pytest
import torch

from mixkv import ops

from helpers import make_inputs

W = 8


def _samples():
    q, k, v, mask = make_inputs(3, 8, 2, 61, 64, torch.bfloat16, True, window=W)
    q32, k32, v32, _ = make_inputs(1, 4, 4, 45, 80, torch.float32, False, window=W)
    A = ops.window_importance(q, k, mask)
    Vn = ops.value_norm(v, W, mask)
    Dv, r = ops.key_diversity(k, W, mask)
    S = ops.mix_scores(A, Vn, Dv, r, "mixkv", mask)
    caps = ops.head_budgets(A, 20, "adaptive", key_mask=mask)
    m = torch.ops.mixkv
    return [
        (m.window_importance, (q, k, mask), {}),
        (m.window_importance, (q32, k32), {"pooling": "max", "gqa_reduce": "max", "scaling": 0.1}),
        (m.value_norm, (v, W, mask), {}),
        (m.key_diversity, (k32, W), {}),
        (m.mix_scores, (A, Vn, Dv, r), {"mode": "mixkv", "key_mask": mask}),
        (m.mix_scores, (A,), {"mode": "attn"}),
        (m.head_budgets, (A, 20), {"policy": "adaptive", "key_mask": mask}),
        (m.head_budgets, (A, 20), {"policy": "explicit",
                                   "profile": torch.rand(1, 2, generator=torch.Generator().manual_seed(4))}),
        (m.select_kv, (S, k, v, 20, W, mask), {}),
        (m.select_kv_ragged, (S, k, v, caps, W, mask), {}),
        (m.compress, (q, k, v, mask, 30, W), {}),
        (m.compress, (q32, k32, v32, None, 100, W), {"mode": "vnorm"}),
        (m.compress_ragged, (q, k, v, mask, 30, W), {"policy": "adaptive"}),
    ]


@pytest.mark.parametrize("case", range(len(_samples())))
def test_opcheck(case):
    op, args, kwargs = _samples()[case]
    torch.library.opcheck(op, args, kwargs)


def test_meta_shapes_without_data():
    q, k, v, mask = [t.to("meta") if t is not None else None
                     for t in make_inputs(2, 8, 2, 1000, 64, torch.float16, True, window=W)]
    keys, values, idx = ops.compress(q, k, v, mask, budget=100, window=W)
    assert keys.shape == (2, 2, 100, 64) and keys.dtype == torch.float16
    assert idx.shape == (2, 2, 100) and idx.dtype == torch.int32
    A = ops.window_importance(q, k, mask)
    assert A.shape == (2, 2, 992) and A.dtype == torch.float32 and A.device.type == "meta"
    assert ops.head_budgets(A, 10).shape == (2, 2)


def test_compile_fullgraph_compress():
    def layer(q, k, v, mask):
        keys, values, idx = torch.ops.mixkv.compress(q, k, v, mask, 40, W)
        return keys.float().sum(-1) * 2, values, idx

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for N in [77, 130]:  # a second length exercises the symbolic-shape meta kernel
        q, k, v, mask = make_inputs(2, 8, 2, N, 64, torch.bfloat16, True, window=W)
        for got, want in zip(compiled(q, k, v, mask), layer(q, k, v, mask)):
            assert torch.equal(got, want)
