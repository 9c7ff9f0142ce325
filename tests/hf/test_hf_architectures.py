"""The shim on every supported architecture (tiny random-weight models built from configs):
Llama, Mistral (plain and sliding-window), Qwen2, Qwen3 (q/k norm), Gemma3 text (sliding and
full layers interleaved), Qwen2-VL (mrope; text-only and with an image) and LLaVA (text-only
and with an image), each with sdpa and eager attention.

For each: (a) a budget >= the prompt changes nothing, token for token; (b) a budget below the
prompt leaves exactly `budget` tokens in every full-attention layer and the unpatched length in
sliding layers, the prefill logits are untouched, decoding keeps the true positions and stays
finite; (c) unpatch restores bit-identical logits. Unsupported models raise NotImplementedError
naming their class. Head-wise budgets (base="adakv", "explicit") run where the ragged attention
op is built.
"""

import functools
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import HeadwiseLayer  # noqa: E402

import hf_models  # noqa: E402
from helpers import exactly  # noqa: E402
from hf_models import compressed_layers  # noqa: E402

W, BUDGET, PROMPT, NEW = 8, 24, 80, 5
CACHE = hf_models.cache_kwarg()
HAS_RAGGED = hasattr(torch.ops.mixkv, "ragged_attention")
needs_ragged = pytest.mark.skipif(not HAS_RAGGED, reason="torch.ops.mixkv.ragged_attention "
                                  "(head-wise attention) is not built")

# name -> (builder, builder kwargs, image prompt?)
ARCHS = {
    "llama": (hf_models.llama, {}, False),
    "mistral": (hf_models.mistral, {}, False),
    "mistral-sliding": (hf_models.mistral, dict(sliding_window=16), False),
    "qwen2": (hf_models.qwen2, {}, False),
    "qwen3": (hf_models.qwen3, {}, False),
    "gemma3": (hf_models.gemma3, {}, False),
    "qwen2_vl": (hf_models.qwen2_vl, {}, False),
    "qwen2_vl-image": (hf_models.qwen2_vl, {}, True),
    "llava": (hf_models.llava, {}, False),
    "llava-image": (hf_models.llava, {}, True),
}
SLIDING = ("mistral-sliding", "gemma3", "gemma2")
CASES = [pytest.param(name, attn, id=f"{name}-{attn}") for name in ARCHS
         for attn in ("sdpa", "eager")]


@functools.lru_cache(maxsize=None)
def _build(name, attn):
    builder, kwargs, image = ARCHS[name]
    model, make_inputs = builder(attn, **kwargs)
    return model, make_inputs(PROMPT, image=image)


def setup(name, attn):
    """The (cached) model and its prompt; the model is never left patched by a test."""
    model, inputs = _build(name, attn)
    assert not hasattr(model, "_mixkv_patch") and "generate" not in vars(model)
    return model, inputs


def patch(model, name, **options):
    """mixkv.patch, checking the sliding-window warning: given exactly for sliding models."""
    options = dict(dict(budget=BUDGET, window=W), **options)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = mixkv.patch(model, "mixkv", **options)
    said = [str(w.message) for w in caught if "sliding-window" in str(w.message)]
    assert bool(said) == (name in SLIDING), said
    return handle


def generate(model, inputs, record_positions=True):
    """Greedy generation; returns (sequences, per-step logits, position_ids seen by the decoder
    at each forward)."""
    positions = []

    def hook(module, args, kwargs):
        p = kwargs.get("position_ids")
        positions.append(None if p is None else p.clone())

    handle = model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False,
                                 return_dict_in_generate=True, output_scores=True)
    finally:
        handle.remove()
    return out.sequences, torch.stack(out.scores), positions


