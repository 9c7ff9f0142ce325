"""The Hugging Face shim on a tiny random Llama: exactness when nothing is removed, the kept
tokens equal the ops' selection, generate == a hand-written loop, padded rows == single rows,
unpatch restores the model, and refusals."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import mixkv  # noqa: E402

import hf_models  # noqa: E402
from helpers import exactly  # noqa: E402

W = 8
VOCAB = 99


def tiny_llama(attn="sdpa", layers=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def prompt(length, batch=1, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, **kwargs):
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["mixkv", "snapkv", "streamingllm", "adakv"])
def test_budget_at_least_prompt_is_exact(attn, method):
    model = tiny_llama(attn)
    ids = prompt(40)
    want_seq, want_logits = greedy(model, ids)
    with mixkv.patch(model, method, budget=64, window=W):
        seq, logits = greedy(model, ids)
    assert torch.equal(seq, want_seq) and torch.equal(logits, want_logits)


@pytest.mark.parametrize("method", ["mixkv", "adakv"])
def test_a_prompt_as_long_as_the_budget_is_left_bit_for_bit(method):
    """budget == prompt length: nothing to remove, so every layer stays the model's own
    DynamicLayer holding the prefill's tensors (no selection, no head-wise cache)."""
    from transformers.cache_utils import DynamicLayer

    model = tiny_llama()
    ids = prompt(40)
    full, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
        with mixkv.patch(model, method, budget=40, window=W) as handle:
            model(ids, past_key_values=cache, use_cache=True)
    for got, want in zip(cache.layers, full.layers, strict=True):
        assert type(got) is DynamicLayer
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    layers = handle.stats()["layers"]
    assert sorted(layers) == [0, 1]
    for s in layers.values():
        assert s["kept"].eq(40).all() and s["bytes_after"] == s["bytes_before"]


def test_a_forward_without_a_cache_is_left_alone():
    """use_cache=False (scoring a sequence, perplexity): no cache, nothing to compress; the
    patched model computes the unpatched logits."""
    model = tiny_llama()
    ids = prompt(50)
    want = model(ids, use_cache=False).logits
    with mixkv.patch(model, "mixkv", budget=20, window=W) as handle:
        got = model(ids, use_cache=False).logits
        assert handle.stats()["layers"] == {}
    assert torch.equal(got, want)


def test_unpatch_restores_bit_identical_logits():
    model = tiny_llama()
    ids = prompt(50)
    before = model(ids).logits
    handle = mixkv.patch(model, "mixkv", budget=20, window=W)
    greedy(model, ids)
    handle.unpatch()
    assert torch.equal(model(ids).logits, before)
    assert "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS)
    assert "generate" not in vars(model)
    handle.unpatch()      # a second unpatch is a no-op (a `with` block left after unpatch())
    mixkv.unpatch(model)  # and so is the module-level one
    assert torch.equal(model(ids).logits, before) and "generate" not in vars(model)


def test_module_level_unpatch_restores_the_model():
    model = tiny_llama()
    ids = prompt(50)
    before = model(ids).logits
    handle = mixkv.patch(model, "mixkv", budget=20, window=W)
    assert model._mixkv_patch is handle
    greedy(model, ids)
    mixkv.unpatch(model)
    assert torch.equal(model(ids).logits, before)
    assert "generate" not in vars(model) and not hasattr(model, "_mixkv_patch")


@pytest.mark.parametrize("method", ["mixkv", "snapkv", "keydiff", "vnorm", "mix3", "knorm",
                                    "streamingllm", "random"])
