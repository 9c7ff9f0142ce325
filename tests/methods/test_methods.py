"""The method layer (mixkv.methods): names and objects resolve to the same parts, native parts
run the fused op and composed leaf ops keep the same tokens, a scorer registered here (as a
user would in a notebook) runs plain, under every policy and "+MixKV" in mixkv.patch and the
evaluation runner, and the two scorers added with the layer (TOVA, expected attention) behave
as their definitions say."""

import copy
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
import mixkv.hf  # noqa: E402,F401  (mixkv.hf.* below, even when this file runs alone)
from mixkv import methods as M  # noqa: E402
from mixkv.eval.runner import RunConfig, load_records, run  # noqa: E402

import hf_models  # noqa: E402
from helpers import make_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W = 8
BUDGET = 24
# The per-layer policies and the mixers mixkv registers (the cross-layer ``global`` has its own
# tests; tests/methods/test_registry_methods.py runs every registered part through the shim).
BASES = [n for n, c in M.POLICIES.items()
         if not c.spans_layers and c.__module__.startswith("mixkv.")]
MIXERS = [n for n, c in M.SCORERS.items()
          if issubclass(c, M.Mixer) and c.__module__.startswith("mixkv.")]


@M.register_scorer("test_recency")
class Recency(M.Scorer):
    """A user's scorer, registered in the test file: later tokens score higher."""

    def __init__(self, slope: float = 1.0):
        self.slope = slope

    def score(self, p):
        B, Hkv = p.keys.shape[:2]
        positions = torch.arange(p.candidates, dtype=torch.float32, device=p.keys.device)
        return (1.0 + self.slope * positions).expand(B, Hkv, -1).contiguous()


class ComposedSnapKV(M.SnapKV):
    """SnapKV's scores through the leaf op: redefining score() leaves the fused path."""

    def score(self, p):
        return super().score(p)


def _prefill(padded, seed=0, layer=1, num_layers=3, B=2, Hq=4, Hkv=2, N=70, D=16):
    q, k, v, mask = make_inputs(B, Hq, Hkv, N, D, torch.float32, padded, window=W, seed=seed)
    return M.Prefill(queries=q, keys=k, values=v, key_mask=mask, window=W, layer=layer,
                     num_layers=num_layers, scaling=0.3)


def _options(base):
    return dict(profile=torch.tensor([[1.0, 3.0], [2.0, 1.0], [1.0, 1.0]])) \
        if base == "explicit" else {}


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip((a.keys, a.values, a.positions),
                                                 (b.keys, b.values, b.positions))) and \
        (a.offsets is None) == (b.offsets is None) and \
        (a.offsets is None or torch.equal(a.offsets, b.offsets))


# -- native parts: the fused op; composed parts: the same tokens --------------------------------

@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("mixer", [None] + MIXERS)
def test_composed_leaf_ops_keep_the_fused_ops_tokens(monkeypatch, mixer, base, padded):
    fused_calls = []
    for op in ("compress", "compress_ragged"):
        original = getattr(torch.ops.mixkv, op)
        monkeypatch.setattr(torch.ops.mixkv, op,
                            lambda *a, _o=original, **k: fused_calls.append(1) or _o(*a, **k))
    native = M.resolve(f"{mixer or 'snapkv'}+{base}", budget=BUDGET, window=W, **_options(base))
    inner = ComposedSnapKV()
    scorer = inner if mixer is None else M.SCORERS[mixer](inner)
    composed = M.resolve(scorer, budget=BUDGET, window=W, base=base, **_options(base))
    assert native.label == composed.label
    p = _prefill(padded)
    fast = native.compress(p, BUDGET)
    assert len(fused_calls) == 1  # the native method ran the fused op, once
    slow = composed.compress(p, BUDGET)
    assert len(fused_calls) == 1  # the composed one did not
    assert _same(fast, slow)


def test_offline_redundancy_composed_equals_fused():
    profile = torch.rand(3, 2, generator=torch.Generator().manual_seed(3))
    p = _prefill(True)
    native = M.resolve("mixkv+adakv", budget=BUDGET, window=W, redundancy=profile)
    composed = M.resolve(M.AdaKV(M.MixKV(ComposedSnapKV(), redundancy=profile)), budget=BUDGET,
                         window=W)
    assert torch.equal(native.redundancy, profile)
    assert _same(native.compress(p, BUDGET), composed.compress(p, BUDGET))


