"""KVzip-style scores (mixkv/methods/kvzip.py, mixkv/hf/reconstruct.py) on tiny random models:
the reconstruction pass's scores equal the attention an eager model outputs on the same
sequences, whatever the chunk size; padded rows equal single runs; the cache is back to the
context after every chunk (and bit for bit afterwards); the patch compresses after the prefill
forward and keeps exactly the top-scored tokens; every policy, "+MixKV" and the evaluation run
it."""

import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv import methods as M  # noqa: E402
from mixkv.hf import reconstruct  # noqa: E402
from mixkv.hf.layers import HeadwiseLayer  # noqa: E402

import hf_models  # noqa: E402
from helpers import assert_same_selection, exactly  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W = 4
N = 42
PROMPT = [5, 6, 7]
# Peaked attention (logits in the tens): a probability's relative error is its logit's
# absolute error, which differs between sdpa and eager and between CPUs' vectorised
# reductions (1.2e-4 seen under ATEN_CPU_CAPABILITY=default).
TOL = dict(rtol=1e-3, atol=1e-6)


def _sharpened(build, attn="sdpa"):
    """A tiny model whose attention is peaked (hf_models.sharpen_attention)."""
    return hf_models.sharpen_attention(build(attn=attn)[0])


def _ids(length, seed=3):
    return torch.randint(2, hf_models.TEXT_VOCAB, (length,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def _prefill(model, ids, mask=None, positions=None):
    """A full prefill cache of `ids` [B, N] (unpatched)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
              **{hf_models.cache_kwarg(): cache})
    return cache


def _full_layers(model):
    types = getattr(model.config, "layer_types", None) or []
    return [i for i in range(model.config.num_hidden_layers)
            if i >= len(types) or "sliding" not in types[i]]


def reference(eager, ids, prompt, chunk, crop):
    """Independent: the eager model's own attention weights (output_attentions, no cache) on
    [context, prompt, context] (crop=False) or on [context, prompt, chunk] for each chunk
    (crop=True); max over the fed queries and each KV head's query heads -> {layer: [Hkv, N]}."""
    n = len(ids)
    runs = [ids + prompt + ids] if not crop else \
        [ids + prompt + ids[s:s + chunk] for s in range(0, n, chunk)]
    Hkv = eager.config.num_key_value_heads
    best = {}
    for seq in runs:
        with torch.no_grad():
            out = eager(input_ids=torch.tensor([seq]), output_attentions=True)
        for layer in _full_layers(eager):
            att = out.attentions[layer][0, :, n:, :n]                    # [Hq, fed, n]
            got = att.reshape(Hkv, -1, n).amax(1)
            best[layer] = torch.maximum(best.get(layer, got), got)
    return best


def _scores(model, ids, prompt, chunk, crop, **kw):
    batch = torch.tensor([ids])
    cache = _prefill(model, batch)
    return reconstruct.reconstruction_scores(model, cache, input_ids=batch, prompt_ids=prompt,
                                             chunk_size=chunk, crop_chunks=crop,
                                             layers=_full_layers(model), **kw)


@pytest.mark.parametrize("build", [hf_models.llama, hf_models.gemma3])
@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize("chunk", [N, 7, 10, 100])     # whole, divides N, does not, longer
def test_scores_equal_the_eager_models_attention(build, crop, chunk):
    model = _sharpened(build)                 # sdpa: the pass recomputes the softmax itself
    eager = _sharpened(build, attn="eager")   # same seed, same weights
    ids = _ids(N)
    got = _scores(model, ids, PROMPT, chunk, crop)
    want = reference(eager, ids, PROMPT, chunk, crop)
    assert sorted(got) == sorted(want) == _full_layers(model)
    for layer in want:
        torch.testing.assert_close(got[layer][0], want[layer], **TOL)
        # not vacuous: peaked attention, spread over the tokens
        assert float(want[layer].max()) > 0.3 and float(want[layer].std()) > 0.02


@pytest.mark.parametrize("crop", [True, False])
def test_scores_without_the_fused_kernel_and_with_logit_softcapping(monkeypatch, crop):
    """The log-sum-exp computed from the logits (no fused CPU kernel; always with soft-capping,
    Gemma 2) gives the eager model's attention too."""
    monkeypatch.setattr(reconstruct, "_flash_lse", lambda *a: None)
    ids = _ids(N)
    for build, attn in ((hf_models.llama, "sdpa"), (hf_models.gemma2, "eager")):
        model, eager = _sharpened(build, attn=attn), _sharpened(build, attn="eager")
        got = _scores(model, ids, PROMPT, 10, crop)
        want = reference(eager, ids, PROMPT, 10, crop)
        assert sorted(got) == sorted(want) and want
        for layer in want:
            torch.testing.assert_close(got[layer][0], want[layer], **TOL)
    assert model.config.attn_logit_softcapping     # soft-capping was on


def test_chunking_does_not_change_the_continuous_scores_and_cropping_does():
    model = _sharpened(hf_models.llama)
    ids = _ids(N)
    whole = _scores(model, ids, PROMPT, N, crop=False)
    for chunk in (7, 10, 1):
        chunked = _scores(model, ids, PROMPT, chunk, crop=False)
        for layer in whole:
            torch.testing.assert_close(chunked[layer], whole[layer], **TOL)
    # cropped chunks re-read each chunk after the prompt alone: later chunks see less
    cropped = _scores(model, ids, PROMPT, 7, crop=True)
    assert not torch.allclose(cropped[1], whole[1], **TOL)
    assert torch.allclose(_scores(model, ids, PROMPT, N, crop=True)[1], whole[1], **TOL)


@pytest.mark.parametrize("crop", [True, False])
def test_padded_rows_equal_single_runs(crop):
    model = _sharpened(hf_models.llama)
    lengths = [N, 30, 5]
    rows = [_ids(n, seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), N, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):   # left padding, positions counted over real tokens
        ids[b, N - len(row):] = torch.tensor(row)
        mask[b, N - len(row):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = _prefill(model, ids, mask, positions)
    got = reconstruct.reconstruction_scores(model, cache, input_ids=ids, key_mask=mask,
                                            positions=positions, prompt_ids=PROMPT,
                                            chunk_size=10, crop_chunks=crop)
    for b, row in enumerate(rows):
        single = _scores(model, row, PROMPT, 10, crop)
        for layer in single:
            torch.testing.assert_close(got[layer][b, :, N - len(row):], single[layer][0], **TOL)
            assert bool((got[layer][b, :, :N - len(row)] == 0).all())   # padding scores 0


def test_cache_is_back_to_the_context_after_every_chunk_and_intact_after(monkeypatch):
    model, _ = hf_models.gemma3()      # a sliding-window layer is put back too
    ids = torch.tensor([_ids(N)])
    cache = _prefill(model, ids)
    before = [(layer.keys.clone(), layer.values.clone(), layer.get_seq_length())
              for layer in cache.layers]
    seen_keys, after_chunk = [], []
    for name in ("max_attention", "attend_and_score"):   # the pass scores through either
        original = getattr(reconstruct, name)
        monkeypatch.setattr(reconstruct, name, lambda q, k, *a, _f=original:
                            seen_keys.append(k.shape[2]) or _f(q, k, *a))
    reconstruct.reconstruction_scores(
        model, cache, input_ids=ids, prompt_ids=PROMPT, chunk_size=10, crop_chunks=True,
        layers=_full_layers(model),
        on_chunk=lambda c, cch: after_chunk.append([layer.get_seq_length()
                                                    for layer in cch.layers]))
    assert len(after_chunk) == 5 and all(lengths == [b[2] for b in before]
                                         for lengths in after_chunk)
    assert max(seen_keys) == N + len(PROMPT) + 10      # never more than prompt + chunk extra
    for layer, (keys, values, length) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert layer.get_seq_length() == length
    for layer in _full_layers(model):   # the pass's tokens are freed, not kept behind a view
        keys = cache.layers[layer].keys
        assert keys.untyped_storage().nbytes() == keys.nbytes
    # continuous re-reading grows the cache while it runs, and is cropped back once at the end
    grown = []
    reconstruct.reconstruction_scores(
        model, cache, input_ids=ids, prompt_ids=PROMPT, chunk_size=10, crop_chunks=False,
        layers=_full_layers(model),
        on_chunk=lambda c, cch: grown.append(cch.layers[1].get_seq_length()))
    assert grown == [N + 3 + 10, N + 3 + 20, N + 3 + 30, N + 3 + 40, N + 3 + 42]
    for layer, (keys, values, length) in zip(cache.layers, before):
        assert torch.equal(layer.keys, keys) and layer.get_seq_length() == length


def _kvzip(**kw):
    """mixkv's former KVzip setup (the reference above re-reads it) with the ids prompt."""
    return {**M.kvzip.FORMER, **dict(repeat_prompt=PROMPT, chunk_size=7), **kw}


@pytest.mark.parametrize("build", [hf_models.llama, hf_models.gemma3])
def test_patch_keeps_exactly_the_top_scored_tokens_then_generates(build):
    model, eager = _sharpened(build), _sharpened(build, attn="eager")
    ids = _ids(N)
    batch = torch.tensor([ids])
    budget = 20
    full = _prefill(model, batch)
    want = reference(eager, ids, PROMPT, 7, crop=True)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mixkv.patch(model, "kvzip", budget=budget, window=W, **_kvzip()) as handle, \
                torch.no_grad():
            model(input_ids=batch, use_cache=True, **{hf_models.cache_kwarg(): cache})
            out = model.generate(batch, max_new_tokens=5, do_sample=False)
            # the evaluation's path (compress a copy of a full cache) keeps the same tokens
            copied = copy.deepcopy(full)
            handle.compress_cache(copied, {i: torch.zeros(1, 1, W, 1) for i in range(4)},
                                  context_ids=batch)
    assert out.shape == (1, N + 5)
    C = N - W
    for layer in _full_layers(model):
        kept = cache.layers[layer].keys[0]
        assert kept.shape[1] == budget
        for h in range(kept.shape[0]):
            top = want[layer][h, :C].topk(budget - W).indices.sort().values
            positions = [int((full.layers[layer].keys[0, h] == k).all(-1).nonzero()[0])
                         for k in kept[h]]
            assert positions[-W:] == list(range(C, N))           # the window is kept
            assert_same_selection(positions[:-W], top.tolist(), want[layer][h, :C], C)
        assert torch.equal(copied.layers[layer].keys, cache.layers[layer].keys)
    for layer in set(range(len(cache.layers))) - set(_full_layers(model)):
        assert torch.equal(cache.layers[layer].keys, full.layers[layer].keys)  # left alone


@pytest.mark.parametrize("method", [
    "kvzip", "kvzip+adakv", "kvzip+pyramidkv", "kvzip+explicit", "mixkv(kvzip)",
    "mixkv(kvzip)+adakv", "keydiff(kvzip)+pyramidkv",
    M.MixKV(M.KVzip(**_kvzip())), M.MixKV(M.AdaKV(M.KVzip(**_kvzip())))])
def test_every_policy_and_mix_runs_in_patch_and_generate(method):
    model, _ = hf_models.llama()
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, 40),
                        generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    options = {} if not isinstance(method, str) else _kvzip()
    if "explicit" in str(method):
        options["profile"] = torch.tensor([[1.0, 3.0], [2.0, 1.0]])
    calls = []
    original = reconstruct.reconstruction_scores

    def counted(*a, **k):
        calls.append(k["chunk_size"])
        return original(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reconstruct, "reconstruction_scores", counted)
        with mixkv.patch(model, method, budget=20, window=W, **options) as handle:
            out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            stats = handle.stats()["layers"]
    assert out.shape == (2, 44) and calls == [7]   # one pass, for the prefill only
    assert handle.method.needs_reconstruction
    kept = torch.stack([s["kept"] for s in stats.values()])            # [L, B, Hkv]
    if "pyramid" not in str(handle.method.label):
        assert kept.sum(-1).tolist() == [[40, 40], [40, 40]]


@pytest.mark.parametrize("method", ["kvzip", "kvzip+adakv"])
def test_generate_on_a_padded_batch_equals_single_runs(monkeypatch, method):
    """generate's prefill positions reach the pass: a left-padded row re-reads its context at
    its own positions and keeps, then generates, what it keeps alone."""
    model = _sharpened(hf_models.llama)
    rows = [_ids(N, seed=20), _ids(33, seed=21)]
    ids = torch.zeros(2, N, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, N - len(row):] = torch.tensor(row)
        mask[b, N - len(row):] = 1
    seen = []
    original = reconstruct.reconstruction_scores
    monkeypatch.setattr(reconstruct, "reconstruction_scores",
                        lambda *a, **k: seen.append(k["positions"]) or original(*a, **k))
    with mixkv.patch(model, method, budget=20, window=W, **_kvzip()):
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        singles = [model.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False)
                   for row in rows]
    assert seen[0] is not None and seen[0][1, N - 33:].tolist() == list(range(33))
    for b, single in enumerate(singles):
        assert batch[b, N:].tolist() == single[0, len(rows[b]):].tolist()


def test_compress_cache_of_a_padded_batch_equals_the_patched_prefill():
    """The evaluation's path re-reads a padded context with the mask, positions and text
    encoder it is given (``compress_cache(..., key_mask=, positions=, encode=)``) and keeps
    what the patched prefill of the same batch keeps."""
    model = _sharpened(hf_models.llama)
    tokenizer = hf_models.CharTokenizer()
    ids = torch.tensor([_ids(N, seed=22), _ids(N, seed=23)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    patched = DynamicCache(config=model.config)
    with mixkv.patch(model, "kvzip", budget=20, window=W, tokenizer=tokenizer, chunk_size=7), \
            torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
              **{hf_models.cache_kwarg(): patched})
    full = _prefill(model, ids, mask, positions)
    with mixkv.patch(model, "kvzip", budget=20, window=W, chunk_size=7) as handle:
        handle.compress_cache(full, {i: torch.zeros(2, 1, W, 1) for i in range(4)},
                              key_mask=mask.bool(), context_ids=ids, positions=positions,
                              encode=lambda text: tokenizer(text)["input_ids"])
    for layer in _full_layers(model):
        assert torch.equal(full.layers[layer].keys, patched.layers[layer].keys), layer
        assert torch.equal(full.layers[layer].values, patched.layers[layer].values), layer


def test_without_a_tokenizer_a_text_prompt_is_refused_and_ids_or_a_tokenizer_work():
    model, _ = hf_models.llama()
    ids = torch.tensor([_ids(N)])
    with mixkv.patch(model, "kvzip", budget=20, window=W):
        with pytest.raises(ValueError, match="no tokenizer is at hand"):
            model(input_ids=ids)
    tokenizer = hf_models.CharTokenizer()
    text = M.KVzip(tokenizer=tokenizer)
    assert text.prompt_ids() == tokenizer(M.kvzip.REPEAT_PROMPT)["input_ids"]
    assert M.KVzip(repeat_prompt=None).prompt_ids() == []
    assert M.KVzip(repeat_prompt=torch.tensor(PROMPT)).prompt_ids() == PROMPT
    with mixkv.patch(model, "kvzip", budget=20, window=W, tokenizer=tokenizer,
                     chunk_size=16) as handle:
        model(input_ids=ids)
        assert handle.stats()["layers"][0]["kept"].tolist() == [[20, 20]]
        with pytest.raises(ValueError, match=r"^mixkv: method 'kvzip' re-reads the context: "
                                             r"pass context_ids= \(or reconstruction=\) to "
                                             r"compress_cache$"):
            handle.compress_cache(_prefill(model, ids), {0: None, 1: None})
    p = M.Prefill(queries=None, keys=torch.zeros(1, 2, 10, 4), values=None, key_mask=None,
                  window=2, layer=0, num_layers=1)
    with pytest.raises(ValueError, match="needs the reconstruction pass"):
        M.KVzip().score(p)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        M.KVzip(chunk_size=0)


def test_compression_during_generation_refuses_a_reconstruction_scorer():
    model, _ = hf_models.llama()
    for method in ("kvzip", "mixkv(kvzip)+adakv"):
        with pytest.raises(NotImplementedError, match=exactly(
                f"mixkv: decode_budget does not support {method!r}: its scores come from a pass "
                "that re-reads the whole context (kvzip), not from the latest queries; use "
                "another scorer for compression during generation")):
            mixkv.patch(model, method, decode_budget=32, window=W, **_kvzip())
    assert getattr(model, "_mixkv_patch", None) is None


def test_a_budget_above_the_prompt_skips_the_pass_and_changes_nothing():
    model, _ = hf_models.llama()
    ids = torch.tensor([_ids(N)])
    want = model.generate(ids, max_new_tokens=4, do_sample=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reconstruct, "max_attention", lambda *a: pytest.fail("pass ran"))
        with mixkv.patch(model, "kvzip", budget=64, window=W, **_kvzip()):
            got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_a_reconstruction_scorer_that_reads_hidden_states_gets_its_layers_module_and_input():
    """A scorer of one's own may need both the reconstruction pass and the hidden states: the
    patch holds each layer's attention module and input until the pass has run."""
    seen = {}

    class KVzipReadingHidden(M.KVzip):
        needs_hidden_states = True

        def score(self, p):
            seen[p.layer] = (p.module, p.hidden_states)
            return super().score(p)

    model, _ = hf_models.llama()
    batch = torch.tensor([_ids(N)])
    inputs, hooks = {}, []

    def record(module, args, kwargs):
        inputs[module.layer_idx] = kwargs["hidden_states"]

    for layer in model.model.layers:  # each attention module's input in an unpatched prefill
        hooks.append(layer.self_attn.register_forward_pre_hook(record, with_kwargs=True))
    _prefill(model, batch)
    for hook in hooks:
        hook.remove()
    with mixkv.patch(model, KVzipReadingHidden(**_kvzip()), budget=20, window=W):
        _prefill(model, batch)
    assert sorted(seen) == _full_layers(model)
    for idx, (module, hidden) in seen.items():
        assert module is model.model.layers[idx].self_attn
        assert torch.equal(hidden, inputs[idx])


@pytest.mark.usefixtures("no_plots")
def test_evaluation_runs_kvzip_plain_and_mixed_with_one_pass_per_sample(tmp_path, monkeypatch):
    from mixkv.eval.runner import RunConfig, load_records, run
    from hf_models import tiny_eval_model

    calls = []
    original = reconstruct.reconstruction_scores
    monkeypatch.setattr(reconstruct, "reconstruction_scores",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    methods = ["kvzip+adakv", "mixkv(kvzip)+adakv"]
    config = RunConfig(tasks=["passkey"], lengths=[160], samples=2, methods=methods,
                       budgets=[24, 48], window=8, out=str(tmp_path), progress=False,
                       quiet=True)
    summary = run(config, em=tiny_eval_model())
    records = load_records(tmp_path / "results.jsonl")
    assert sorted({r["method"] for r in records}) == sorted(methods + ["full"])
    assert all(r["kv_ratio"] < 1 and r["compress_seconds"] > 0 for r in records
               if r["method"] != "full")
    assert len(calls) == 2          # one pass per sample, shared by budgets and the mix
    assert {(r["method"], r["base"]) for r in summary["paired"]} == \
        {("mixkv(kvzip)+adakv", "kvzip+adakv")}


# -- KVzip as its authors run it (the scorer's defaults) ------------------------------------------

class ChatCharTokenizer(hf_models.CharTokenizer):
    """CharTokenizer with a chat template: "SYS:" + the user's message + "|A:"."""

    chat_template = "SYS:{{ message }}|A:"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, **kw):
        assert add_generation_prompt and not tokenize and messages[0]["role"] == "user"
        return "SYS:" + messages[0]["content"] + "|A:"


def _official_reference(eager, ids, tokenizer, chunk, prefix):
    """Independent: the eager model's attention weights on [context, lead, chunk] for each chunk
    of the context after the ``prefix`` tokens, the lead being the official code's ("Repeat the
    previous context exactly." + header, then "... starting with " + the previous chunk's last
    8 tokens + header); each fed query's weights renormalised over the prefix, the chunk's own
    span and the fed tokens (the official softmax), max over queries and each KV head's query
    heads, over the chunks -> {layer: [Hkv, N]} (the prefix columns left out: kept)."""
    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    n, header = len(ids), encode("|A:")
    context = ids[prefix:]
    chunks = [context[s:s + chunk] for s in range(0, len(context), chunk)]
    Hkv = eager.config.num_key_value_heads
    best = {}
    for c, part in enumerate(chunks):
        lead = encode(M.kvzip.REPEAT_PROMPT) + header if c == 0 else \
            encode(M.kvzip.CHUNK_PROMPT) + chunks[c - 1][-8:] + header
        seq = ids + lead + part
        allowed = torch.zeros(len(seq), dtype=torch.bool)
        allowed[:prefix] = True                                          # the kept prefix
        start = prefix + c * chunk
        allowed[start:start + len(part)] = True                          # the chunk's span
        allowed[n:] = True                                               # the fed tokens
        with torch.no_grad():
            out = eager(input_ids=torch.tensor([seq]), output_attentions=True)
        for layer in _full_layers(eager):
            att = out.attentions[layer][0, :, n:, :].double()            # [Hq, fed, all]
            att = att * allowed / (att * allowed).sum(-1, keepdim=True)
            att[..., :start] = 0
            att[..., start + len(part):] = 0
            got = att[..., :n].reshape(Hkv, -1, n).amax(1).float()
            best[layer] = torch.maximum(best.get(layer, got), got)
    return best


@pytest.mark.parametrize("chunk", [10, 100])
def test_official_setup_scores_equal_the_eager_models_renormalised_attention(chunk):
    """The defaults re-read the context after the chat prefix with the official leads and
    softmax; the prefix is kept (+inf) and nothing else is."""
    model, eager = _sharpened(hf_models.llama), _sharpened(hf_models.llama, attn="eager")
    tokenizer = ChatCharTokenizer()
    prefix = tokenizer("SYS:")["input_ids"]
    ids = prefix + _ids(N - len(prefix))
    plan = M.KVzip(tokenizer=tokenizer, chunk_size=chunk).reconstruction_plan()
    assert plan["prefix_ids"] == prefix and plan["header_ids"] == tokenizer("|A:")["input_ids"]
    got = reconstruct.reconstruction_scores(model, _prefill(model, torch.tensor([ids])),
                                            input_ids=torch.tensor([ids]),
                                            layers=_full_layers(model), **plan)
    want = _official_reference(eager, ids, tokenizer, chunk, len(prefix))
    for layer in want:
        scores = got[layer][0]
        assert bool(torch.isposinf(scores[:, :len(prefix)]).all())
        assert bool(torch.isfinite(scores[:, len(prefix):]).all())
        torch.testing.assert_close(scores[:, len(prefix):], want[layer][:, len(prefix):], **TOL)
        assert float(want[layer].max()) > 0.3
    # the former setup (the model's own softmax over all keys, no header) scores differently
    former = M.KVzip(tokenizer=tokenizer, **dict(M.kvzip.FORMER, chunk_size=chunk))
    other = reconstruct.reconstruction_scores(model, _prefill(model, torch.tensor([ids])),
                                              input_ids=torch.tensor([ids]),
                                              layers=_full_layers(model),
                                              **former.reconstruction_plan())
    assert all(bool(torch.isfinite(other[layer]).all()) for layer in other)
    assert any((other[layer][0, :, 4:] - got[layer][0, :, 4:]).abs().max() > 1e-3
               for layer in want)


def test_the_pass_feeds_the_official_leads_and_rereads_after_the_prefix():
    model, _ = hf_models.llama()
    tokenizer = ChatCharTokenizer()
    encode = lambda text: tokenizer(text)["input_ids"]  # noqa: E731
    prefix = encode("SYS:")
    ids = prefix + _ids(30)
    cache = _prefill(model, torch.tensor([ids]))
    fed = []
    hook = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(kwargs["input_ids"][0].tolist()),
        with_kwargs=True)
    try:
        reconstruct.reconstruction_scores(
            model, cache, input_ids=torch.tensor([ids]),
            **M.KVzip(tokenizer=tokenizer, chunk_size=12).reconstruction_plan())
    finally:
        hook.remove()
    context, header = ids[4:], encode("|A:")
    assert fed == [encode(M.kvzip.REPEAT_PROMPT) + header + context[:12],
                   encode(M.kvzip.CHUNK_PROMPT) + context[4:12] + header + context[12:24],
                   encode(M.kvzip.CHUNK_PROMPT) + context[16:24] + header + context[24:]]


def test_kept_tokens_follow_sinks_and_a_context_without_the_prefix_keeps_none():
    model, _ = hf_models.llama()
    tokenizer = ChatCharTokenizer()
    prefix = tokenizer("SYS:")["input_ids"]
    rows = [prefix + _ids(N - 4), _ids(N - 10, seed=8)]        # row 1: no chat prefix, padded
    ids = torch.zeros(2, N, dtype=torch.long)
    mask = torch.zeros(2, N, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, N - len(row):] = torch.tensor(row)
        mask[b, N - len(row):] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for sinks, kept in (("prefix", [range(0, 4), range(0)]), (3, [range(0, 3), range(10, 13)]),
                        (0, [range(0), range(0)])):
        plan = M.KVzip(tokenizer=tokenizer, chunk_size=16, sinks=sinks).reconstruction_plan()
        got = reconstruct.reconstruction_scores(
            model, _prefill(model, ids, mask.long(), positions), input_ids=ids, key_mask=mask,
            positions=positions, layers=[0], **plan)[0]
        for b in range(2):
            infinite = torch.isposinf(got[b]).all(0).nonzero().flatten().tolist()
            assert infinite == list(kept[b]), (sinks, b)
            assert bool(torch.isfinite(got[b][:, ~torch.isposinf(got[b]).all(0)]).all())
    # compressed: every head keeps the kept tokens, whatever the budget, under every policy
    for name in ("kvzip", "kvzip+adakv", "mixkv(kvzip)+global"):
        with mixkv.patch(model, name, budget=8, window=W, tokenizer=tokenizer,
                         chunk_size=16) as handle:
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                      use_cache=True, **{hf_models.cache_kwarg(): cache})
        full = _prefill(model, ids, mask.long(), positions)
        layer = cache.layers[0]
        for h in range(2):
            if isinstance(layer, HeadwiseLayer):
                start, length = int(layer.starts[h]), int(layer.lengths[h])
                kept_keys = layer.key_buffer[start:start + length]
            else:
                kept_keys = layer.keys[0, h]
            for j in range(4):          # row 0's chat prefix
                assert bool((kept_keys == full.layers[0].keys[0, h, j]).all(-1).any()), \
                    (name, h, j)