def test_kept_tokens_are_the_ops_selection(monkeypatch, method):
    model = tiny_llama()
    seen = hf_models.record_attention(monkeypatch)
    ids = prompt(90)
    budget = 30
    with mixkv.patch(model, method, budget=budget, window=W) as handle:
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        stats = handle.stats()
    for i, layer in enumerate(cache.layers):
        q, k, v, _ = seen[i]
        assert layer.keys.shape == (1, 2, budget, 16)
        if method == "knorm":  # independent definition: the lowest key L2 norms, in order
            C = 90 - W
            for h in range(2):
                # The scorer's norms, bit for bit (the same ATen norm of the same rows, on every
                # CPU); a repeated token's keys tie within an ulp or exactly (RoPE rotates), and
                # an exact tie goes to the lower position, as in the ops: a stable sort.
                lowest = k[0, h, :C].norm(dim=-1).argsort(stable=True)[:budget - W].sort().values
                kept = torch.cat([lowest, torch.arange(C, 90)])
                assert torch.equal(layer.keys[0, h], k[0, h, kept])
                assert torch.equal(layer.values[0, h], v[0, h, kept])
        if method in ("random", "streamingllm", "knorm"):
            continue  # their scores do not involve the ops' scoring
        mode = {"snapkv": "attn"}.get(method, method)
        want_k, want_v, _ = torch.ops.mixkv.compress(q[..., -W:, :], k, v, None, budget, W, mode,
                                                     None, 5, "avg", "mean", 0.25)
        assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)
        assert stats["layers"][i]["kept"].tolist() == [[budget, budget]]
    if method == "streamingllm":
        _, k, _, _ = seen[0]
        sinks_and_recent = list(range(4)) + list(range(90 - budget + 4, 90))
        assert torch.equal(cache.layers[0].keys[0, 0], k[0, 0, sinks_and_recent])


def _kept_positions(cache, seen):
    """[L, Hkv, K] prompt positions of each layer's kept keys (row 0), found by value."""
    positions = []
    for i, layer in enumerate(cache.layers):
        k = seen[i][1][0]
        match = (layer.keys[0][:, :, None, :] == k[:, None, :, :]).all(-1)
        assert bool((match.sum(-1) == 1).all())
        positions.append(match.float().argmax(-1))
    return torch.stack(positions)


def test_random_keeps_seeded_content_independent_positions(monkeypatch):
    """method='random': which positions are kept depends on the seed, the layer and the head,
    never on the prompt; the window is always kept."""
    model = tiny_llama()
    seen = hf_models.record_attention(monkeypatch)
    budget = 30
    runs = {}
    for seed, prompt_seed in [(0, 1), (0, 2), (1, 1)]:
        with mixkv.patch(model, "random", budget=budget, window=W, seed=seed):
            cache = DynamicCache(config=model.config)
            model(prompt(90, seed=prompt_seed), past_key_values=cache, use_cache=True)
        runs[seed, prompt_seed] = _kept_positions(cache, seen)
    kept = runs[0, 1]
    assert torch.equal(kept, runs[0, 2])       # another prompt: same positions
    assert not torch.equal(kept, runs[1, 1])   # another seed: other positions
    assert not torch.equal(kept[0], kept[1])   # layers draw independently
    assert not torch.equal(kept[:, 0], kept[:, 1])  # so do heads
    assert bool((kept[..., -W:] == torch.arange(90 - W, 90)).all())
    assert bool((kept.diff(dim=-1) > 0).all())


def test_generate_equals_hand_written_loop():
    model = tiny_llama()
    ids = prompt(70)
    with mixkv.patch(model, "mixkv", budget=24, window=W):
        seq, _ = greedy(model, ids)
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for step in range(5):
            position = torch.tensor([[70 + step]])  # true positions: the cache is shorter
            out = model(tokens[-1][:, None], past_key_values=cache, position_ids=position,
                        use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(seq[0, 70:], torch.cat(tokens))
    assert cache.get_seq_length() == 24 + 5


def test_question_appended_after_compressed_context():
    """Compress the context alone, then append a multi-token question: equal to feeding the
    question to a cache holding exactly the kept tokens at their true positions."""
    model = tiny_llama()
    context, question = prompt(80), prompt(7, seed=5)
    with mixkv.patch(model, "mixkv", budget=30, window=W):
        cache = DynamicCache(config=model.config)
        model(context, past_key_values=cache, use_cache=True)
        kept_keys = [layer.keys.clone() for layer in cache.layers]
        positions = torch.arange(80, 87)[None]
        out = model(question, past_key_values=cache, position_ids=positions, use_cache=True)
    # Reference: a fresh cache preloaded with the kept K/V, no patch.
    ref_cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        ref_cache.update(kept_keys[i], layer.values[:, :, :30], i)
    ref = model(question, past_key_values=ref_cache, position_ids=positions, use_cache=True)
    assert torch.equal(out.logits, ref.logits)
    assert cache.get_seq_length() == 37


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method,base", [("mixkv", "snapkv"), ("streamingllm", "snapkv"),
                                         ("mixkv", "adakv"), ("mixkv", "pyramidkv")])
