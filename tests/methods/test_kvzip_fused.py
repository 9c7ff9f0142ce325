"""The fused reconstruction pass (mixkv/hf/reconstruct.py, ``attend_and_score``): one set of
fused attention calls gives both the layer's attention output and KVzip's scores. Checked
against the unfused path it replaces (the model's own attention, then ``max_attention``):
the outputs against ``scaled_dot_product_attention`` under the model's mask, the scores
against ``max_attention``, on random inputs with padding, a scored subset (softmax="span"),
GQA groups, extra past keys, dtypes; and whole passes on tiny models, fused against
``fused=False``."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

from mixkv.hf import reconstruct  # noqa: E402
from mixkv.methods.kvzip import KVzip  # noqa: E402

import hf_models  # noqa: E402
from hf_models import compressed_layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(B=2, Hkv=2, G=3, N=23, extra=0, T=9, D=16, dtype=torch.float32, pad_keys=True,
          span=True, pad_fed=True, seed=0):
    """Random queries/keys/values and the pass's masks: N context keys, `extra` past keys from
    earlier chunks, T fed tokens (the queries, the last T keys)."""
    g = torch.Generator().manual_seed(seed)
    K = N + extra + T
    key = (torch.randn(B, Hkv, K, D, generator=g) * 2).to(dtype)
    value = torch.randn(B, Hkv, K, D, generator=g).to(dtype)
    query = (torch.randn(B, Hkv * G, T, D, generator=g) * 2).to(dtype)
    context_real = torch.ones(B, N, dtype=torch.bool)
    if pad_keys:
        context_real[0, :5] = False                  # row 0 left-padded
    fed_real = torch.ones(B, T, dtype=torch.bool)
    if pad_fed:
        fed_real[-1, -3:] = False                    # the last row's chunk is shorter
    model_real = torch.cat([context_real, torch.ones(B, extra, dtype=torch.bool), fed_real], 1)
    scored = context_real.clone()
    if span:                                         # kept prefix + this chunk's span only
        scored &= torch.zeros(B, N, dtype=torch.bool).index_fill_(
            1, torch.tensor([5, 6] + list(range(12, 20))), True)
    score_real = torch.cat([scored, torch.ones(B, extra, dtype=torch.bool), fed_real], 1)
    return query, key, value, N, model_real, score_real, fed_real


def _model_attention(query, key, value, model_real, T):
    """The model's own attention under its mask: the real past keys, causal over the fed."""
    B, Hq = query.shape[:2]
    Hkv, K = key.shape[1:3]
    past = K - T
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = torch.cat([model_real[:, None, :past].expand(B, T, past),
                         causal[None] & model_real[:, None, past:]], dim=2)
    G = Hq // Hkv
    out = F.scaled_dot_product_attention(
        query.float(), key.float().repeat_interleave(G, 1), value.float().repeat_interleave(G, 1),
        attn_mask=allowed[:, None])
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [dict(), dict(G=1, Hkv=3), dict(B=1, Hkv=1, G=4, N=40, T=17),
                                   dict(extra=6)])
@pytest.mark.parametrize("masks", [dict(), dict(pad_keys=False, span=False, pad_fed=False),
                                   dict(span=False)])
def test_output_and_scores_equal_the_unfused_path(dtype, shape, masks):
    query, key, value, N, model_real, score_real, query_real = _case(dtype=dtype, **shape,
                                                                     **masks)
    T = query.shape[2]
    fused = torch.zeros(key.shape[0], key.shape[1], N)
    output = reconstruct.attend_and_score(query, key, value, N, model_real, score_real,
                                          query_real, None, fused)
    want_output = _model_attention(query, key, value, model_real, T)
    assert output.dtype == dtype and output.shape == want_output.shape
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    real = query_real[:, :, None, None].expand_as(want_output)    # padded queries: unused
    torch.testing.assert_close(output.float()[real], want_output[real], **tol)
    assert torch.isfinite(output.float()).all()
    unfused = torch.zeros_like(fused)
    reconstruct.max_attention(query, key, N, score_real, query_real, None, None, unfused)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-6)
    # not vacuous: scores spread over the scored tokens, zero where nothing is scored
    assert float(unfused.max()) > 0.1 and float(unfused.std()) > 0.01
    assert bool((fused[~score_real[:, None, :N].expand_as(fused)] == 0).all())


