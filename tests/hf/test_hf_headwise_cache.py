"""HeadwiseLayer against two oracles, over a sequence of multi-token appends and decode steps
that crosses several growth events: a plain-Python list of every (row, head) segment's tokens
with dense attention in plain PyTorch, and the same sequence run with headroom large enough to
never grow."""

import pytest
import torch

pytest.importorskip("transformers")
from mixkv.hf import HeadwiseLayer  # noqa: E402

from helpers import close  # noqa: E402

B, HKV, G, D = 2, 3, 2, 8
SCALING = 0.3
# q tokens per append: multi-token appends (a question, a teacher-forced answer) between
# decode steps; with headroom 2 the segments grow several times.
APPENDS = [3, 1, 1, 4, 1, 1, 1, 2, 1, 7, 1, 1, 1, 1, 5, 1, 1, 1, 1, 1, 1, 2, 1]


def reference_attention(query, keys, values, allowed, scaling):
    """Plain attention of query [Gq, q, D] over keys/values [L, D] where allowed [q, L]."""
    logits = (query.double() @ keys.double().T) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) @ values.double()).float()


def causal_and_valid(valid, q):
    """[q, L]: the i-th of the q newest queries sees valid keys up to its own position."""
    L = valid.shape[0]
    causal = torch.arange(L)[None, :] <= (L - q + torch.arange(q))[:, None]
    return causal & valid[None, :]


class Segments:
    """The oracle: per (row, head) segment, its kept tokens then every appended token."""

    def __init__(self, keys, values, valid, lengths):
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).tolist()
        self.keys = [keys[a:b] for a, b in zip(bounds, bounds[1:])]
        self.values = [values[a:b] for a, b in zip(bounds, bounds[1:])]
        self.valid = [valid[a:b] for a, b in zip(bounds, bounds[1:])]

    def append(self, key_states, value_states):
        for s in range(B * HKV):
            b, h = divmod(s, HKV)
            q = key_states.shape[2]
            self.keys[s] = torch.cat([self.keys[s], key_states[b, h]])
            self.values[s] = torch.cat([self.values[s], value_states[b, h]])
            self.valid[s] = torch.cat([self.valid[s], torch.ones(q, dtype=torch.bool)])

    def attend(self, query):
        out = torch.empty(B, query.shape[2], HKV * G, D)
        for s in range(B * HKV):
            b, h = divmod(s, HKV)
            allowed = causal_and_valid(self.valid[s], query.shape[2])
            heads = slice(h * G, (h + 1) * G)
            out[b, :, heads] = reference_attention(query[b, heads], self.keys[s], self.values[s],
                                                   allowed, SCALING).transpose(0, 1)
        return out


def layer_segment(layer, s):
    begin = int(layer.starts[s])
    rows = slice(begin, begin + int(layer.lengths[s]))
    return layer.key_buffer[rows], layer.value_buffer[rows], layer.valid[rows]


def check_views(layer, oracle):
    """``held()`` is every segment's tokens in order; ``padded()`` each segment left-padded to
    the longest (zeros, mask False, before its tokens)."""
    held = layer.held()
    for got, want in zip(held, (oracle.keys, oracle.values, oracle.valid)):
        assert torch.equal(got, torch.cat(want))
    keys, values, mask = layer.padded()
    longest = max(len(k) for k in oracle.keys)
    assert keys.shape == values.shape == (B * HKV, longest, D) and mask.shape == (B * HKV, longest)
    for s in range(B * HKV):
        pad = longest - len(oracle.keys[s])
        assert torch.equal(keys[s, pad:], oracle.keys[s]) and not keys[s, :pad].any()
        assert torch.equal(values[s, pad:], oracle.values[s]) and not values[s, :pad].any()
        assert torch.equal(mask[s, pad:], oracle.valid[s]) and not mask[s, :pad].any()