def test_padded_rows_equal_single_runs(attn, method, base):
    if base != "snapkv" and not hasattr(torch.ops.mixkv, "ragged_attention"):
        pytest.skip("head-wise attention op not built")
    model = tiny_llama(attn)
    rows = [prompt(60, seed=2)[0], prompt(45, seed=3)[0]]
    with mixkv.patch(model, method, budget=24, window=W, base=base):
        alone = [greedy(model, r[None])[0][0, len(r):] for r in rows]
        batch = torch.zeros(2, 60, dtype=torch.long)
        mask = torch.zeros(2, 60, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            batch[b, 60 - len(r):], mask[b, 60 - len(r):] = r, 1
        seq, _ = greedy(model, batch, attention_mask=mask)
    for b in range(2):
        assert torch.equal(seq[b, 60:], alone[b]), b


def test_sampling_runs_and_is_seeded():
    model = tiny_llama()
    ids = prompt(60)
    with mixkv.patch(model, "mixkv", budget=20, window=W):
        torch.manual_seed(0)
        a = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
        torch.manual_seed(0)
        b = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=0)
    assert torch.equal(a, b) and a.shape == (1, 65)


def test_ratio_budget():
    model = tiny_llama()
    with mixkv.patch(model, "snapkv", ratio=0.75, window=W) as handle:
        cache = DynamicCache(config=model.config)
        model(prompt(100), past_key_values=cache, use_cache=True)
    assert cache.layers[0].keys.shape[-2] == 25
    stats = handle.stats()
    full = sum(2 * layer.keys.numel() * 4 * 4 for layer in cache.layers)  # 100 of 25, float32
    assert stats["total"] == dict(bytes_before=full, bytes_after=full // 4, ratio=0.25)
    assert sorted(stats["layers"]) == list(range(len(cache.layers)))
    for layer in stats["layers"].values():
        assert layer["prompt"] == 100 and layer["bytes_after"] * 4 == layer["bytes_before"]
        assert torch.equal(layer["kept"], torch.full_like(layer["kept"], 25))


def test_offline_redundancy_profile(tmp_path):
    model = tiny_llama()
    profile = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.save({"redundancy": profile}, tmp_path / "profile.pt")
    ids = prompt(80)
    caches = {}
    for name, redundancy in [("tensor", profile), ("file", tmp_path / "profile.pt")]:
        with mixkv.patch(model, "mixkv", budget=24, window=W, redundancy=redundancy):
            caches[name] = DynamicCache(config=model.config)
            model(ids, past_key_values=caches[name], use_cache=True)
    assert torch.equal(caches["tensor"].layers[1].keys, caches["file"].layers[1].keys)
    with pytest.raises(ValueError, match="redundancy profile has shape"):
        with mixkv.patch(model, "mixkv", budget=24, window=W, redundancy=torch.rand(3, 2)):
            model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)


def test_full_method_never_compresses():
    model = tiny_llama()
    ids = prompt(80)
    want = greedy(model, ids)
    with mixkv.patch(model, "full"):
        got = greedy(model, ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# -- refusals -------------------------------------------------------------------------------

def test_refuses_static_and_offloaded_caches():
    from transformers import StaticCache

    model = tiny_llama()
    ids = prompt(40)
    static = exactly("mixkv: cache_implementation='static' cannot be compressed (only the "
                     "default dynamic cache can); unset it")
    chunked = exactly("mixkv: chunked prefill (prefill_chunk_size) is not supported: "
                      "compression needs the whole prompt at once")
    with mixkv.patch(model, "mixkv", budget=20, window=W):
        with pytest.raises(NotImplementedError, match=r"^mixkv: cannot compress a StaticCache with "
                           r"StaticLayer layers; static, quantized and offloaded caches are not "
                           r"supported \(use the default DynamicCache\)$"):
            model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=64),
                  use_cache=True)
        with pytest.raises(NotImplementedError, match=static):
            model.generate(ids, max_new_tokens=2, cache_implementation="static")
        with pytest.raises(NotImplementedError,
                           match=exactly("mixkv: offloaded caches cannot be compressed")):
            model(ids, past_key_values=DynamicCache(config=model.config, offloading=True),
                  use_cache=True)
        with pytest.raises(NotImplementedError, match=chunked):
            model.generate(ids, max_new_tokens=2, prefill_chunk_size=16)
        # The same settings inside a GenerationConfig object, and on the model's own.
        from transformers import GenerationConfig

        with pytest.raises(NotImplementedError, match=static):
            model.generate(ids, generation_config=GenerationConfig(
                max_new_tokens=2, cache_implementation="static"))
        with pytest.raises(NotImplementedError, match=chunked):
            model.generate(ids, generation_config=GenerationConfig(max_new_tokens=2,
                                                                   prefill_chunk_size=16))