def test_scaling_and_running_max():
    query, key, value, N, model_real, score_real, query_real = _case()
    before = torch.rand(2, 2, N) * 0.5
    fused, unfused = before.clone(), before.clone()
    reconstruct.attend_and_score(query, key, value, N, model_real, score_real, query_real, 0.1,
                                 fused)
    reconstruct.max_attention(query, key, N, score_real, query_real, 0.1, None, unfused)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-6)
    assert bool((fused >= before).all()) and bool((fused > before).any())


def test_a_query_that_sees_nothing_gets_zeros_not_nan():
    """A padded row with nothing left to re-read: its fed queries see no fed key, and with an
    all-padded context nothing at all; outputs stay finite."""
    query, key, value, N, model_real, score_real, query_real = _case(pad_fed=False)
    T = query.shape[2]
    model_real[1, :N] = False
    model_real[1, N:] = False
    score_real[1] = False
    query_real[1] = False
    out = torch.zeros(2, 2, N)
    output = reconstruct.attend_and_score(query, key, value, N, model_real, score_real,
                                          query_real, None, out)
    assert torch.isfinite(output).all() and bool((output[1] == 0).all())
    assert bool((out[1] == 0).all()) and float(out[0].max()) > 0.1
    assert output.shape == (2, T, query.shape[1], key.shape[-1])


def test_without_the_fused_kernel_nothing_is_written(monkeypatch):
    monkeypatch.setattr(reconstruct, "_flash", lambda *a, **k: None)
    query, key, value, N, model_real, score_real, query_real = _case()
    out = torch.zeros(2, 2, N)
    assert reconstruct.attend_and_score(query, key, value, N, model_real, score_real,
                                        query_real, None, out) is None
    assert bool((out == 0).all())


def _prefill(model, ids, mask=None):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{hf_models.cache_kwarg(): cache})
    return cache


@pytest.mark.parametrize("build", [hf_models.llama, hf_models.qwen2, hf_models.gemma3,
                                   hf_models.gemma2])
@pytest.mark.parametrize("setup", ["official", "all"])
def test_whole_pass_fused_equals_unfused(build, setup, monkeypatch):
    """KVzip's plan (the official setup: span softmax, chunk prompts; or one softmax over every
    key, continuous re-reading), padded rows: fused and unfused scores agree, the fused path
    ran on every full-attention layer without soft-capping, and the forward stopped after the
    last scored layer."""
    model = hf_models.sharpen_attention(build()[0])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    plan = KVzip(chunk_size=12, repeat_prompt=[5, 6, 7], chunk_prompt=[8, 9], header=False,
                 reread="all", sinks=3).reconstruction_plan()
    if setup == "all":
        plan.update(softmax="all", crop_chunks=False, chunk_prompt_ids=None)
    calls = {"fused": 0, "layers": []}
    original = reconstruct.attend_and_score

    def counted(*args):
        result = original(*args)
        calls["fused"] += result is not None
        return result

    monkeypatch.setattr(reconstruct, "attend_and_score", counted)
    for module in model.model.layers:
        module.self_attn.register_forward_pre_hook(
            lambda m, a: calls["layers"].append(m.layer_idx))
    layers = compressed_layers(model)
    got = reconstruct.reconstruction_scores(model, _prefill(model, ids, mask), input_ids=ids,
                                            key_mask=mask, layers=layers, **plan)
    fused_calls, seen = calls["fused"], list(calls["layers"])
    want = reconstruct.reconstruction_scores(model, _prefill(model, ids, mask), input_ids=ids,
                                             key_mask=mask, layers=layers, fused=False, **plan)
    assert sorted(got) == sorted(want) == layers
    for layer in layers:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-6)
        assert float(want[layer][torch.isfinite(want[layer])].max()) > 0.05
    chunks = 4                                        # 40 tokens re-read 12 at a time
    softcap = getattr(model.config, "attn_logit_softcapping", None)
    assert fused_calls == (0 if softcap else chunks * len(layers))
    # the prefill ran every layer; each re-read forward ended at the last scored layer
    for i in range(len(model.model.layers)):
        assert seen.count(i) == 1 + (chunks if i <= max(layers) else 0), (i, seen)
