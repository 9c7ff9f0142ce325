"""The shim must score with each architecture's own attention inputs: the model's attention
scaling (Gemma3's query_pre_attn_scalar, not 1/sqrt(head_dim)), queries after q_norm (Qwen3,
Gemma3) and after RoPE at the model's positions (Qwen2-VL's mrope with an image in the prompt:
there only the scores, not the selection, change on this prompt).

For each, the kept tokens equal the ops' selection from the queries and scaling the attention
function receives; those queries equal ones recomputed here from the module's own weights and
position embeddings; and the selection with the input done the generic way (default scaling, no
q_norm, text positions) differs on this prompt, so a shim that dropped the input would fail."""

import importlib

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import HeadwiseLayer  # noqa: E402

import hf_models  # noqa: E402
from hf_models import compressed_layers  # noqa: E402

W, BUDGET, PROMPT = 8, 24, 80
CACHE = hf_models.cache_kwarg()


def record_attention_inputs(model):
    """Forward pre-hooks noting each attention module's hidden states and (cos, sin)."""
    seen, handles = {}, []
    for layer in model.get_decoder().layers:
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            seen[module.layer_idx] = (hidden.clone(), kwargs["position_embeddings"])
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def rotate(x, cos, sin):
    """RoPE as Llama-family models apply it (rotate_half convention), x [B, H, N, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def queries(module, hidden, cos, sin, q_norm=True):
    """The module's queries [B, Hq, N, D] recomputed from its weights."""
    B, N, _ = hidden.shape
    q = module.q_proj(hidden).view(B, N, -1, module.head_dim)
    if q_norm and hasattr(module, "q_norm"):
        q = module.q_norm(q)
    return rotate(q.transpose(1, 2), cos, sin)


def text_position_embeddings(model, hidden):
    """(cos, sin) at positions 0..N-1 in every mrope stream (what a 1-D RoPE would use)."""
    N = hidden.shape[1]
    positions = torch.arange(N)[None].expand(3, hidden.shape[0], N)
    return model.get_decoder().rotary_emb(hidden, positions)


def kept_by_ops(q, k, v, base, scaling, layer_idx, layers):
    """The keys the ops keep: [B, Hkv, K, D] (dense) or flat [T, D] (head-wise)."""
    common = (q[..., -W:, :], k, v, None, BUDGET, W, "mixkv", None, 5, "avg", "mean", scaling)
    if base == "snapkv":
        return torch.ops.mixkv.compress(*common)[0]
    return torch.ops.mixkv.compress_ragged(*common, "adaptive", 0.2, True, layer_idx, layers,
                                           20, None)[0]


def cached_keys(layer):
    if isinstance(layer, HeadwiseLayer):
        return layer.held()[0]
    return layer.keys


CASES = [("gemma3", {}, False, "scaling"), ("qwen3", {}, False, "q_norm"),
         ("gemma3", {}, False, "q_norm"), ("qwen2_vl", {}, True, "mrope")]


@pytest.mark.parametrize("base", ["snapkv", "adakv"])
@pytest.mark.parametrize("name,kwargs,image,generic", [pytest.param(*c, id=f"{c[0]}-{c[3]}")
                                                       for c in CASES])
def test_selection_uses_the_models_own_attention_inputs(monkeypatch, name, kwargs, image,
                                                        generic, base):
    model, make_inputs = getattr(hf_models, name)("sdpa", **kwargs)
    inputs = make_inputs(PROMPT, image=image)
    recorded = hf_models.record_attention(monkeypatch)
    seen, handles = record_attention_inputs(model)
    try:
        with pytest.warns(UserWarning) if name == "gemma3" else _nothing(), \
                mixkv.patch(model, "mixkv", budget=BUDGET, window=W, base=base):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(**inputs, **{CACHE: cache}, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    layers = compressed_layers(model)
    differs = []
    with torch.no_grad():
        for i in layers:
            module = model.get_decoder().layers[i].self_attn
            q, k, v, _ = recorded[i]
            hidden, (cos, sin) = seen[i]
            assert recorded.calls[[c["layer"] for c in recorded.calls].index(i)]["scaling"] \
                == module.scaling
            # The kept tokens are the ops' selection from what attention received ...
            assert torch.equal(cached_keys(cache.layers[i]),
                               kept_by_ops(q, k, v, base, module.scaling, i, len(cache.layers)))
            # ... which is the module's own queries (weights, q_norm, its positions' RoPE).
            torch.testing.assert_close(q, queries(module, hidden, cos, sin), rtol=1e-4, atol=1e-5)
            scaling = module.scaling
            if generic == "scaling":
                scaling = None
            elif generic == "q_norm":
                q = queries(module, hidden, cos, sin, q_norm=False)
            else:
                q = queries(module, hidden, *text_position_embeddings(model, hidden))
            if generic == "mrope":
                # Text positions shift only the tokens up to the image relative to the window:
                # the selection does not move on this prompt, the scores do.
                wi = torch.ops.mixkv.window_importance
                differs.append(not torch.equal(wi(q[..., -W:, :], k, None, 5, "avg", "mean", scaling),
                                               wi(recorded[i][0][..., -W:, :], k, None, 5, "avg",
                                                  "mean", scaling)))
                continue
            other = kept_by_ops(q, k, v, base, scaling, i, len(cache.layers))
            differs.append(other.shape != cached_keys(cache.layers[i]).shape
                           or not torch.equal(other, cached_keys(cache.layers[i])))
    if generic == "scaling":
        assert model.get_decoder().layers[layers[0]].self_attn.scaling != 16 ** -0.5
    assert any(differs), f"the {generic} input does not change the selection on this prompt"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