def test_a_cache_layer_that_calls_itself_sliding_stays_whole():
    """A layer class of a model's own (registered through transformers' ``_layer_type``) that
    says ``is_sliding`` is left alone even when the config does not list its layer as sliding;
    the other layers are compressed."""
    from transformers.cache_utils import DynamicLayer

    class OwnSlidingLayer(DynamicLayer):
        is_sliding = True

    model = tiny_llama()
    ids = prompt(40)
    cache = DynamicCache(config=model.config)
    cache.layers[0] = OwnSlidingLayer()
    with mixkv.patch(model, "mixkv", budget=20, window=W) as handle, torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        assert not handle.compressible(cache, 0) and sorted(handle.stats()["layers"]) == [1]
    assert [layer.get_seq_length() for layer in cache.layers] == [40, 20]


def test_default_method_is_mixkv():
    from mixkv.hf import patch as hf_patch
    from mixkv.methods import resolve

    model = tiny_llama()
    for entry in (mixkv.patch, hf_patch):
        with entry(model, budget=20, window=W) as handle:
            assert handle.method.label == "mixkv"
    resolved = resolve("snapkv", budget=20, window=W)
    with mixkv.patch(model, resolved) as handle:  # an already resolved Method is taken as is
        assert handle.method is resolved


def test_a_wrapper_module_with_get_decoder_is_patched():
    """Any module with get_decoder() can be patched, e.g. a user's nn.Module around a causal LM
    (no generation_config, no generate)."""
    class Wrapper(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def get_decoder(self):
            return self.lm.get_decoder()

        def forward(self, *args, **kwargs):
            return self.lm(*args, **kwargs)

    lm = tiny_llama()
    wrapper = Wrapper(lm)
    cache = DynamicCache(config=lm.config)
    with mixkv.patch(wrapper, "snapkv", budget=20, window=W), torch.no_grad():
        wrapper(prompt(40), past_key_values=cache, use_cache=True)
    assert [layer.get_seq_length() for layer in cache.layers] == [20, 20]
    assert not hasattr(wrapper, "_mixkv_patch") and "generate" not in vars(lm)


def test_model_generation_config_is_checked_at_patch_time():
    model = tiny_llama()
    model.generation_config.cache_implementation = "static"
    with pytest.raises(NotImplementedError, match="cache_implementation='static'"):
        mixkv.patch(model, "mixkv", budget=20, window=W)
    assert not hasattr(model, "_mixkv_patch")


def test_refuses_bad_options_and_double_patching():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown method 'mixkvv'"):
        mixkv.patch(model, "mixkvv", budget=64)
    with pytest.raises(ValueError, match="exactly one of budget"):
        mixkv.patch(model, "mixkv")
    with pytest.raises(ValueError, match="budget \\(8\\) must be larger than window \\(8\\)"):
        mixkv.patch(model, "mixkv", budget=8, window=8)
    with pytest.raises(ValueError, match="base='explicit' needs profile"):
        mixkv.patch(model, "mixkv", budget=64, base="explicit")
    with mixkv.patch(model, "mixkv", budget=64):
        with pytest.raises(RuntimeError, match="already patched"):
            mixkv.patch(model, "snapkv", budget=64)


def test_refuses_unsupported_architecture():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(NotImplementedError, match="Sequential is not a supported architecture"):
        mixkv.patch(model, "mixkv", budget=64)


# -- head-wise budgets ----------------------------------------------------------------------

@pytest.mark.parametrize("base", ["adakv", "pyramidkv", "explicit"])
def test_headwise_cache_keeps_the_ops_selection_and_saves_memory(monkeypatch, base):
    from mixkv.hf import HeadwiseLayer

    model = tiny_llama(layers=3)
    seen = hf_models.record_attention(monkeypatch)
    ids, budget = prompt(200), 40
    profile = torch.tensor([[1.0, 3.0], [2.0, 1.0], [1.0, 1.0]])
    policy = {"adakv": "adaptive", "pyramidkv": "pyramid", "explicit": "explicit"}[base]
    with mixkv.patch(model, "mixkv", budget=budget, window=W, base=base,
                     profile=profile if base == "explicit" else None) as handle:
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        kept_per_layer = []
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, HeadwiseLayer)
            q, k, v, _ = seen[i]
            want_k, want_v, _, offsets = torch.ops.mixkv.compress_ragged(
                q[..., -W:, :], k, v, None, budget, W, "mixkv", None, 5, "avg", "mean", 0.25,
                policy, 0.2, True, i, 3, 20, profile if base == "explicit" else None)
            lengths = offsets.diff().long()
            assert torch.equal(layer.kept_tokens().flatten(), lengths)
            held_keys, held_values, _ = layer.held()
            assert torch.equal(held_keys, want_k)
            assert torch.equal(held_values, want_v)
            kept_per_layer.append(lengths)
        if base != "pyramidkv":  # per layer, heads share the layer's budget exactly
            assert all(int(n.sum()) == 2 * budget for n in kept_per_layer)
        assert int(sum(n.sum() for n in kept_per_layer)) == 3 * 2 * budget
        assert len({tuple(n.tolist()) for n in kept_per_layer}) > 1  # budgets really differ
        total = handle.stats()["total"]
        assert total["ratio"] == pytest.approx(budget / 200)  # kept K/V bytes / full K/V bytes
        # Decoding appends in place: no reallocation while headroom lasts.
        buffer = cache.layers[0].key_buffer
        token = ids[:, -1:]
        for step in range(5):
            model(token, past_key_values=cache, position_ids=torch.tensor([[200 + step]]),
                  use_cache=True)
        assert cache.layers[0].key_buffer is buffer
        assert torch.equal(cache.layers[0].kept_tokens().flatten(), kept_per_layer[0] + 5)


