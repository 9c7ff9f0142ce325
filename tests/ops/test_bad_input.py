"""Bad input raises an error that names the op and the argument."""

import pytest
import torch

from mixkv import ops

B, Hq, Hkv, N, D, W = 2, 4, 2, 20, 8, 4


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, W, D, generator=g), torch.randn(B, Hkv, N, D, generator=g),
            torch.randn(B, Hkv, N, D, generator=g))


def raises(op, arg):
    return pytest.raises((ValueError, TypeError), match=rf"mixkv::{op}: .*{arg}")


def test_wrong_rank(qkv):
    q, k, v = qkv
    with raises("window_importance", "q_window must be \\[B, Hq, W, D\\]"):
        ops.window_importance(q[0], k)
    with raises("window_importance", "keys must be \\[B, Hkv, N, D\\]"):
        ops.window_importance(q, k[0])
    with raises("value_norm", "values must be"):
        ops.value_norm(v[0, 0], W)
    with raises("key_diversity", "keys must be"):
        ops.key_diversity(k[..., 0], W)
    with raises("mix_scores", "importance must be"):
        ops.mix_scores(torch.rand(3), mode="attn")
    with raises("head_budgets", "importance must be"):
        ops.head_budgets(torch.rand(2, 3), 4)
    with raises("select_kv", "scores must be"):
        ops.select_kv(torch.rand(B, Hkv), k, v, 3, W)
    with raises("compress", "q_window must be"):
        ops.compress(q[0], k, v, budget=10, window=W)


def test_heads_not_divisible(qkv):
    q, k, v = qkv
    with raises("window_importance", "Hq = 3 must be a positive multiple of keys heads Hkv = 2"):
        ops.window_importance(q[:, :3], k)
    with raises("compress", "Hq = 3 must be a positive multiple"):
        ops.compress(q[:, :3], k, v, budget=10, window=W)
    with raises("window_importance", "Hq = 0 must be a positive multiple"):  # no query head
        ops.window_importance(q[:, :0], k)


def test_dtype_and_device_mismatch(qkv):
    q, k, v = qkv
    with raises("window_importance", "keys has dtype"):
        ops.window_importance(q, k.half())
    with raises("compress", "values has dtype"):
        ops.compress(q, k, v.bfloat16(), budget=10, window=W)
    with raises("value_norm", "values must be float32, float16 or bfloat16"):
        ops.value_norm(v.double(), W)
    with raises("select_kv", "scores must be float32"):
        ops.select_kv(torch.rand(B, Hkv, N - W).half(), k, v, 3, W)
    with raises("select_kv_ragged", "capacity must be int32"):
        ops.select_kv(torch.rand(B, Hkv, N - W), k, v, torch.ones(B, Hkv, dtype=torch.int64), W)
    with raises("window_importance", "keys is on meta but q_window is on cpu"):
        ops.window_importance(q, k.to("meta"))
    with raises("value_norm", "key_mask is on meta"):
        ops.value_norm(v, W, torch.ones(B, N, dtype=torch.bool, device="meta"))
    with raises("value_norm", "key_mask must be bool or integer"):
        ops.value_norm(v, W, torch.ones(B, N))


def test_window_larger_than_prompt(qkv):
    q, k, v = qkv
    with raises("value_norm", "window \\(21\\) is larger than the prompt length N = 20"):
        ops.value_norm(v, N + 1, None)
    with raises("key_diversity", "window must be >= 1"):
        ops.key_diversity(k, 0)
    q_long = torch.randn(B, Hq, N + 1, D)
    with raises("window_importance", "window \\(21\\) is larger than the prompt length"):
        ops.window_importance(q_long, k)
    with raises("select_kv", "window \\(21\\)"):
        ops.select_kv(torch.rand(B, Hkv, 0), k, v, 3, N + 1)


def test_budget_not_above_window(qkv):
    q, k, v = qkv
    for budget in [W, W - 1, 0]:
        with raises("compress", f"budget \\({budget}\\) must be larger than window"):
            ops.compress(q, k, v, budget=budget, window=W)
    with raises("compress_ragged", "budget \\(4\\) must be larger than window"):
        ops.compress(q, k, v, budget=W, window=W, policy="adaptive")
    with raises("compress", "window \\(5\\) must equal the number of window queries"):
        ops.compress(q, k, v, budget=10, window=5)


