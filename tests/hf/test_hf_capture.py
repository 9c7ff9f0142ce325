"""The attention-lookup wrapper (mixkv/hf/capture.py) on its own: one interceptor call per
attention call however many modules are intercepted, unintercepted modules (another model in
the process) untouched, the lookup restored when the last interception ends, and the helpers
that read the prefill's mask and hidden states."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import capture  # noqa: E402

import hf_models  # noqa: E402


def _padded_batch(seed=3):
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_one_interceptor_call_per_attention_call_and_lookup_restored():
    model, _ = hf_models.llama()
    _, modules = mixkv.hf.find_attention_modules(model)
    assert len(modules) >= 2
    calls = []

    def counting(function, module, query, key, value, attention_mask, *args, **kwargs):
        calls.append(module.layer_idx)
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    ids, mask = _padded_batch()
    want = _logits(model, ids, mask)
    for module in modules:
        capture.intercept(module, counting)
    try:
        got = _logits(model, ids, mask)
        assert sorted(calls) == sorted(m.layer_idx for m in modules)  # once each, not nested
        capture.release(modules[0])          # the others stay intercepted
        calls.clear()
        _logits(model, ids, mask)
        assert sorted(calls) == sorted(m.layer_idx for m in modules[1:])
    finally:
        for module in modules:
            capture.release(module)
    assert torch.equal(got, want)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)  # the class's own lookup again
    assert not capture._WRAPPED


def test_a_model_left_unpatched_is_untouched_by_another_ones_patch():
    patched, _ = hf_models.llama()
    other, _ = hf_models.llama(seed=1)
    ids, mask = _padded_batch()
    want = _logits(other, ids, mask)          # left-padded row: the mask matters
    with mixkv.patch(patched, "snapkv", budget=12, window=4):
        assert "get_interface" in vars(ALL_ATTENTION_FUNCTIONS)
        assert torch.equal(_logits(other, ids, mask), want)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)


def test_patching_twice_is_refused_with_the_full_reason():
    model, _ = hf_models.llama()
    with mixkv.patch(model, "snapkv", budget=12, window=4):
        with pytest.raises(RuntimeError, match=r"^mixkv: this model is already patched \(or its "
                           r"queries are being captured\); unpatch it first$"):
            mixkv.patch(model, "snapkv", budget=12, window=4)


def test_hidden_states_by_keyword_or_position():
    x, y = torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    assert capture.hidden_states_of((), {"hidden_states": y}) is y
    assert capture.hidden_states_of((x,), {}) is x
    assert capture.hidden_states_of((x,), {"hidden_states": y}) is y
    assert capture.hidden_states_of((), {}) is None


def test_real_keys_from_every_mask_form():
    real = torch.tensor([[True, True, True, True], [False, False, True, True]])
    # 2-D padding mask (flash-attention style), longer than this call's keys
    two_d = torch.cat([torch.ones(2, 3, dtype=torch.long), real.long()], dim=1)
    assert torch.equal(capture.real_keys(two_d, 2, 4), real)
    # 4-D bool and additive masks: the last query's row
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    four_d = causal[None, None] & real[:, None, None, :]
    assert torch.equal(capture.real_keys(four_d, 2, 4), real)
    additive = torch.where(four_d, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(capture.real_keys(additive, 2, 4), real)
    assert capture.real_keys(torch.ones(2, 4, dtype=torch.long), 2, 4) is None  # no padding
    assert capture.real_keys(None, 2, 4) is None
    with pytest.raises(NotImplementedError, match=r"^mixkv: attention masks of type dict are "
                       r"not supported; use attn_implementation='sdpa' or 'eager'$"):
        capture.real_keys({"full": None}, 2, 4)