def test_headwise_with_equal_budgets_decodes_like_the_dense_cache():
    """An explicit profile of equal weights keeps exactly the dense path's tokens: the head-wise
    cache + ragged attention then generate what the dense cache + sdpa generate."""
    model = tiny_llama()
    ids = prompt(90)
    with mixkv.patch(model, "mixkv", budget=24, window=W):
        dense_seq, dense_logits = greedy(model, ids)
    with mixkv.patch(model, "mixkv", budget=24, window=W, base="explicit",
                     profile=torch.ones(2, 2)):
        seq, logits = greedy(model, ids)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-5)


def test_headwise_cache_grows_when_headroom_runs_out():
    model = tiny_llama()
    ids = prompt(60)
    with mixkv.patch(model, "adakv", budget=20, window=W):
        out = model.generate(ids, max_new_tokens=80, do_sample=False, pad_token_id=0)
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        before = cache.layers[0].kept_tokens()
        token = ids[:, -1:]
        for step in range(70):  # more than the 64-token headroom
            model(token, past_key_values=cache, position_ids=torch.tensor([[60 + step]]),
                  use_cache=True)
    assert out.shape == (1, 140)
    assert torch.equal(cache.layers[0].kept_tokens(), before + 70)


@pytest.mark.parametrize("base", ["snapkv", "adakv"])
def test_compress_cache_of_a_padded_batch_equals_the_patched_prefill(monkeypatch, base):
    # handle.compress_cache(full prefill cache, window queries, key_mask) must leave exactly
    # the cache the patched forward builds, padding included.
    model = tiny_llama()
    seen = hf_models.record_attention(monkeypatch)
    batch = torch.cat([prompt(70, seed=4), prompt(70, seed=5)])
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :25] = 0
    with mixkv.patch(model, "mixkv", budget=24, window=W, base=base):
        patched = DynamicCache(config=model.config)
        model(batch, attention_mask=mask, past_key_values=patched, use_cache=True)
    full = DynamicCache(config=model.config)
    model(batch, attention_mask=mask, past_key_values=full, use_cache=True)
    queries = {i: q for i, (q, _, _, _) in seen.items()}
    another = _prefilled(model, batch)
    with mixkv.patch(model, "mixkv", budget=24, window=W, base=base) as handle:
        handle.compress_cache(full, queries, key_mask=mask.bool())
        with pytest.raises(KeyError, match="no window queries for layer 1"):
            handle.compress_cache(another, {0: queries[0]})
    for got, want in zip(full.layers, patched.layers):
        assert type(got) is type(want)
        if base == "snapkv":
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
        else:
            assert torch.equal(got.lengths, want.lengths) and torch.equal(got.valid, want.valid)
            assert torch.equal(got.key_buffer, want.key_buffer)