def test_negative_capacities(qkv):
    _, k, v = qkv
    scores = torch.rand(B, Hkv, N - W)
    with raises("select_kv", "capacity must be >= 0, got -1"):
        ops.select_kv(scores, k, v, -1, W)
    caps = torch.tensor([[3, 2], [-2, 1]], dtype=torch.int32)
    with raises("select_kv_ragged", "capacity must be >= 0, got -2 at \\[1, 0\\]"):
        ops.select_kv(scores, k, v, caps, W)
    with raises("head_budgets", "capacity must be >= 0"):
        ops.head_budgets(scores, -3)


def test_capacity_profiles_of_the_wrong_shape(qkv):
    _, k, v = qkv
    A = torch.rand(B, Hkv, N - W)
    with raises("head_budgets", "profile must be \\[num_layers, Hkv\\] = \\[3, 2\\], got \\[3, 5\\]"):
        ops.head_budgets(A, 4, "explicit", num_layers=3, profile=torch.rand(3, 5))
    with raises("head_budgets", "profile must be"):
        ops.head_budgets(A, 4, "explicit", num_layers=3, profile=torch.rand(2))
    with raises("head_budgets", "policy 'explicit' needs profile"):
        ops.head_budgets(A, 4, "explicit")
    with raises("head_budgets", "profile must hold finite weights >= 0"):
        ops.head_budgets(A, 4, "explicit", profile=torch.tensor([[1.0, -1.0]]))
    with raises("select_kv_ragged", "capacity must be \\[B, Hkv\\] = \\[2, 2\\], got \\[2\\]"):
        ops.select_kv(torch.rand(B, Hkv, N - W), k, v, torch.ones(2, dtype=torch.int32), W)
    with raises("head_budgets", "layer must be in \\[0, num_layers = 2\\), got 2"):
        ops.head_budgets(A, 4, "pyramid", layer=2, num_layers=2)


def test_bad_options(qkv):
    q, k, v = qkv
    with raises("window_importance", "pooling must be 'avg' or 'max', got 'median'"):
        ops.window_importance(q, k, pooling="median")
    with raises("window_importance", "gqa_reduce must be 'mean' or 'max'"):
        ops.window_importance(q, k, gqa_reduce="sum")
    with raises("window_importance", "pool_kernel must be a positive odd number, got 4"):
        ops.window_importance(q, k, pool_kernel=4)
    with raises("compress", "mode must be one of attn, keydiff, vnorm, mix3, mixkv; got 'mixxkv'"):
        ops.compress(q, k, v, budget=10, window=W, mode="mixxkv")
    with raises("head_budgets", "policy must be one of"):
        ops.head_budgets(torch.rand(B, Hkv, N - W), 3, "greedy")
    with raises("head_budgets", "floor_alpha must be in \\[0, 1\\]"):
        ops.head_budgets(torch.rand(B, Hkv, N - W), 3, floor_alpha=1.5)
    with raises("compress", "redundancy is only used by mode 'mixkv'"):
        ops.compress(q, k, v, budget=10, window=W, mode="attn", redundancy=torch.rand(Hkv))
    with raises("compress", "redundancy must be \\[B, Hkv\\]"):
        ops.compress(q, k, v, budget=10, window=W, redundancy=torch.rand(B, 5))


def test_mix_scores_missing_inputs():
    A = torch.rand(B, Hkv, 7)
    with raises("mix_scores", "mode 'mixkv' needs value_norm"):
        ops.mix_scores(A, mode="mixkv")
    with raises("mix_scores", "mode 'keydiff' needs diversity"):
        ops.mix_scores(A, mode="keydiff")
    with raises("mix_scores", "mode 'mixkv' needs redundancy"):
        ops.mix_scores(A, A, A, None, mode="mixkv")
    with raises("mix_scores", "value_norm must have the shape of importance"):
        ops.mix_scores(A, torch.rand(B, Hkv, 6), mode="vnorm")
    with raises("mix_scores", "key_mask must be \\[B, N\\] with B = 2 and N >= C = 7"):
        ops.mix_scores(A, mode="attn", key_mask=torch.ones(B, 5, dtype=torch.bool))


def test_key_mask_shape(qkv):
    q, k, v = qkv
    with raises("compress", "key_mask must be \\[B, N\\] = \\[2, 20\\], got \\[2, 19\\]"):
        ops.compress(q, k, v, torch.ones(B, N - 1, dtype=torch.bool), budget=10, window=W)