# -- names and objects ---------------------------------------------------------------------------

def test_names_and_objects_resolve_to_the_same_method():
    by_name = M.resolve("mixkv", base="adakv", budget=64)
    for obj in (M.MixKV(M.AdaKV(M.SnapKV())), M.AdaKV(M.MixKV(M.SnapKV())),
                M.MixKV(M.SnapKV())):
        method = M.resolve(obj, budget=64, base=None if isinstance(obj, M.BudgetPolicy) or
                           obj.policy is not None else "adakv")
        assert method.label == by_name.label == "mixkv+adakv"
        assert type(method.policy) is M.Adaptive and type(method.scorer) is M.MixKV
    assert M.resolve("adakv", budget=64).label == "adakv"
    assert M.resolve("snapkv+pyramidkv", budget=64).label == "pyramidkv"
    assert M.resolve("mixkv(tova)+adakv", budget=64).label == "mixkv(tova)+adakv"
    assert M.resolve("keydiff(knorm)", budget=64).label == "keydiff(knorm)"
    assert M.resolve("full").scorer is None
    # options reach the part that takes them
    method = M.resolve("streamingllm+pyramidkv", budget=64, sinks=7, pyramid_beta=5)
    assert method.scorer.sinks == 7 and method.policy.pyramid_beta == 5


def test_snapkv_window_sets_the_methods_window():
    default = M.resolve(M.MixKV(M.AdaKV(M.SnapKV())), budget=64)
    assert default.window == M.DEFAULT_WINDOW == 32
    nested = M.resolve(M.MixKV(M.AdaKV(M.SnapKV(window=16))), budget=64)
    assert nested.window == 16 and nested.label == "mixkv+adakv"
    assert M.resolve(M.SnapKV(window=16), budget=64, window=16).window == 16  # agreeing
    assert "window=16" in repr(nested.scorer.inner)
    # the window the scorer sets is the one compression uses: same tokens as window=16
    q, k, v, mask = make_inputs(2, 4, 2, 70, 16, torch.float32, True, window=16, seed=4)
    p16 = M.Prefill(queries=q, keys=k, values=v, key_mask=mask, window=16, layer=1,
                    num_layers=3, scaling=0.3)
    by_option = M.resolve("mixkv+adakv", budget=BUDGET, window=16)
    by_scorer = M.resolve(M.MixKV(M.AdaKV(M.SnapKV(window=16))), budget=BUDGET)
    assert _same(by_option.compress(p16, BUDGET), by_scorer.compress(p16, BUDGET))
    with pytest.raises(ValueError, match="window=8 conflicts with the window 16"):
        M.resolve(M.SnapKV(window=16), budget=64, window=8)
    with pytest.raises(ValueError, match=r"sets different windows \[8, 16\]"):
        M.resolve(_TwoWindows(), budget=64)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="SnapKV window must be an integer >= 1"):
            M.SnapKV(window=bad)
    with pytest.raises(ValueError, match=r"budget \(16\) must be larger than window \(16\)"):
        M.resolve(M.SnapKV(window=16), budget=16)


class _TwoWindows(M.MixKV):
    """A mixer whose parts set two different windows (only reachable by hand)."""

    def __init__(self):
        super().__init__(M.SnapKV(window=16))
        self.window = 8


def test_patch_takes_a_method_object_with_the_scorers_window():
    model, _ = hf_models.llama()
    _, handle, out = _patched_prefill(model, M.MixKV(M.AdaKV(M.SnapKV(window=8))),
                                      budget=BUDGET, window=None)
    assert handle.method.window == 8 and handle.method.label == "mixkv+adakv"
    kept = [s["kept"] for s in handle.stats()["layers"].values()]
    assert all(k.sum(-1).tolist() == [2 * BUDGET, 2 * BUDGET] for k in kept)
    assert out.shape == (2, 67)


