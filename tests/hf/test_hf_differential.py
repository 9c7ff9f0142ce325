"""The shim on a tiny Llama, checked at every attention call against an oracle built outside
the cache: a left-padded batch is prefilled and compressed, then a multi-token question, decode
steps, a multi-token teacher-forced answer and more decode steps are appended (the evaluation's
query-agnostic sequence). After each step every (row, KV head) holds exactly the tokens the ops
kept followed by the tokens the model appended, in order, and each attention output equals
plain dense attention over exactly those tokens (padding masked, appended ones causal).

Head-wise caches run with a tiny headroom so the sequence crosses several growth events, and
must give bit-identical logits to a run whose headroom never runs out."""

import importlib

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import HeadwiseLayer  # noqa: E402

import hf_models  # noqa: E402
from helpers import close  # noqa: E402
from test_hf_headwise_cache import causal_and_valid, layer_segment, reference_attention  # noqa: E402

W, BUDGET = 8, 20
CACHE = hf_models.cache_kwarg()
ROWS = (60, 15)  # real tokens per row; row 1 has fewer than the budget, so it keeps padding
APPENDS = [7] + [1] * 12 + [3] + [1] * 12


def padded_prompt():
    N = max(ROWS)
    ids = torch.zeros(len(ROWS), N, dtype=torch.long)
    mask = torch.zeros(len(ROWS), N, dtype=torch.long)
    for b, n in enumerate(ROWS):
        ids[b, N - n:] = hf_models._text_prompt(n, seed=2 + b)[0]
        mask[b, N - n:] = 1
    return ids, mask


def drive(model, ids, mask):
    """Prefill, then APPENDS at the true positions; the logits of every step."""
    g = torch.Generator().manual_seed(9)
    cache = DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        logits.append(model(input_ids=ids, attention_mask=mask, use_cache=True,
                            **{CACHE: cache}).logits)
        for q in APPENDS:
            new = torch.randint(2, hf_models.TEXT_VOCAB, (ids.shape[0], q), generator=g)
            positions = mask.sum(-1, keepdim=True) + torch.arange(q)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
            logits.append(model(input_ids=new, attention_mask=mask, position_ids=positions,
                                use_cache=True, **{CACHE: cache}).logits)
    return cache, logits


def record_layer_calls(monkeypatch, cls, name):
    """Record (layer object, args) of every call of cls.name."""
    calls = []
    original = getattr(cls, name)

    def recorded(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append((self, [a.clone() if torch.is_tensor(a) else a for a in args], out))
        return out

    monkeypatch.setattr(cls, name, recorded)
    return calls


def with_headroom(monkeypatch, headroom):
    """Have the shim build its head-wise layers with this headroom."""
    class Layer(HeadwiseLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "headroom": headroom})

    # layers.layer_from_kept builds every head-wise layer (prefill and decode compression).
    monkeypatch.setattr(importlib.import_module("mixkv.hf.layers"), "HeadwiseLayer", Layer)


@pytest.fixture
def model():
    model, _ = hf_models.llama()
    return model