def prefill_lengths(model, inputs):
    """Per-layer cache lengths (tensor rows) after one prefill into a config-built cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, **{CACHE: cache}, use_cache=True)
    return cache, [None if isinstance(layer, HeadwiseLayer) else layer.keys.shape[-2]
                   for layer in cache.layers]


def assert_same_positions(got, want):
    """generate must pass explicit positions (a cache shorter than the prompt would otherwise
    shift them) and they must be those of the unpatched run."""
    assert len(got) == len(want) == NEW
    for g, w in zip(got, want):
        assert g is not None and torch.equal(g, w)


# -- (a) nothing to remove: identical to the unpatched model ---------------------------------

@pytest.mark.parametrize("name,attn", CASES)
def test_budget_at_least_prompt_is_exact(name, attn):
    model, inputs = setup(name, attn)
    want_seq, want_scores, _ = generate(model, inputs)
    with patch(model, name, budget=PROMPT + 16) as handle:
        seq, scores, _ = generate(model, inputs)
        stats = handle.stats()
    assert torch.equal(seq, want_seq)
    assert torch.equal(scores, want_scores)
    assert sorted(stats["layers"]) == compressed_layers(model)
    assert all(s["kept"].eq(s["prompt"]).all() for s in stats["layers"].values())
    assert stats["total"]["ratio"] == 1.0


# -- (b) a budget below the prompt ---------------------------------------------------------------

@pytest.mark.parametrize("name,attn", CASES)
def test_budget_below_prompt_compresses_full_layers_only(name, attn):
    model, inputs = setup(name, attn)
    N = inputs["input_ids"].shape[1]
    want_seq, want_scores, want_positions = generate(model, inputs)
    _, full_lengths = prefill_lengths(model, inputs)
    compressed = compressed_layers(model)
    with patch(model, name) as handle:
        seq, scores, positions = generate(model, inputs)
        stats = handle.stats()
        cache, lengths = prefill_lengths(model, inputs)
    # The prefill itself is exact (compression happens after each layer's attention).
    assert torch.equal(scores[0], want_scores[0])
    assert seq.shape == (1, N + NEW) and torch.isfinite(scores).all()
    # generate passes the true positions (mrope ones for Qwen2-VL), not cache lengths.
    assert_same_positions(positions, want_positions)
    for i, layer in enumerate(cache.layers):
        if i in compressed:
            assert layer.keys.shape[-2] == layer.values.shape[-2] == BUDGET, i
            assert stats["layers"][i]["kept"].eq(BUDGET).all() and stats["layers"][i]["prompt"] == N
        else:  # sliding layers: left alone (a sliding layer keeps sliding_window - 1 rows)
            assert lengths[i] == full_lengths[i], i
    assert sorted(stats["layers"]) == compressed
    if not compressed:  # every layer slides: nothing changes at all
        assert torch.equal(seq, want_seq) and torch.equal(scores, want_scores)
    else:
        assert stats["total"]["ratio"] < 1.0


# -- (c) unpatch restores the model exactly ------------------------------------------------------

@pytest.mark.parametrize("name,attn", CASES)
def test_unpatch_restores_bit_identical_logits(name, attn):
    model, inputs = setup(name, attn)
    with torch.no_grad():
        before = model(**inputs).logits
    handle = patch(model, name)
    generate(model, inputs)
    handle.unpatch()
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.equal(after, before)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)
    assert "generate" not in vars(model) and not hasattr(model, "_mixkv_patch")


# -- padded batches on the architectures with special positions or masks -------------------------

@pytest.mark.parametrize("name,attn", [pytest.param(n, a, id=f"{n}-{a}")
                                       for n in ("qwen2_vl", "gemma3", "llava")
                                       for a in ("sdpa", "eager")])
def test_left_padded_rows_equal_single_rows(name, attn):
    """mrope positions (Qwen2-VL) and per-layer-type masks (Gemma3) under left padding: each
    row of a padded batch generates what it generates alone; the short row (20 real tokens)
    has fewer real tokens than the budget."""
    model, _ = setup(name, attn)
    rows = [hf_models._text_prompt(PROMPT, seed=2)[0], hf_models._text_prompt(20, seed=3)[0]]
    batch = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros(2, PROMPT, dtype=torch.long)
    for b, r in enumerate(rows):
        batch[b, PROMPT - len(r):], mask[b, PROMPT - len(r):] = r, 1
    with patch(model, name):
        seq, scores, _ = generate(model, dict(input_ids=batch, attention_mask=mask))
        for b, r in enumerate(rows):
            alone = dict(input_ids=r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long))
            alone_seq, alone_scores, _ = generate(model, alone)
            assert torch.equal(seq[b, PROMPT:], alone_seq[0, len(r):]), b
            torch.testing.assert_close(scores[:, b], alone_scores[:, 0], rtol=1e-5, atol=1e-5)


# -- several patched models at once -----------------------------------------------------------

def test_two_models_patched_then_unpatched_one_by_one():
    llama, inputs = setup("llama", "sdpa")
    qwen3, _ = setup("qwen3", "sdpa")
    with torch.no_grad():
        before = llama(**inputs).logits
    a, b = patch(llama, "llama"), patch(qwen3, "qwen3")
    a.unpatch()
    with torch.no_grad():
        assert torch.equal(llama(**inputs).logits, before)
    _, lengths = prefill_lengths(qwen3, inputs)
    assert lengths == [BUDGET, BUDGET]  # the other model still compresses
    b.unpatch()
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)


# -- (d) unsupported architectures --------------------------------------------------------------

def test_gpt2_is_refused_by_name_and_left_untouched():
    model, _ = hf_models.gpt2()
    with pytest.raises(NotImplementedError, match=exactly(
            "mixkv: GPT2LMHeadModel is not a supported architecture: mixkv needs a decoder "
            "(model.get_decoder()) whose layers have a `self_attn` module with a `layer_idx` "
            "(Llama, Mistral, Qwen2/3, Gemma, Qwen2-VL, LLaVA language models)")):
        mixkv.patch(model, "mixkv", budget=BUDGET, window=W)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)
    assert "generate" not in vars(model) and not hasattr(model, "_mixkv_patch")
    mixkv.unpatch(model)  # a no-op


def test_decoder_layers_without_self_attn_layer_idx_are_refused():
    model, _ = setup("llama", "sdpa")
    layer = model.get_decoder().layers[1]
    attn = layer.self_attn
    idx = attn.layer_idx
    del attn.layer_idx
    try:
        with pytest.raises(NotImplementedError, match="LlamaForCausalLM is not a supported"):
            mixkv.patch(model, "mixkv", budget=BUDGET, window=W)
    finally:
        attn.layer_idx = idx
    del layer.self_attn  # a decoder layer with no `self_attn` at all (another attention design)
    try:
        with pytest.raises(NotImplementedError, match="LlamaForCausalLM is not a supported"):
            mixkv.patch(model, "mixkv", budget=BUDGET, window=W)
    finally:
        layer.self_attn = attn
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)


# -- head-wise budgets ------------------------------------------------------------------------

@needs_ragged
@pytest.mark.parametrize("name,attn", [pytest.param(n, a, id=f"{n}-{a}")
                                       for n in ("llama", "qwen3", "gemma3", "qwen2_vl-image")
                                       for a in ("sdpa", "eager")])
def test_adakv_headwise_generation(name, attn):
    model, inputs = setup(name, attn)
    N = inputs["input_ids"].shape[1]
    _, want_scores, want_positions = generate(model, inputs)
    _, full_lengths = prefill_lengths(model, inputs)
    compressed = compressed_layers(model)
    Hkv = model.get_decoder().config.num_key_value_heads
    with patch(model, name, base="adakv") as handle:
        seq, scores, positions = generate(model, inputs)
        stats = handle.stats()
        cache, _ = prefill_lengths(model, inputs)
    assert torch.equal(scores[0], want_scores[0])
    assert seq.shape == (1, N + NEW) and torch.isfinite(scores).all()
    assert_same_positions(positions, want_positions)
    assert sorted(stats["layers"]) == compressed
    for i, layer in enumerate(cache.layers):
        if i not in compressed:
            assert type(layer) is not HeadwiseLayer and layer.keys.shape[-2] == full_lengths[i]
            continue
        assert isinstance(layer, HeadwiseLayer), i
        kept = layer.kept_tokens()
        assert torch.equal(kept, stats["layers"][i]["kept"])
        assert kept.sum().item() == Hkv * BUDGET  # AdaKV moves budget between heads only
        assert bool((kept >= W).all()) and bool((kept <= N).all())
        assert layer.get_seq_length() == int(kept.max())


def _headwise_uniform_vs_dense(model, name, inputs):
    config = model.get_decoder().config
    profile = torch.ones(config.num_hidden_layers, config.num_key_value_heads)
    results = {}
    for base, extra in [("snapkv", {}), ("explicit", dict(profile=profile))]:
        with patch(model, name, base=base, **extra):
            results[base] = generate(model, inputs)
    (dense_seq, dense_scores, _), (ragged_seq, ragged_scores, _) = results.values()
    assert torch.equal(ragged_seq, dense_seq)
    torch.testing.assert_close(ragged_scores, dense_scores, rtol=1e-5, atol=1e-5)


@needs_ragged
@pytest.mark.parametrize("name,attn", [pytest.param(n, a, id=f"{n}-{a}")
                                       for n in ("llama", "qwen3", "gemma3", "qwen2_vl-image",
                                                 "llava-image")
                                       for a in ("sdpa", "eager")])
def test_headwise_with_equal_capacities_equals_dense_path(name, attn):
    """An explicit all-equal capacity profile keeps the same tokens as the uniform budget, so the
    head-wise cache + ragged attention must decode like the dense cache + model attention."""
    model, inputs = setup(name, attn)
    _headwise_uniform_vs_dense(model, name, inputs)


def test_headwise_refuses_gemma2_softcapping():
    """The head-wise cache's attention does not soft-cap logits, so the shim refuses head-wise
    budgets on a soft-capping model up front; a uniform budget (the model's own attention)
    is accepted."""
    model, _ = hf_models.gemma2("eager")
    with pytest.raises(NotImplementedError, match=exactly(
            "mixkv: Gemma2ForCausalLM soft-caps attention logits, which the head-wise cache's "
            "attention does not do; use a uniform budget (base='snapkv')")):
        patch(model, "gemma2", base="adakv")
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS) and "generate" not in vars(model)
    inputs = hf_models._text_inputs(PROMPT)
    _, full_lengths = prefill_lengths(model, inputs)
    with patch(model, "gemma2", base="snapkv"):
        _, lengths = prefill_lengths(model, inputs)
    assert lengths == [full_lengths[0], BUDGET]  # the sliding layer as unpatched, the full one cut


# -- caches built without a config ----------------------------------------------------------

def _prefill_and_decode(model, inputs, cache, steps=3):
    """Prefill, then `steps` greedy tokens at their true positions; the decode logits."""
    N = inputs["input_ids"].shape[1]
    logits = []
    with torch.no_grad():
        out = model(**inputs, **{CACHE: cache}, use_cache=True)
        for step in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=token, position_ids=torch.tensor([[N + step]]),
                        **{CACHE: cache}, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1)


def test_a_cache_layer_class_of_ones_own_at_a_sliding_layer_stays_whole():
    """A DynamicLayer subclass of a model's own at a layer the config calls sliding (the class
    itself does not say is_sliding) is left whole, like the built-in sliding layers; the full
    layers are compressed."""
    from transformers.cache_utils import DynamicLayer

    class OwnLayer(DynamicLayer):
        pass

    model, inputs = setup("gemma3", "sdpa")
    sliding = [i for i, t in enumerate(model.config.layer_types) if "sliding" in t]
    assert 0 < len(sliding) < model.config.num_hidden_layers
    cache = DynamicCache(config=model.config)
    for i in sliding:
        cache.layers[i] = OwnLayer()
    with patch(model, "gemma3"), torch.no_grad():
        model(**inputs, **{CACHE: cache}, use_cache=True)
    prompt = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in cache.layers] == \
        [prompt if i in sliding else BUDGET for i in range(len(cache.layers))]
    assert all(type(cache.layers[i]) is OwnLayer for i in sliding)


@pytest.mark.parametrize("name,attn", [pytest.param(n, a, id=f"{n}-{a}")
                                       for n in ("gemma3", "mistral-sliding")
                                       for a in ("sdpa", "eager")])
def test_cache_built_without_config_on_sliding_models(name, attn):
    """Sliding layers must not be compressed whatever the cache, and a config-less cache holds
    them as plain DynamicLayers the shim cannot tell apart (transformers would also size the
    full-attention mask from the first non-sliding *cache* layer, a sliding one): refused
    clearly, while a config-built cache works."""
    model, inputs = setup(name, attn)
    with patch(model, name):
        _prefill_and_decode(model, inputs, DynamicCache(config=model.config))
        with pytest.raises(NotImplementedError, match=r"^mixkv: layer \d+ uses sliding-window "
                           r"attention but the cache holds it as a plain DynamicLayer; build "
                           r"the cache as DynamicCache\(config=model.config\) \(generate "
                           r"does\)$"):
            _prefill_and_decode(model, inputs, DynamicCache())


def test_sliding_warning_points_at_the_caller():
    model, _ = setup("gemma3", "sdpa")
    with pytest.warns(UserWarning, match=r"^mixkv: \d+ of \d+ layers use sliding-window "
                                         r"attention and stay uncompressed$") as caught:
        line = sys._getframe().f_lineno + 1
        handle = mixkv.patch(model, "mixkv", budget=BUDGET, window=W)
    handle.unpatch()
    if "mutmut" not in sys.modules:  # mutation runs wrap every function in a frame outside mixkv
        assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_sliding_warning_is_shown_once_per_calling_line():
    """Under Python's default filter a warning shows once per location: patching in a loop (a
    notebook cell rerun, an evaluation) warns once, another line warns again."""
    model, _ = setup("gemma3", "sdpa")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            mixkv.patch(model, "mixkv", budget=BUDGET, window=W).unpatch()
        assert len(caught) == 1 and "sliding-window" in str(caught[0].message)
        mixkv.patch(model, "mixkv", budget=BUDGET, window=W).unpatch()
    if "mutmut" not in sys.modules:  # there every warning's location is mutmut's trampoline
        assert len(caught) == 2 and "sliding-window" in str(caught[1].message)