@pytest.mark.parametrize("label,options,message", [
    ("mixkvv", {}, "unknown method 'mixkvv'"),
    ("mixkv+adakvv", {}, "unknown base 'adakvv'"),
    ("mixkv(tova", {}, "unclosed"),
    ("knorm(tova)", {}, "scorer 'knorm' wraps no other scorer"),
    ("mixkv+adakv", dict(base="pyramidkv"), "names base 'adakv' but base='pyramidkv'"),
    ("adakv", dict(base="pyramidkv"), "takes no other base"),
    ("snapkv", dict(sinks=8), "option sinks=8 is not used by method 'snapkv'"),
    ("snapkv", dict(colour=1), "unknown option colour=1"),
    ("tova+explicit", {}, "base='explicit' needs profile"),
])
def test_bad_names_and_options_are_named_in_the_error(label, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        M.resolve(label, budget=64, **options)


def test_registry_pairs_mixes_with_their_base():
    assert M.base_of("mixkv+adakv") == "adakv" and M.base_of("mixkv") == "snapkv"
    assert M.base_of("mixkv(tova)+adakv") == "tova+adakv"
    assert M.base_of("keydiff(test_recency)") == "test_recency"
    # plain methods are not mixes: knorm is no longer paired against SnapKV
    assert M.base_of("knorm") is None and M.base_of("adakv") is None
    assert M.base_of("no_such_method") is None and not M.is_mix("tova")
    assert M.uses_option("mixkv(tova)+adakv", "redundancy")
    assert not M.uses_option("tova+adakv", "redundancy")
    assert M.needs_hidden_states("mixkv(expected_attention)+pyramidkv")
    assert M.needs_hidden_states("kvzap+global") and M.uses_option("kvzap", "weights")
    assert not M.needs_hidden_states("mixkv+adakv")
    order = ["mixkv+adakv", "adakv", "mixkv", "full", "snapkv", "mixkv+pyramidkv",
             "pyramidkv"]
    assert sorted(order, key=M.order_key) == ["full", "snapkv", "mixkv", "pyramidkv",
                                              "mixkv+pyramidkv", "adakv", "mixkv+adakv"]


def test_registering_a_taken_name_is_refused():
    class Other(M.Scorer):
        def score(self, p):
            return p.keys.new_zeros(p.keys.shape[:2] + (p.candidates,))

    with pytest.raises(ValueError, match="scorer name 'tova' is taken"):
        M.register_scorer("tova", Other)
    with pytest.raises(ValueError, match="may not"):
        M.register_scorer("a+b", Other)


def test_a_scorer_returning_the_wrong_shape_is_named():
    class Broken(M.Scorer):
        def score(self, p):
            return torch.zeros(3)

    with pytest.raises(ValueError, match="scorer 'Broken' returned"):
        M.resolve(Broken(), budget=BUDGET, window=W).compress(_prefill(False), BUDGET)


# -- the shim ------------------------------------------------------------------------------------

def _patched_prefill(model, method, pad=20, **options):
    """Patched prefill and generate of a batch of 2 x 64 tokens, row 1 left-padded by `pad`."""
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 64), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mixkv.patch(model, method, **{"window": W, **options}) as handle, \
                torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True,
                  **{hf_models.cache_kwarg(): cache})
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    return cache, handle, out


@pytest.mark.parametrize("scorer", ["test_recency", "tova", "expected_attention", "kvzap"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("mix", [False, True])
def test_new_scorers_run_plain_under_every_policy_and_mixed(scorer, base, mix):
    model, _ = hf_models.llama()
    label = f"mixkv({scorer})+{base}" if mix else f"{scorer}+{base}"
    options = dict(weights=hf_models.kvzap_weights(model)) if scorer == "kvzap" else {}
    cache, handle, out = _patched_prefill(model, label, budget=BUDGET, **options,
                                          **_options(base) if base != "explicit" else
                                          dict(profile=torch.ones(2, 2) + torch.eye(2)))
    assert out.shape == (2, 67) and handle.method.label == label.replace("+snapkv", "")
    kept = [s["kept"] for s in handle.stats()["layers"].values()]
    assert len(kept) == 2
    for layer_kept in kept:  # every policy splits the layer's budget (pyramid: per layer)
        if base in ("snapkv", "adakv", "explicit"):
            assert layer_kept.sum(-1).tolist() == [2 * BUDGET, 2 * BUDGET]
    if scorer == "test_recency" and not mix:  # recency keeps the newest candidates
        for segment, n in zip(hf_models.kept_keys(cache.layers[0]),
                              kept[0].flatten().tolist()):
            assert segment.shape[0] == n
        if base == "snapkv":
            full = DynamicCache(config=model.config)
            ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 64),
                                generator=torch.Generator().manual_seed(5))
            mask = torch.ones_like(ids)
            mask[1, :20] = 0
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, use_cache=True,
                      **{hf_models.cache_kwarg(): full})
            assert torch.equal(cache.layers[0].keys, full.layers[0].keys[:, :, -BUDGET:])