def test_kvzip_options_are_checked():
    for kwargs, message in (
            (dict(reread="prefix"), "mixkv: kvzip reread must be 'context' or 'all', got "
                                    "'prefix'"),
            (dict(softmax="chunk"), "mixkv: kvzip softmax must be 'span' or 'all', got 'chunk'"),
            (dict(sinks=-1), "mixkv: kvzip sinks must be 'prefix' or an int >= 0, got -1"),
            (dict(sinks=True), "mixkv: kvzip sinks must be 'prefix' or an int >= 0, got True"),
            (dict(overlap=-2), "mixkv: kvzip overlap must be an int >= 0, got -2")):
        with pytest.raises(ValueError, match=exactly(message)):
            M.KVzip(**kwargs)
    with pytest.raises(TypeError, match="kvzip chunk_prompt must be text"):
        M.KVzip(chunk_prompt=3.5)
    with pytest.raises(ValueError, match=exactly(
            "mixkv: kvzip's chunk_prompt is text but no tokenizer is at hand: pass "
            "tokenizer=..., chunk_prompt=[token ids] or chunk_prompt=None")):
        M.KVzip(repeat_prompt=PROMPT).reconstruction_plan()
    model, _ = hf_models.llama()
    cache = _prefill(model, torch.tensor([_ids(N)]))
    with pytest.raises(ValueError, match=exactly(
            "mixkv: the reconstruction pass's softmax must be 'all' or 'span', got 'x'")):
        reconstruct.reconstruction_scores(model, cache, input_ids=torch.tensor([_ids(N)]),
                                          softmax="x")