@pytest.mark.parametrize("base", ["adakv", "pyramidkv"])
def test_headwise_cache_holds_kept_then_appended_and_attends_densely(monkeypatch, model, base):
    ids, mask = padded_prompt()
    prefill = hf_models.record_attention(monkeypatch)
    appended = record_layer_calls(monkeypatch, HeadwiseLayer, "update")
    attended = record_layer_calls(monkeypatch, HeadwiseLayer, "attend")
    with_headroom(monkeypatch, 2)
    layers = model.get_decoder().config.num_hidden_layers
    with mixkv.patch(model, "mixkv", budget=BUDGET, window=W, base=base):
        cache, logits = drive(model, ids, mask)
    B, Hkv = len(ROWS), model.config.num_key_value_heads
    key_mask = mask.bool()
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, HeadwiseLayer)
        q, k, v, _ = prefill[i]
        scaling = model.get_decoder().layers[i].self_attn.scaling
        kept_k, kept_v, positions, offsets = torch.ops.mixkv.compress_ragged(
            q[..., -W:, :], k, v, key_mask, BUDGET, W, "mixkv", None, 5, "avg", "mean",
            scaling, {"adakv": "adaptive", "pyramidkv": "pyramid"}[base], 0.2, True, i,
            layers, 20, None)
        bounds = offsets.tolist()
        # The oracle, per segment: kept tokens (padding invalid), then every appended token.
        seg_k = [kept_k[a:e] for a, e in zip(bounds, bounds[1:])]
        seg_v = [kept_v[a:e] for a, e in zip(bounds, bounds[1:])]
        seg_valid = [key_mask[s // Hkv, positions[a:e].long()]
                     for s, (a, e) in enumerate(zip(bounds, bounds[1:]))]
        updates = [args for obj, args, _ in appended if obj is layer]
        attends = [(args[0], out[0]) for obj, args, out in attended if obj is layer]
        assert len(updates) == len(attends) == len(APPENDS)
        for (new_k, new_v, *_), (query, out) in zip(updates, attends):  # 5.3 adds cache_kwargs
            Gq = query.shape[1] // Hkv
            for s in range(B * Hkv):
                b, h = divmod(s, Hkv)
                seg_k[s] = torch.cat([seg_k[s], new_k[b, h]])
                seg_v[s] = torch.cat([seg_v[s], new_v[b, h]])
                seg_valid[s] = torch.cat([seg_valid[s], torch.ones(new_k.shape[2], dtype=torch.bool)])
                heads = slice(h * Gq, (h + 1) * Gq)
                want = reference_attention(query[b, heads], seg_k[s], seg_v[s],
                                           causal_and_valid(seg_valid[s], query.shape[2]), scaling)
                close(out[b, :, heads], want.transpose(0, 1), rel=1e-5)
        for s in range(B * Hkv):  # the final cache, segment by segment
            got_k, got_v, got_valid = layer_segment(layer, s)
            assert torch.equal(got_k, seg_k[s]) and torch.equal(got_v, seg_v[s]), (i, s)
            assert torch.equal(got_valid, seg_valid[s]), (i, s)
    assert all(torch.isfinite(x).all() for x in logits)


@pytest.mark.parametrize("base", ["adakv", "pyramidkv"])
def test_headwise_growth_is_invisible_to_the_model(monkeypatch, model, base):
    ids, mask = padded_prompt()
    growths = record_layer_calls(monkeypatch, HeadwiseLayer, "_grow")
    runs = {}
    for headroom in (2, 1000):
        with_headroom(monkeypatch, headroom)
        with mixkv.patch(model, "mixkv", budget=BUDGET, window=W, base=base):
            runs[headroom] = drive(model, ids, mask)[1]
        if headroom == 2:
            grown = len(growths)
    assert grown >= 2 * 3 and len(growths) == grown  # every layer grew several times, then none
    for small, large in zip(runs[2], runs[1000]):
        assert torch.equal(small, large)


@pytest.mark.parametrize("method", ["mixkv", "snapkv", "streamingllm"])
def test_dense_padded_layer_holds_kept_then_appended_and_attends_densely(monkeypatch, model,
                                                                         method):
    ids, mask = padded_prompt()
    seen = hf_models.record_attention(monkeypatch)
    appended = record_layer_calls(monkeypatch, DynamicLayer, "update")
    with mixkv.patch(model, method, budget=BUDGET, window=W):
        cache, _ = drive(model, ids, mask)
    key_mask = mask.bool()
    B, Hkv = len(ROWS), model.config.num_key_value_heads
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, DynamicLayer) and layer.keys.shape[-2] == BUDGET + sum(APPENDS)
        _, full_k, _, _ = seen[i]
        # The kept tokens are rows of the prefill keys (which rows is the ops' business, tested
        # elsewhere); a kept row equal to a real prompt token is real, the rest is padding.
        kept_k = layer.keys[:, :, :BUDGET]
        match = (kept_k[:, :, :, None, :] == full_k[:, :, None, :, :]).all(-1)
        assert bool(match.any(-1).all()), "every kept key is a prefill key"
        real_by_head = (match & key_mask[:, None, None, :]).any(-1)
        assert bool((real_by_head == real_by_head[:, :1]).all()), "a row's heads agree"
        kept_real = real_by_head[:, 0]
        assert kept_real.sum(-1).tolist() == [min(BUDGET, n) for n in ROWS]
        decode_calls = [c for c in seen.calls if c["layer"] == i
                        and c["query"].shape[-2] != c["key"].shape[-2]]
        updates = [args for obj, args, _ in appended  # not the prefill's own update
                   if obj is layer and args[0].shape[-2] != ids.shape[-1]]
        assert len(decode_calls) == len(updates) == len(APPENDS)
        keys, real = kept_k, kept_real
        for call, (new_k, *_) in zip(decode_calls, updates):
            keys = torch.cat([keys, new_k], dim=2)
            real = torch.cat([real, torch.ones(B, new_k.shape[2], dtype=torch.bool)], dim=1)
            assert torch.equal(call["key"], keys)
            query, q = call["query"], call["query"].shape[2]
            Gq = query.shape[1] // Hkv
            for b in range(B):
                for h in range(Hkv):
                    heads = slice(h * Gq, (h + 1) * Gq)
                    want = reference_attention(query[b, heads], keys[b, h], call["value"][b, h],
                                               causal_and_valid(real[b], q), call["scaling"])
                    close(call["output"][b, :, heads], want.transpose(0, 1), rel=1e-5)