def test_user_scorer_options_reach_it_through_patch():
    model, _ = hf_models.llama()
    _, handle, _ = _patched_prefill(model, "mixkv(test_recency)+adakv", budget=BUDGET,
                                    slope=2.0)
    assert handle.method.scorer.inner.slope == 2.0


def test_dense_layer_owns_its_kept_real_mask():
    model, _ = hf_models.llama()
    cache, _, _ = _patched_prefill(model, "mixkv", pad=50, budget=BUDGET)
    layer = cache.layers[0]
    assert isinstance(layer, mixkv.hf.CompressedLayer)
    assert layer.kept_real.shape == (2, BUDGET) and bool(layer.kept_real[0].all())
    # row 1 has 6 real candidates for 16 slots: its first 10 kept slots are padding
    assert layer.kept_real[1].tolist() == [False] * 10 + [True] * 14
    assert not hasattr(cache, "_mixkv_kept_real")
    unpadded, _, _ = _patched_prefill(model, "mixkv", pad=0, budget=BUDGET)
    assert unpadded.layers[0].kept_real is None


def test_capturing_queries_of_a_patched_model_is_refused():
    model, _ = hf_models.llama()
    with mixkv.patch(model, "mixkv", budget=BUDGET, window=W):
        with pytest.raises(RuntimeError, match="already patched"):
            with mixkv.hf.capture_prefill(model, W):
                pass
    with mixkv.hf.capture_prefill(model, W) as captured:  # and works once unpatched
        model(input_ids=torch.randint(2, 100, (1, 20)))
    assert sorted(captured.queries) == [0, 1]