def kept_prefill(seed):
    """Flat kept K/V [T, D] of 6 segments of unequal lengths (one empty of real tokens but the
    window), with row 1's first kept tokens marked padding."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 1, 9, 3, 7, 2])
    T = int(lengths.sum())
    keys, values = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    valid = torch.ones(T, dtype=torch.bool)
    row1 = int(lengths[:HKV].sum())
    valid[row1:row1 + 2] = False
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return keys, values, offsets, valid, lengths


def run(headroom, seed=0):
    """Drive a HeadwiseLayer through APPENDS; returns (attention outputs, growth count)."""
    keys, values, offsets, valid, lengths = kept_prefill(seed)
    layer = HeadwiseLayer(keys, values, offsets, valid, B, HKV, headroom=headroom)
    oracle = Segments(keys, values, valid, lengths)
    g = torch.Generator().manual_seed(seed + 1)
    outputs, growths = [], 0
    for q in APPENDS:
        new_k, new_v = torch.randn(B, HKV, q, D, generator=g), torch.randn(B, HKV, q, D, generator=g)
        buffer = layer.key_buffer
        returned = layer.update(new_k, new_v)
        growths += layer.key_buffer is not buffer
        assert returned[0] is new_k and returned[1] is new_v
        oracle.append(new_k, new_v)
        lengths = lengths + q
        assert torch.equal(layer.kept_tokens(), lengths.view(B, HKV))
        assert layer.get_seq_length() == int(lengths.max())
        assert layer.get_mask_sizes(1) == (int(lengths.max()) + 1, 0)
        # transformers <= 5.3 passes this call's cache_position (a tensor) instead of a length
        assert layer.get_mask_sizes(torch.arange(7, 10)) == (int(lengths.max()) + 3, 0)
        assert layer.is_initialized  # transformers' Cache.is_initialized reads it
        for s in range(B * HKV):
            got_k, got_v, got_valid = layer_segment(layer, s)
            assert torch.equal(got_k, oracle.keys[s]), s
            assert torch.equal(got_v, oracle.values[s]), s
            assert torch.equal(got_valid, oracle.valid[s]), s
        check_views(layer, oracle)
        query = torch.randn(B, HKV * G, q, D, generator=g)
        out, weights = layer.attend(query, SCALING)
        assert weights is None and out.shape == (B, q, HKV * G, D)
        close(out, oracle.attend(query), rel=1e-5)
        outputs.append(out)
    return outputs, growths


@pytest.mark.parametrize("headroom", [0, 2])
def test_segments_hold_kept_then_appended_tokens_across_growth(headroom):
    _, growths = run(headroom)
    assert growths >= 3  # the sequence really crosses several growth events


def test_growth_changes_nothing_a_large_headroom_run_sees():
    small, growths = run(headroom=2)
    large, never = run(headroom=1000)
    assert growths >= 3 and never == 0
    for a, b in zip(small, large):
        assert torch.equal(a, b)


def test_appends_convert_to_the_cache_dtype():
    keys, values, offsets, valid, _ = kept_prefill(0)
    layer = HeadwiseLayer(keys.bfloat16(), values.bfloat16(), offsets, valid, B, HKV, headroom=1)
    new = torch.randn(B, HKV, 3, D, generator=torch.Generator().manual_seed(3))
    layer.update(new, -new)
    assert layer.key_buffer.dtype == torch.bfloat16
    _, last_v, _ = layer_segment(layer, 4)
    assert torch.equal(last_v[-3:], (-new[1, 1]).bfloat16())


def test_refuses_appends_of_another_shape_and_cache_surgery():
    keys, values, offsets, valid, _ = kept_prefill(0)
    layer = HeadwiseLayer(keys, values, offsets, valid, B, HKV)
    with pytest.raises(RuntimeError, match=r"holds \[2, 3\].*appended \[1, 3\]"):
        layer.update(torch.zeros(1, HKV, 1, D), torch.zeros(1, HKV, 1, D))
    for surgery in (layer.crop, layer.reorder_cache, layer.batch_select_indices,
                    layer.batch_repeat_interleave):
        with pytest.raises(NotImplementedError, match=r"^mixkv: a head-wise compressed cache "
                           r"cannot be cropped, reordered \(beam search\) or re-batched$"):
            surgery(1)
    assert layer.nbytes() == layer.key_buffer.nbytes * 2
