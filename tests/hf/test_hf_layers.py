"""CompressedLayer on its own: its decode mask against a hand-built one, and its kept-real mask
following the rows and the length of its K/V through transformers' cache surgery (crop, beam
reordering, batch expansion and selection)."""

import pytest
import torch

pytest.importorskip("transformers")
from mixkv.hf import CompressedLayer  # noqa: E402

B, H, KEPT, D = 3, 2, 5, 4


def padded_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(B, H, KEPT, D, generator=g), torch.randn(B, H, KEPT, D, generator=g)
    kept_real = torch.tensor([[True] * 5, [False, False, True, True, True],
                              [False, True, True, True, True]])
    return CompressedLayer(keys, values, kept_real), keys, values, kept_real


def hand_mask(kept_real, q, kv):
    """[B, 1, q, kv]: query i (position kv - q + i) sees real kept tokens and appended ones up
    to itself."""
    out = torch.zeros(kept_real.shape[0], 1, q, kv, dtype=torch.bool)
    for b in range(kept_real.shape[0]):
        for i in range(q):
            for j in range(kv):
                real = bool(kept_real[b, j]) if j < kept_real.shape[1] else True
                out[b, 0, i, j] = real and j <= kv - q + i
    return out


@pytest.mark.parametrize("q", [1, 3])
def test_decode_mask_is_real_kept_plus_causal_appended(q):
    layer, _, _, kept_real = padded_layer()
    layer.update(torch.randn(B, H, q, D), torch.randn(B, H, q, D))
    query, key = torch.randn(B, 4, q, D), layer.keys
    assert key.shape[-2] == KEPT + q
    want = hand_mask(kept_real, q, KEPT + q)
    assert torch.equal(layer.decode_mask(query, key, None), want)
    for dtype in (torch.float32, torch.bfloat16):  # eager: additive, in the attention's dtype
        additive = layer.decode_mask(query, key, dtype)
        assert additive.dtype == dtype
        assert torch.equal(additive == 0, want)
        assert torch.equal(additive == torch.finfo(dtype).min, ~want)
    unpadded = CompressedLayer(torch.randn(B, H, KEPT, D), torch.randn(B, H, KEPT, D))
    assert unpadded.decode_mask(query, key, None) is None


def test_kept_real_follows_the_rows_and_length_of_the_cache():
    layer, keys, _, kept_real = padded_layer()
    layer.update(torch.ones(B, H, 2, D), torch.ones(B, H, 2, D))
    layer.crop(-3)                                 # 7 tokens -> 4 (negative: remove)
    assert layer.keys.shape[-2] == 4 and torch.equal(layer.kept_real, kept_real[:, :4])
    assert torch.equal(layer.keys, keys[:, :, :4])

    layer, keys, _, kept_real = padded_layer()
    layer.batch_repeat_interleave(2)               # beam search / num_return_sequences
    assert torch.equal(layer.kept_real, kept_real.repeat_interleave(2, dim=0))
    assert torch.equal(layer.keys, keys.repeat_interleave(2, dim=0))

    layer, keys, _, kept_real = padded_layer()
    layer.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(layer.kept_real, kept_real[[2, 0]])
    assert torch.equal(layer.keys, keys[[2, 0]])

    layer, keys, _, kept_real = padded_layer()
    beams = torch.tensor([1, 1, 0])
    layer.reorder_cache(beams)
    assert torch.equal(layer.kept_real, kept_real[beams])
    assert torch.equal(layer.keys, keys[beams])
    # after any of them the decode mask is the moved rows' own
    layer.update(torch.zeros(B, H, 1, D), torch.zeros(B, H, 1, D))
    assert torch.equal(layer.decode_mask(torch.zeros(B, 4, 1, D), layer.keys, None),
                       hand_mask(kept_real[beams], 1, KEPT + 1))