# -- TOVA and expected attention -----------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
def test_tova_is_the_last_query_attention_averaged_over_heads(padded):
    p = _prefill(padded)
    B, Hq, _, D = p.queries.shape
    Hkv, N = p.keys.shape[1], p.keys.shape[2]
    keys = p.keys.repeat_interleave(Hq // Hkv, dim=1)
    logits = (p.queries[..., -1:, :] @ keys.transpose(-1, -2))[..., 0, :] * p.scaling
    if p.key_mask is not None:
        logits = logits.masked_fill(~p.key_mask[:, None, :], float("-inf"))
    want = logits.softmax(-1).mean(1)[:, None, :p.candidates]            # [B, 1, C]
    if p.key_mask is not None:
        want = torch.where(p.key_mask[:, None, :p.candidates], want, 0.0)
    got = M.SCORERS["tova"]().score(p)
    torch.testing.assert_close(got, want.expand(B, Hkv, -1), rtol=1e-5, atol=1e-7)


def _model_prefill(model, ids, layer=0):
    """A Prefill of one layer from an unpatched forward, hidden states included."""
    cache = DynamicCache(config=model.config)
    with mixkv.hf.capture_prefill(model, W, hidden_states=True) as captured, torch.no_grad():
        model(input_ids=ids, use_cache=True, **{hf_models.cache_kwarg(): cache})
    decoder, modules = mixkv.hf.find_attention_modules(model)
    return M.Prefill(queries=captured.queries[layer], keys=cache.layers[layer].keys,
                     values=cache.layers[layer].values, key_mask=None, window=W, layer=layer,
                     num_layers=len(modules), scaling=modules[layer].scaling,
                     module=modules[layer], decoder=decoder,
                     hidden_states=captured.hidden_states[layer])


@pytest.mark.parametrize("build", [hf_models.llama, hf_models.qwen3])
def test_expected_attention_uses_the_next_positions_rope_and_not_the_window(build):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = build()
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    p = _model_prefill(model, ids)
    scorer = M.SCORERS["expected_attention"](future_positions=1, skip_first=0,
                                             use_covariance=False)
    # By hand: mean pre-RoPE query of the prompt, rotated to position N, as the model would.
    module = p.module
    q = module.q_proj(p.hidden_states).view(1, 40, -1, 16)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    mean = q.mean(1)[:, :, None, :]                                      # [1, Hq, 1, D]
    cos, sin = p.decoder.rotary_emb(p.hidden_states, torch.tensor([[40]]))
    rotated, _ = apply_rotary_pos_emb(mean, mean, cos, sin)
    torch.testing.assert_close(scorer._mean_future_query(p), rotated[:, :, 0], rtol=1e-5,
                               atol=1e-6)
    scores = scorer.score(p)
    assert scores.shape == (1, 2, 40 - W) and bool((scores >= 0).all())
    # query-agnostic: the window queries do not enter
    other = M.Prefill(**{**p.__dict__, "queries": torch.randn_like(p.queries)})
    assert torch.equal(scorer.score(other), scores)


@pytest.mark.parametrize("use_covariance,sinks,use_vnorm", [(False, 0, True), (True, 0, True),
                                                         (True, 3, True), (False, 5, False)])
@pytest.mark.parametrize("build", [hf_models.llama, hf_models.qwen3])
def test_expected_attention_is_the_gaussian_expectation_of_the_rotated_queries(
        build, use_covariance, sinks, use_vnorm):
    """By hand, another way round: rotate every prompt query by the averaged future RoPE, take
    their mean and covariance, and E[exp(s q.k)] = exp(s mu.k + s^2 k'Sigma k / 2); softmax over
    the keys past the sinks, the sinks scored above every candidate (kvpress's n_sink)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = build()
    N, F, skip = 40, 6, 3
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, N), generator=torch.Generator().manual_seed(7))
    p = _model_prefill(model, ids)
    # A sharper scaling than the tiny model's own, so that the covariance term moves the scores.
    p = M.Prefill(**{**p.__dict__, "scaling": 8 * p.scaling})
    module = p.module
    q = module.q_proj(p.hidden_states).view(1, N, -1, 16)
    if getattr(module, "q_norm", None) is not None:
        q = module.q_norm(q)
    q = q.float()[:, skip:].transpose(1, 2)                              # [1, Hq, N - skip, D]
    cos, sin = p.decoder.rotary_emb(p.hidden_states, torch.arange(N, N + F)[None])
    rotated, _ = apply_rotary_pos_emb(q, q, cos.mean(1, keepdim=True), sin.mean(1, keepdim=True))
    mean = rotated.mean(2)                                               # [1, Hq, D]
    centred = rotated - mean[:, :, None]
    covariance = centred.transpose(-1, -2) @ centred / centred.shape[2]  # [1, Hq, D, D]
    Hq, Hkv = q.shape[1], p.keys.shape[1]
    keys = p.keys.float().repeat_interleave(Hq // Hkv, dim=1)            # [1, Hq, N, D]
    s = p.scaling
    logits = s * (keys @ mean[..., None])[..., 0]
    if use_covariance:
        logits = logits + 0.5 * s * s * torch.einsum("bhnd,bhde,bhne->bhn", keys, covariance,
                                                     keys)
    attention = torch.zeros(1, Hkv, N)
    attention[..., sinks:] = logits[..., sinks:].softmax(-1).view(1, Hkv, Hq // Hkv, -1).mean(2)
    want = attention[..., :N - W]
    if use_vnorm:
        want = want * p.values[:, :, :N - W].float().norm(dim=-1)
    importance = want.clone()
    importance[..., :sinks] = want.max()      # the sinks: the row's largest importance ...
    want[..., :sinks] = want.max() + 1        # ... and selected above every candidate
    scorer = M.SCORERS["expected_attention"](future_positions=F, skip_first=skip,
                                             use_covariance=use_covariance, sinks=sinks,
                                             use_vnorm=use_vnorm)
    got = scorer.score(p)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    got_importance, got_scores = scorer.score_with_importance(p)
    torch.testing.assert_close(got_importance, importance, rtol=1e-4, atol=1e-7)
    assert torch.equal(got_scores, got)
    if use_covariance:  # the term matters: the ranking differs from the mean-only one
        mean_only = M.SCORERS["expected_attention"](future_positions=F, skip_first=skip,
                                                    use_covariance=False, sinks=sinks).score(p)
        assert (got - mean_only).abs().max() > 100 * (got - want).abs().max()


def _kept_sinks(label, sinks, pad=20):
    """Per (layer, row, KV head): (how many of the row's first 4 real tokens a patched prefill of
    ``label`` (expected attention with ``sinks``) keeps, how many candidates it keeps: the
    tokens past the window); row 1 is left-padded by ``pad``."""
    model, _ = hf_models.llama()
    cache, _, _ = _patched_prefill(model, label, pad=pad, budget=BUDGET, sinks=sinks)
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 64),
                        generator=torch.Generator().manual_seed(5))   # _patched_prefill's
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{hf_models.cache_kwarg(): full})
    counts = []
    for layer, full_layer in zip(cache.layers, full.layers):
        Hkv = full_layer.keys.shape[1]
        for i, segment in enumerate(hf_models.kept_keys(layer)):
            b, h = divmod(i, Hkv)
            first = pad if b == 1 else 0
            wanted = full_layer.keys[b, h, first:first + 4]
            counts.append((sum(any(torch.equal(w, k) for k in segment) for w in wanted),
                           segment.shape[0] - W))
    return counts


@pytest.mark.parametrize("label", ["expected_attention", "expected_attention+adakv",
                                   "expected_attention+pyramidkv"])
def test_expected_attention_keeps_the_first_real_tokens_of_every_head(label):
    """kvpress's n_sink: the first 4 real tokens of each row (after left padding) are kept by
    every head under every policy (pyramidkv's last layer keeps the window alone); with sinks=0
    the scores alone decide, and drop some."""
    kept = _kept_sinks(label, 4)
    assert [sinks for sinks, _ in kept] == [min(4, candidates) for _, candidates in kept]
    assert sum(candidates >= 4 for _, candidates in kept) >= 4
    assert any(sinks < min(4, candidates) for sinks, candidates in _kept_sinks(label, 0))


@pytest.mark.parametrize("option,value,message", [
    ("sinks", -1, "sinks must be an integer >= 0, got -1"),
    ("sinks", 2.0, "sinks must be an integer >= 0, got 2.0"),
    ("future_positions", 0, "future_positions must be an integer >= 1, got 0"),
    ("skip_first", True, "skip_first must be an integer >= 0, got True"),
    ("use_vnorm", "yes", "use_vnorm must be True or False, got 'yes'"),
    ("use_covariance", 1, "use_covariance must be True or False, got 1"),
    ("epsilon", -0.1, "epsilon must be a finite number >= 0, got -0.1"),
    ("epsilon", float("nan"), "epsilon must be a finite number >= 0, got nan")])
def test_expected_attention_refuses_bad_options_by_name(option, value, message):
    with pytest.raises(ValueError, match=r"^mixkv: expected_attention's " + message + "$"):
        M.SCORERS["expected_attention"](**{option: value})
    with pytest.raises(ValueError, match=r"expected_attention's " + option):
        mixkv.patch(hf_models.llama()[0], "expected_attention", budget=BUDGET, window=W,
                    **{option: value})


@pytest.mark.parametrize("label", ["expected_attention", "mixkv(expected_attention)+adakv",
                                   "tova+pyramidkv"])
def test_compressing_a_captured_prefill_equals_the_patched_prefill(label):
    """The evaluation's path (unpatched prefill with capture, then compress_cache) keeps what a
    patched prefill keeps, hidden states included; without them the error says so."""
    model, _ = hf_models.llama()
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, 50), generator=torch.Generator().manual_seed(4))
    kw = hf_models.cache_kwarg()
    full = DynamicCache(config=model.config)
    with mixkv.hf.capture_prefill(model, W, hidden_states=True) as captured, torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: full})
    patched = DynamicCache(config=model.config)
    with mixkv.patch(model, label, budget=BUDGET, window=W) as handle:
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, **{kw: patched})
        if handle.method.needs_hidden_states:
            with pytest.raises(ValueError, match="needs the layer's hidden states; pass "
                                                   "hidden_states= to compress_cache$"):
                handle.compress_cache(copy.deepcopy(full), captured.queries)
        handle.compress_cache(full, captured.queries, hidden_states=captured.hidden_states)
    for got, want in zip(full.layers, patched.layers):
        assert [s.tolist() for s in hf_models.kept_keys(got)] == \
            [s.tolist() for s in hf_models.kept_keys(want)]


# -- the evaluation ------------------------------------------------------------------------------

@pytest.mark.usefixtures("no_plots")
def test_eval_runs_registered_and_new_scorers_and_pairs_them(tmp_path):
    from hf_models import tiny_eval_model

    methods = ["tova", "mixkv(tova)", "test_recency+adakv", "mixkv(test_recency)+adakv",
               "expected_attention+pyramidkv"]
    config = RunConfig(tasks=["passkey"], lengths=[160], samples=1, methods=methods,
                       budgets=[24], window=W, out=str(tmp_path), progress=False, quiet=True)
    summary = run(config, em=tiny_eval_model())
    records = load_records(tmp_path / "results.jsonl")
    assert sorted({r["method"] for r in records}) == sorted(methods + ["full"])
    assert all(r["kv_ratio"] < 1 for r in records if r["method"] != "full")
    pairs = {(r["method"], r["base"]) for r in summary["paired"]}
    assert pairs == {("mixkv(tova)", "tova"),
                     ("mixkv(test_recency)+adakv", "test_recency+adakv")}
    assert "| mixkv(test_recency)+adakv - test_recency+adakv |" in summary["markdown"]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["config"]["methods"] == methods


def test_eval_refuses_an_unknown_method_before_loading_anything(tmp_path):
    config = RunConfig(tasks=["passkey"], methods=["snapkv", "tovaa"], out=str(tmp_path),
                       progress=False, quiet=True)
    with pytest.raises(ValueError, match="unknown method 'tovaa'"):
        run(config, em=object())


def test_eval_cli_imports_a_file_that_registers_a_scorer(tmp_path):
    from mixkv.eval.__main__ import parser
    from mixkv.eval.runner import import_plugins

    plugin = tmp_path / "my_scorers.py"
    plugin.write_text(
        "import torch\n"
        "from mixkv.methods import Scorer, register_scorer\n\n"
        "@register_scorer('test_plugin_oldest')\n"
        "class Oldest(Scorer):\n"
        "    def score(self, p):\n"
        "        order = torch.arange(p.candidates, 0, -1, dtype=torch.float32)\n"
        "        return order.expand(*p.keys.shape[:2], -1).contiguous()\n")
    args = parser().parse_args(["--import", str(plugin), "--methods",
                                "test_plugin_oldest,mixkv(test_plugin_oldest)+adakv"])
    assert args.imports == [str(plugin)]
    import_plugins(args.imports)
    assert M.base_of("mixkv(test_plugin_oldest)+adakv") == "test_plugin_oldest+adakv"
    p = _prefill(False)
    kept = M.resolve("test_plugin_oldest", budget=BUDGET, window=W).compress(p, BUDGET)
    assert kept.positions[0, 0].tolist() == list(range(BUDGET - W)) + list(range(62, 70))
    with pytest.raises(FileNotFoundError, match="no such file"):
        import_plugins([str(tmp_path / "missing.py")])


def test_import_plugins_takes_files_of_one_name_and_modules(tmp_path, monkeypatch):
    """Two plugin files with the same name in different folders are two modules; a plugin's
    dataclass (which looks its module up in sys.modules) works; a module name is imported."""
    from mixkv.eval.runner import import_plugins

    for folder, name in (("a", "test_plugin_a"), ("b", "test_plugin_b")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "scorers.py").write_text(
            "from __future__ import annotations\n"
            "import dataclasses\n"
            "from mixkv.methods import Scorer, register_scorer\n\n"
            f"@register_scorer({name!r})\n"
            "@dataclasses.dataclass\n"
            "class Recent(Scorer):\n"
            "    scale: float = 1.0\n\n"
            "    def score(self, p):\n"
            "        return p.keys.new_zeros(p.keys.shape[:2] + (p.candidates,))\n")
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "test_plugin_module.py").write_text(
        "from mixkv.methods import Scorer, register_scorer\n\n"
        "@register_scorer('test_plugin_c')\n"
        "class Flat(Scorer):\n"
        "    def score(self, p):\n"
        "        return p.keys.new_ones(p.keys.shape[:2] + (p.candidates,))\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    import_plugins([str(tmp_path / "a" / "scorers.py"), str(tmp_path / "b" / "scorers.py"),
                    "test_plugin_module"])
    for name in ("test_plugin_a", "test_plugin_b", "test_plugin_c"):
        M.resolve(name, budget=BUDGET, window=W)   # registered, so the names resolve
    # One module per file, each under its own name (only this test's files: an earlier
    # import in the same process may have left other plugin modules behind).
    files = {Path(module.__file__).parent.name for name, module in list(sys.modules.items())
             if name.startswith("mixkv_plugin_")
             and Path(getattr(module, "__file__", None) or "/").is_relative_to(tmp_path)}
    assert files == {"a", "b"}
    with pytest.raises(ModuleNotFoundError):
        import_plugins(["test_plugin_no_such_module"])