def test_an_attention_module_without_scaling_is_scored_at_one_over_sqrt_d(monkeypatch):
    """An attention module with no `scaling` attribute (an architecture of one's own) is scored
    at the ops' default, 1/sqrt(D): Llama's own scaling, so the same tokens are kept."""
    model = tiny_llama()
    seen = hf_models.record_attention(monkeypatch)
    with torch.no_grad():
        full = _prefilled(model, prompt(60))
    queries = {i: q for i, (q, _, _, _) in seen.items()}
    without = copy.deepcopy(full)
    with mixkv.patch(model, "snapkv", budget=20, window=W) as handle:
        handle.compress_cache(full, queries)
        scalings = [module.__dict__.pop("scaling") for module in handle.modules]
        try:
            assert not any(hasattr(module, "scaling") for module in handle.modules)
            handle.compress_cache(without, queries)
        finally:
            for module, scaling in zip(handle.modules, scalings):
                module.scaling = scaling
    assert scalings == [(64 // 4) ** -0.5] * 2
    for got, want in zip(without.layers, full.layers, strict=True):
        assert got.keys.shape[-2] == 20 and torch.equal(got.keys, want.keys)


def _prefilled(model, ids):
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    return cache


def test_headwise_decode_refuses_a_softcap_the_config_does_not_announce():
    # Gemma2-style models announce soft-capping in their config and are refused at patch time;
    # a softcap reaching the attention call any other way must not be silently dropped.
    model = tiny_llama()
    ids = prompt(60)
    with mixkv.patch(model, "adakv", budget=20, window=W):
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        step = dict(past_key_values=cache, position_ids=torch.tensor([[60]]), use_cache=True)
        with pytest.raises(NotImplementedError, match="head-wise budgets do not support "
                                                      "attention logit soft-capping"):
            model(ids[:, -1:], softcap=30.0, **step)
        model(ids[:, -1:], softcap=None, **step)   # None: no soft-capping, accepted


def test_headwise_attention_takes_the_calls_scaling_else_the_modules():
    """transformers passes ``scaling=`` to the attention function; a forward that does not
    gets its module's own ``scaling`` on a head-wise layer, never the op's 1/sqrt(D)."""
    from mixkv.hf import HeadwiseLayer

    model = tiny_llama()
    cache = DynamicCache(config=model.config)
    with mixkv.patch(model, "adakv", budget=20, window=W) as handle, torch.no_grad():
        model(prompt(40), past_key_values=cache, use_cache=True)
        module = handle.modules[0]
        layer = cache.layers[0]
        assert isinstance(layer, HeadwiseLayer)
        query = torch.randn(1, 4, 1, 16, generator=torch.Generator().manual_seed(0))
        want = {s: layer.attend(query, s)[0] for s in (0.3, 0.7)}
        assert not torch.equal(want[0.3], want[0.7])
        module.scaling = 0.3

        def dense(*args, **kwargs):
            raise AssertionError("a head-wise layer attends itself")

        state = handle._states[module]
        state.cache = cache      # what the pre-hook notes on a real call
        attend = state.attend
        assert torch.equal(attend(dense, module, query, None, None, None)[0], want[0.3])
        assert torch.equal(attend(dense, module, query, None, None, None, scaling=0.7)[0],
                           want[0.7])


def test_the_layers_cache_is_found_under_either_spelling():
    """transformers >= 5.2x passes a layer its cache as ``cache=``, earlier 5.x as
    ``past_key_values=`` (the transformers 5.3 venv runs that end to end)."""
    from mixkv.hf.model import cache_keyword, cache_of

    new, old = DynamicCache(), DynamicCache()
    assert cache_of(dict(cache=new)) is new and cache_of(dict(past_key_values=old)) is old
    assert cache_of(dict(cache=new, past_key_values=old)) is new and cache_of({}) is None

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            pass

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            pass

    assert (cache_keyword(New()), cache_keyword(Old())) == ("cache", "past_key_values")
