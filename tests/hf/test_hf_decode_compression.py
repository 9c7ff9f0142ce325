"""Compression during generation (``decode_budget=``, ``interval=``, mixkv/hf/decode.py) on tiny
random Llamas: the cache stays bounded at every step of a long generate, padded rows equal
single runs, a decode budget that covers everything changes nothing, a re-compression keeps the
ops' selection on the latest queries, head-wise equal budgets decode like the dense cache, and
bad arguments are refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import CompressedLayer, HeadwiseLayer  # noqa: E402
from mixkv.methods import AdaKV, MixKV, SnapKV  # noqa: E402

import hf_models  # noqa: E402
from helpers import assert_same_kept_rows  # noqa: E402

W = 8
VOCAB = 99
pytestmark = pytest.mark.usefixtures("one_thread")

needs_ragged = pytest.mark.skipif(not hasattr(torch.ops.mixkv, "ragged_attention"),
                                  reason="head-wise attention op not built")


def tiny_llama(attn="sdpa", layers=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, attn_implementation=attn)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None  # long generations never stop early
    return model


def prompt(length, batch=1, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, new, **kwargs):
    out = model.generate(ids, max_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits), out.past_key_values


def held_per_head(layer) -> torch.Tensor:
    """Tokens each (row, KV head) holds: [B, Hkv]."""
    if isinstance(layer, HeadwiseLayer):
        return layer.kept_tokens()
    B, Hkv, N = layer.keys.shape[:3]
    return torch.full((B, Hkv), N)


def ops_kept(queries, call, decode_budget, mode="mixkv", scaling=0.25):
    """(keys, values, positions) the fused op keeps from a recorded attention call's K/V with
    these window queries: the expected dense recompression (tiny Llama's scaling 1/sqrt(16))."""
    return torch.ops.mixkv.compress(queries, call["key"], call["value"], None, decode_budget, W,
                                    mode, None, 5, "avg", "mean", scaling)


def record_cache_sizes(model):
    """Before every forward: each layer's [B, Hkv] held tokens plus the call's new tokens (the
    most any head holds during that call's attention)."""
    sizes = []

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache is None or not getattr(cache, "layers", None) or ids is None:
            return
        if cache.get_seq_length() == 0:  # the prefill
            return
        sizes.append([held_per_head(layer) + ids.shape[1] for layer in cache.layers])

    return sizes, model.register_forward_pre_hook(hook, with_kwargs=True)


# -- memory stays bounded over a long generation ----------------------------------------------

@pytest.mark.parametrize("method,base", [("mixkv", "snapkv"), ("snapkv", "snapkv"),
                                         ("mixkv", "adakv"), ("snapkv", "pyramidkv"),
                                         ("streamingllm", "adakv")])
def test_cache_stays_bounded_over_a_long_generate(method, base):
    if base != "snapkv" and not hasattr(torch.ops.mixkv, "ragged_attention"):
        pytest.skip("head-wise attention op not built")
    model = tiny_llama(layers=3)
    ids, budget, decode_budget, interval, new = prompt(60), 24, 32, 8, 120
    with mixkv.patch(model, method, base=base, budget=budget, window=W,
                     decode_budget=decode_budget, interval=interval) as handle:
        sizes, hook = record_cache_sizes(model)
        seq, _, cache = generate(model, ids, new)
        hook.remove()
    assert seq.shape == (1, 60 + new)
    assert len(sizes) == new - 1  # every decode step was seen
    bound = decode_budget + interval
    for step in sizes:
        per_layer = torch.stack(step)                    # [L, B, Hkv]
        if base == "snapkv":                              # dense: every head
            assert int(per_layer.max()) <= bound, step
        elif base == "adakv":                             # each row shares the layer's total
            assert bool((per_layer.sum(-1) <= 2 * bound).all()), step
        else:  # pyramid: layer l keeps max(c_l + W, decode_budget), c_l <= 2c - c // 20
            c = decode_budget - W
            assert int(per_layer.max()) <= max(2 * c - c // 20 + W, decode_budget) + interval
    # It really compressed: without it the last step would hold 24 + 119 tokens per head.
    assert handle.decoding.compressions > 0
    final = torch.stack([held_per_head(layer) for layer in cache.layers]).float()
    assert final.mean() <= (bound if base != "pyramidkv" else 2 * bound)


def test_method_objects_and_a_gemma3_with_sliding_layers():
    """MixKV(AdaKV(SnapKV())) reaches the same options; sliding-window layers stay whole."""
    model, make_inputs = hf_models.gemma3()
    inputs = make_inputs(50)
    with pytest.warns(UserWarning, match="sliding-window"):
        handle = mixkv.patch(model, MixKV(AdaKV(SnapKV())), budget=20, window=W,
                             decode_budget=24, interval=4)
    with handle:
        out = model.generate(**inputs, max_new_tokens=60, do_sample=False,
                             return_dict_in_generate=True)
    assert out.sequences.shape == (1, 110)
    layers = out.past_key_values.layers
    for i in (1, 3):  # full-attention layers: head-wise, bounded
        assert isinstance(layers[i], HeadwiseLayer)
        assert float(layers[i].kept_tokens().float().mean()) <= 24 + 4
    assert handle.decoding.compressions > 0


def test_every_scorer_plain_and_mixed_under_every_base():
    """Every registered scorer but the hidden-states one and those scored by a reconstruction
    pass (refused, tests/methods/test_kvzip.py), plain and inside MixKV, on the dense and the head-wise
    caches: a generation 4x the decode budget stays bounded. (kvzap reads hidden states once
    per token: it runs, with a surrogate for this model.)"""
    from mixkv.methods import SCORERS

    model = tiny_llama()
    ids = prompt(40)
    names = [n for n in SCORERS if n not in ("expected_attention", "mixkv")
             and not SCORERS[n].needs_reconstruction]
    runs = [(n, "snapkv") for n in names] + [(f"mixkv({n})", "adakv") for n in names] + \
        [("tova", "adakv"), ("random", "pyramidkv"), ("mixkv(knorm)", "pyramidkv")]
    assert ("kvzap", "snapkv") in runs
    options = dict(weights=hf_models.kvzap_weights(model))
    for name, base in runs:
        with mixkv.patch(model, name, base=base, budget=20, window=W, decode_budget=24,
                         interval=6, **(options if "kvzap" in name else {})) as handle:
            seq, _, cache = generate(model, ids, 90)
            assert seq.shape == (1, 130) and handle.decoding.compressions > 0, (name, base)
        held = torch.stack([held_per_head(layer) for layer in cache.layers]).float()
        limit = 24 + 6 if base != "pyramidkv" else 2 * (24 - W) + W + 6
        assert float(held.mean(-1).max()) <= limit, (name, base)


# -- padded batches ----------------------------------------------------------------------------

KNORM_SCORE = lambda keys: -keys.norm(dim=-1)  # noqa: E731  (knorm's score of kept keys)
# Ties: two tokens' norms within the keys' own drift between runs (1e-3, as compared below).
KNORM_TIE = 1e-3


def _real_kept_keys(layer, b):
    """Row b's real kept keys per KV head, in cache order (a list over heads)."""
    if isinstance(layer, HeadwiseLayer):
        lengths = layer.lengths.view(layer.batch, layer.kv_heads)
        heads = []
        for h in range(layer.kv_heads):
            s = b * layer.kv_heads + h
            start = int(layer.starts[s])
            rows = torch.arange(start, start + int(lengths[b, h]))
            heads.append(layer.key_buffer[rows][layer.valid[rows]])
        return heads
    keys = layer.keys[b]
    real = getattr(layer, "kept_real", None)
    if real is not None:
        real = torch.cat([real[b], real.new_ones(keys.shape[1] - real.shape[1])])
        keys = keys[:, real]
    return list(keys)


@pytest.mark.parametrize("method,base", [("mixkv", "snapkv"), ("streamingllm", "snapkv"),
                                         ("mixkv", "adakv"), ("knorm", "pyramidkv")])
def test_padded_rows_equal_single_runs(method, base):
    if base != "snapkv" and not hasattr(torch.ops.mixkv, "ragged_attention"):
        pytest.skip("head-wise attention op not built")
    model = tiny_llama()
    # The last row is shorter than the prefill budget: uncompressed alone, padded in the batch
    # (not under PyramidKV: its prefill cuts a short row's layers in a batch, not alone).
    rows = [prompt(60, seed=2)[0], prompt(45, seed=3)[0], prompt(20, seed=4)[0]]
    if base == "pyramidkv":
        rows = rows[:2]
    options = dict(base=base, budget=24, window=W, decode_budget=32, interval=6)
    new = 50
    with mixkv.patch(model, method, **options) as handle:
        alone = [generate(model, r[None], new) for r in rows]
        batch = torch.zeros(len(rows), 60, dtype=torch.long)
        mask = torch.zeros(len(rows), 60, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            batch[b, 60 - len(r):], mask[b, 60 - len(r):] = r, 1
        seq, _, cache = generate(model, batch, new, attention_mask=mask)
        assert handle.decoding.compressions > 0
    # knorm ranks by ATen's key norm, and a token repeated in a prompt or in the generated text
    # has the same key norm at every position of layer 0 (RoPE is a rotation) up to rounding,
    # which differs between a batch and a single run and between CPUs: such a tie may flip.
    # Other methods' kept tokens must be the same.
    score, tie = (KNORM_SCORE, KNORM_TIE) if method == "knorm" else (None, 0.0)
    heads = flipped = 0
    for b, (single_seq, _, single_cache) in enumerate(alone):
        assert torch.equal(seq[b, 60:], single_seq[0, len(rows[b]):]), b
        for i, layer in enumerate(cache.layers):
            got, want = _real_kept_keys(layer, b), _real_kept_keys(single_cache.layers[i], 0)
            for h, (g, w) in enumerate(zip(got, want)):
                # Same tokens in the same order: decoded tokens' keys drift by float rounding
                # between a batch and a single run (~1e-4); two different tokens differ by ~0.1.
                flip = assert_same_kept_rows(g, w, 1e-3, score, tie)
                if not flip:  # the same tokens, in the same order too
                    torch.testing.assert_close(g, w, rtol=0, atol=1e-3)
                heads, flipped = heads + 1, flipped + flip
    assert flipped <= heads // 8, f"{flipped} of {heads} heads flipped a tie: not rare"


@pytest.mark.parametrize("attn,method", [("sdpa", "mixkv"), ("eager", "mixkv"),
                                         ("sdpa", "mixkv+adakv")])
def test_padded_batch_shorter_than_the_prefill_budget(attn, method):
    """No layer is compressed at prefill (every row fits the budget): the first decode-time
    compression reads the padding off the model's own decode mask (head-wise budgets: into
    each segment's valid flags)."""
    if "+" in method and not hasattr(torch.ops.mixkv, "ragged_attention"):
        pytest.skip("head-wise attention op not built")
    model = tiny_llama(attn)
    # Three rows, so that the batch size differs from the model's 2 KV heads.
    rows = [prompt(20, seed=5)[0], prompt(13, seed=6)[0], prompt(17, seed=7)[0]]
    options = dict(budget=24, window=W, decode_budget=26, interval=4)
    with mixkv.patch(model, method, **options) as handle:
        alone = [generate(model, r[None], 14)[0][0, len(r):] for r in rows]
        batch = torch.zeros(len(rows), 20, dtype=torch.long)
        mask = torch.zeros(len(rows), 20, dtype=torch.long)
        for b, r in enumerate(rows):
            batch[b, 20 - len(r):], mask[b, 20 - len(r):] = r, 1
        before = handle.decoding.compressions
        seq, _, cache = generate(model, batch, 14, attention_mask=mask)
        assert handle.decoding.compressions - before == 4  # steps 8 and 12, two layers
    # Padded slots rank last. At step 8 each row holds 28 slots and keeps 26: row 1 (13 real)
    # 21 real + 5 padded, row 2 (17 real) 25 + 1. At step 12 each holds those 26 + 4 decoded
    # and keeps 26: row 1 25 real + 1 padded, row 2 26 real.
    if method == "mixkv":
        assert isinstance(cache.layers[0], CompressedLayer)
        assert cache.layers[0].kept_real.sum(-1).tolist() == [26, 25, 26]
    else:  # head-wise: the long row has no padding, so every slot of its segments is valid
        layer = cache.layers[0]
        assert isinstance(layer, HeadwiseLayer)
        for h in range(layer.kv_heads):
            start, length = int(layer.starts[h]), int(layer.lengths[h])
            assert bool(layer.valid[start:start + length].all()), h
    for b in range(len(rows)):
        assert torch.equal(seq[b, 20:], alone[b]), b


# -- a decode budget that covers everything is a no-op ----------------------------------------

@pytest.mark.parametrize("method", ["mixkv", "mixkv+adakv", "snapkv+pyramidkv"])
def test_decode_budget_covering_everything_changes_nothing(method):
    if "+" in method and not hasattr(torch.ops.mixkv, "ragged_attention"):
        pytest.skip("head-wise attention op not built")
    model = tiny_llama()
    ids, new = prompt(50), 40
    with mixkv.patch(model, method, budget=24, window=W):
        want_seq, want_logits, _ = generate(model, ids, new)
    # Every head holds at most 50 + 40 tokens: a decode budget of 90 removes nothing.
    with mixkv.patch(model, method, budget=24, window=W, decode_budget=90, interval=3) as h:
        seq, logits, _ = generate(model, ids, new)
        assert h.decoding.compressions == 0
    assert torch.equal(seq, want_seq) and torch.equal(logits, want_logits)
    # A layer that reaches exactly the decode budget at a check has nothing to remove either:
    # the prefill keeps 24, and the 6th decode call (7 new tokens) brings every head to 30.
    with mixkv.patch(model, method, budget=24, window=W, decode_budget=30, interval=6) as h:
        generate(model, ids, 7)
        assert h.decoding.compressions == 0
    # A smaller decode budget does cut (the no-op above is the budget's doing, not a dead path).
    with mixkv.patch(model, method, budget=24, window=W, decode_budget=40, interval=3) as h:
        generate(model, ids, new)
        assert h.decoding.compressions > 0


# -- a re-compression keeps the method's selection on the latest queries ----------------------

@pytest.mark.parametrize("method,mode", [("mixkv", "mixkv"), ("snapkv", "attn"),
                                         ("keydiff", "keydiff"), ("knorm", None)])
def test_recompression_is_the_ops_selection_on_the_latest_queries(monkeypatch, method, mode):
    """Step by hand; at the step that compresses, the expected kept K/V is torch.ops.mixkv.compress
    on the K/V that step's attention saw, with the window queries assembled by the test from the
    recorded calls (the last 3 prefill queries and the 5 decode queries)."""
    model = tiny_llama()
    seen = hf_models.record_attention(monkeypatch)
    N, budget, decode_budget, interval = 70, 40, 30, 5
    ids = prompt(N)
    with mixkv.patch(model, method, budget=budget, window=W, decode_budget=decode_budget,
                     interval=interval):
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(interval):
            before = [layer.keys.shape[-2] for layer in cache.layers]
            out = model(token, past_key_values=cache, position_ids=torch.tensor([[N + step]]),
                        use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step < interval - 1:
                assert [layer.keys.shape[-2] for layer in cache.layers] == \
                    [b + 1 for b in before]
    for i, layer in enumerate(cache.layers):
        calls = [c for c in seen.calls if c["layer"] == i]
        assert len(calls) == 1 + interval
        queries = torch.cat([calls[0]["query"][..., -(W - interval):, :]]
                            + [c["query"] for c in calls[1:]], dim=-2)
        last = calls[-1]
        assert last["key"].shape[-2] == budget + interval  # what the compressing step saw
        if mode is None:  # knorm, defined here: the lowest key norms, then the window (the
            # scorer's norms bit for bit; an exact tie to the lower position: a stable sort)
            k, v, C = last["key"][0], last["value"][0], budget + interval - W
            lowest = [k[h, :C].norm(dim=-1).argsort(stable=True)[:decode_budget - W].sort().values
                      for h in range(2)]
            kept = [torch.cat([lowest[h], torch.arange(C, C + W)]) for h in range(2)]
            want_k = torch.stack([k[h, kept[h]] for h in range(2)])[None]
            want_v = torch.stack([v[h, kept[h]] for h in range(2)])[None]
        else:
            want_k, want_v, _ = ops_kept(queries, last, decode_budget, mode)
        assert isinstance(layer, CompressedLayer)
        assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)
        # The window (the 8 latest tokens, 5 of them decoded) is kept as the last slots.
        assert torch.equal(layer.keys[..., -W:, :], last["key"][..., -W:, :])


@needs_ragged
def test_headwise_equal_budgets_recompress_like_the_dense_cache():
    """An explicit profile of equal weights splits each layer evenly: the head-wise path (each
    segment scored alone, the policy, select_kv_ragged) must keep the dense path's tokens."""
    model = tiny_llama()
    ids, new = prompt(60), 70
    options = dict(budget=24, window=W, decode_budget=32, interval=7)
    with mixkv.patch(model, "mixkv", **options) as handle:
        dense_seq, dense_logits, dense_cache = generate(model, ids, new)
        assert handle.decoding.compressions > 0
    with mixkv.patch(model, "mixkv", base="explicit", profile=torch.ones(2, 2), **options):
        seq, logits, cache = generate(model, ids, new)
    assert torch.equal(seq, dense_seq)
    torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-5)
    for layer, dense in zip(cache.layers, dense_cache.layers):
        assert isinstance(layer, HeadwiseLayer)
        for got, want in zip(_real_kept_keys(layer, 0), _real_kept_keys(dense, 0)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_ragged
def test_headwise_recompression_keeps_each_heads_top_scores():
    """AdaKV: after a re-compression each row keeps Hkv * decode_budget tokens, every head its
    window, and within a head the candidates kept are its best by the segment's SnapKV score
    (computed here with window_importance on that head's tokens and the recorded queries)."""
    model = tiny_llama()
    N, decode_budget, interval = 60, 30, 8
    ids = prompt(N)
    with mixkv.patch(model, "adakv", budget=40, window=W, decode_budget=decode_budget,
                     interval=interval) as handle:
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for step in range(interval - 1):
            out = model(token, past_key_values=cache,
                        position_ids=torch.tensor([[N + step]]), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        full = []  # each head's segment before the compressing step, plus the new token later
        for layer in cache.layers:
            lengths = layer.lengths
            rows = [torch.arange(int(layer.starts[s]), int(layer.starts[s] + lengths[s]))
                    for s in range(len(lengths))]
            full.append([layer.key_buffer[r].clone() for r in rows])
        out = model(token, past_key_values=cache,
                    position_ids=torch.tensor([[N + interval - 1]]), use_cache=True)
        queries = {i: handle.decoding._queries[i].clone() for i in range(2)}  # the latest W
    assert handle.decoding.compressions == 2
    for i, layer in enumerate(cache.layers):
        lengths = layer.kept_tokens()[0]
        assert int(lengths.sum()) == 2 * decode_budget
        for h in range(2):
            start = int(layer.starts[h])
            kept = layer.key_buffer[start:start + int(lengths[h])]
            before = full[i][h]
            # The compressing step appended its token: the last W of (before + new) are kept.
            assert torch.equal(kept[-W:-1], before[-(W - 1):])
            # The candidates kept are the head's top scores among `before`'s candidates.
            group = queries[i][0, 2 * h:2 * h + 2]  # the query heads of KV head h, latest W
            candidates = before[:before.shape[0] - (W - 1)]
            keys = torch.cat([candidates, before[-(W - 1):], kept[-1:]])[None, None]
            scores = torch.ops.mixkv.window_importance(group[None], keys, None, 5, "avg",
                                                       "mean", 0.25)[0, 0]
            k = kept.shape[0] - W
            # An unpadded head's scores are the re-compression's bit for bit (a padded head's
            # differ by ~1e-7, its boundary gaps here >= 3e-4): only an exact tie could differ,
            # and it goes to the lower position, as in the ops: a stable sort.
            top = torch.sort(-scores, stable=True).indices[:k].sort().values
            assert torch.equal(kept[:k], candidates[top])


@needs_ragged
@pytest.mark.parametrize("seed,decode_budget", [(1, 30), (2, 48)])
def test_headwise_recompression_splits_unequal_segments_like_adakv(seed, decode_budget):
    """AdaKV's split at a re-compression when the prefill left the heads unequal: each head's
    capacity is AdaKV's allocation (reference.head_budgets) of importances the test computes on
    each head's own segment alone (reference.window_importance), right-aligned with zeros where
    a shorter head has no token; a head never keeps more candidates than it holds. In the second
    case AdaKV gives layer 0's shorter head (36 candidates against 44) more than it holds: the
    row's real slots are its longest head's, and the shorter head is capped at what it holds.
    The model's attention scaling is not 1/sqrt(D): the segments are scored with the module's."""
    from mixkv import reference

    model = tiny_llama()
    scaling = 0.4  # the model attends with it too (LlamaAttention passes self.scaling)
    for layer in model.model.layers:
        assert layer.self_attn.scaling == 16 ** -0.5
        layer.self_attn.scaling = scaling
    N, interval = 60, 8
    with mixkv.patch(model, "adakv", budget=40, window=W, decode_budget=decode_budget,
                     interval=interval) as handle:
        cache = DynamicCache(config=model.config)
        token = model(prompt(N, seed=seed), past_key_values=cache,
                      use_cache=True).logits[:, -1:].argmax(-1)
        for step in range(interval):
            if step == interval - 1:  # the step that re-compresses: each head's tokens before it
                segments = [[layer.key_buffer[int(s0):int(s0 + n)].clone()
                             for s0, n in zip(layer.starts, layer.lengths)]
                            for layer in cache.layers]
            out = model(token, past_key_values=cache, position_ids=torch.tensor([[N + step]]),
                        use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    assert handle.decoding.compressions >= 1  # a layer whose heads all fit stays whole (checked)
    unequal = capped = False
    for i, layer in enumerate(cache.layers):
        queries = handle.decoding._queries[i]                  # the latest W: [1, 4, W, D]
        kept_lengths = layer.kept_tokens()[0]
        starts = [int(s0) for s0 in layer.starts]
        heads = []
        for h, before in enumerate(segments[i]):
            last = layer.key_buffer[starts[h] + int(kept_lengths[h]) - 1]  # the step's new token
            heads.append(torch.cat([before, last[None]]))
        unequal |= len({len(k) for k in heads}) > 1
        longest = max(len(k) for k in heads)
        C = longest - W
        importance = torch.zeros(1, 2, C)
        for h, keys in enumerate(heads):
            scores = reference.window_importance(queries[:, 2 * h:2 * h + 2], keys[None, None],
                                                 scaling=scaling)
            importance[0, h, C - scores.shape[-1]:] = scores[0, 0]
        capacities = reference.head_budgets(importance, decode_budget - W, "adaptive")[0]
        for h, keys in enumerate(heads):
            want = min(int(capacities[h]), len(keys) - W)
            capped |= want < int(capacities[h])
            assert int(kept_lengths[h]) == want + W, (i, h)
            kept = layer.key_buffer[starts[h]:starts[h] + want + W]
            top = importance[0, h, C - (len(keys) - W):].topk(want).indices.sort().values
            assert torch.equal(kept[:want], keys[top]) and torch.equal(kept[want:], keys[-W:])
    assert unequal  # the case under test: heads of one row holding different counts
    assert capped == (seed == 2)


# -- refusals ---------------------------------------------------------------------------------

def test_bad_arguments_are_refused_by_name():
    model = tiny_llama()
    cases = [
        (dict(budget=24, window=8, decode_budget=8), ValueError,
         r"decode_budget \(8\) must be larger than window \(8\)"),
        (dict(budget=24, decode_budget=20), ValueError,  # default window 32
         r"decode_budget \(20\) must be larger than window \(32\)"),
        (dict(budget=24, window=8, decode_budget=32, interval=0), ValueError,
         "interval must be an int >= 1"),
        (dict(budget=24, window=8, decode_budget=32, interval=2.5), ValueError,
         "interval must be an int >= 1"),
        (dict(budget=24, window=8, interval=4), ValueError,
         r"^mixkv: interval=4 needs decode_budget= \(the tokens per KV head a generation "
         r"keeps\)$"),
        (dict(budget=24, window=8, decode_budget="1024"), TypeError,
         "decode_budget must be an int"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            mixkv.patch(model, "mixkv", **options)
    with pytest.raises(ValueError, match="^mixkv: decode_budget needs a compressing method, "
                                         "not 'full'$"):
        mixkv.patch(model, "full", decode_budget=64)
    with pytest.raises(NotImplementedError, match="^mixkv: decode_budget does not support "
                       "method 'expected_attention': its scorer reads the layers' hidden "
                       "states, which decoding does not keep$"):
        mixkv.patch(model, "expected_attention", budget=64, decode_budget=64)
    with pytest.raises(NotImplementedError, match="offline redundancy profile"):
        mixkv.patch(model, "mixkv+adakv", budget=24, window=8, decode_budget=32,
                    redundancy=torch.ones(2, 2))
    with mixkv.patch(model, "snapkv", window=W, budget=24, decode_budget=32):
        with pytest.raises(NotImplementedError, match="does not support beam search"):
            model.generate(prompt(40), max_new_tokens=4, num_beams=2, pad_token_id=0)
        with pytest.raises(NotImplementedError, match="assisted or prompt-lookup"):
            model.generate(prompt(40), max_new_tokens=4, prompt_lookup_num_tokens=3,
                           pad_token_id=0)
        with pytest.raises(NotImplementedError, match="assisted or prompt-lookup"):
            model.generate(prompt(40), max_new_tokens=4, assistant_model=tiny_llama(),
                           pad_token_id=0)
        # Beam search asked for by a GenerationConfig, or by the model's own config.
        from transformers import GenerationConfig

        with pytest.raises(NotImplementedError, match=r"beam search \(num_beams=3\)"):
            model.generate(prompt(40), generation_config=GenerationConfig(
                max_new_tokens=4, num_beams=3, pad_token_id=0))
        model.generation_config.num_beams = 2
        with pytest.raises(NotImplementedError, match=r"beam search \(num_beams=2\)"):
            model.generate(prompt(40), max_new_tokens=4, pad_token_id=0)
        model.generation_config.num_beams = 1  # one beam is greedy: accepted
        out = model.generate(prompt(40), max_new_tokens=4, num_beams=1, pad_token_id=0)
        assert out.shape == (1, 44)
    # Nothing was left patched by the refusals; decode_budget alone sets the prefill budget.
    with mixkv.patch(model, "snapkv", window=W, decode_budget=30, interval=4) as handle:
        assert handle.method.budget == 30 and handle.decoding.interval == 4
        cache = DynamicCache(config=model.config)
        model(prompt(50), past_key_values=cache, use_cache=True)
        assert cache.layers[0].keys.shape[-2] == 30
    with mixkv.patch(model, "snapkv", window=W, budget=30, decode_budget=40) as handle:
        assert handle.decoding.interval == 64  # the documented default
    # A ratio sets the prefill budget instead; interval=1 recompresses after every token.
    with mixkv.patch(model, "snapkv", window=W, ratio=0.5, decode_budget=40,
                     interval=1) as handle:
        assert (handle.method.ratio, handle.method.budget, handle.decoding.interval) == \
            (0.5, None, 1)
        cache = DynamicCache(config=model.config)
        model(prompt(60), past_key_values=cache, use_cache=True)
        assert cache.layers[0].keys.shape[-2] == 30
    # A window set by the scorer object counts (SnapKV(window=16): 20 > 16 is allowed).
    with mixkv.patch(model, MixKV(SnapKV(window=16)), decode_budget=20) as handle:
        assert handle.method.window == 16 and handle.method.budget == 20
    with pytest.raises(ValueError, match=r"decode_budget \(16\) must be larger than window "
                                         r"\(16\)"):
        mixkv.patch(model, MixKV(SnapKV(window=16)), decode_budget=16)
    resolved = mixkv.methods.resolve("mixkv", budget=24, window=W)  # a resolved Method
    with mixkv.patch(model, resolved, decode_budget=32, interval=4) as handle:
        assert handle.method is resolved and handle.decoding.decode_budget == 32


@pytest.mark.parametrize("method", ["mixkv", "mixkv+adakv"])
def test_compress_cache_then_decoding_equals_a_patched_prefill(method):
    """The evaluation's path (an unpatched prefill, then ``compress_cache``) starts the decode
    count like a patched prefill: token by token, recompressions happen at the same steps and
    the caches stay equal."""
    if "+" in method and not hasattr(torch.ops.mixkv, "ragged_attention"):
        pytest.skip("head-wise attention op not built")
    from mixkv.hf.capture import capture_prefill

    model = tiny_llama()
    ids = prompt(40)
    options = dict(budget=24, window=W, decode_budget=26, interval=4)
    runs = []
    for path in ("patched", "compress_cache"):
        cache = DynamicCache(config=model.config)
        if path == "compress_cache":
            with capture_prefill(model, W) as captured:
                model(ids, past_key_values=cache, use_cache=True)
        with mixkv.patch(model, method, **options) as handle:
            if path == "patched":
                model(ids, past_key_values=cache, use_cache=True)
            else:
                handle.compress_cache(cache, captured.queries)
            counts = []
            for step in range(10):
                model(ids[:, step:step + 1], past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[40 + step]]))
                counts.append(handle.decoding.compressions)
        runs.append((counts, cache))
    (counts, cache), (other_counts, other) = runs
    assert counts == other_counts and counts[0] == 0 and counts[-1] > 0
    assert counts.index(counts[-1]) < 9          # the last compression came before the end

    def stored_keys(layer):
        return layer.key_buffer if isinstance(layer, HeadwiseLayer) else layer.keys

    for layer, other_layer in zip(cache.layers, other.layers):
        assert torch.equal(stored_keys(layer), stored_keys(other_layer))


def test_decoding_a_cache_this_run_did_not_prefill(monkeypatch):
    """Caches prefilled without the patch (a cached system prompt, say), then decoded under
    decode_budget: each layer is compressed once the run holds W queries of its own (with
    interval < W, not at the first check), to the ops' selection on the latest W queries. A
    second cache with another batch size starts its queries afresh."""
    model = tiny_llama()
    N, decode_budget, interval = 60, 30, 5
    caches = {}
    with torch.no_grad():
        for batch in (1, 2):  # prefilled before patching: the patch never sees these prefills
            caches[batch] = DynamicCache(config=model.config)
            model(prompt(N, batch=batch, seed=batch), past_key_values=caches[batch],
                  use_cache=True)
    seen = hf_models.record_attention(monkeypatch)
    with mixkv.patch(model, "mixkv", budget=40, window=W, decode_budget=decode_budget,
                     interval=interval) as handle, torch.no_grad():
        for batch, cache in caches.items():
            seen.calls.clear()
            before = handle.decoding.compressions
            token = prompt(1, batch=batch, seed=10 + batch)
            for step in range(2 * interval):
                out = model(token, past_key_values=cache, use_cache=True,
                            position_ids=torch.full((batch, 1), N + step))
                token = out.logits[:, -1:].argmax(-1)
                if step == interval - 1:  # 5 queries held, fewer than W: nothing compressed
                    assert handle.decoding.compressions == before
                    assert [layer.keys.shape[-2] for layer in cache.layers] == [N + interval] * 2
            assert handle.decoding.compressions == before + 2
            for i, layer in enumerate(cache.layers):
                calls = [c for c in seen.calls if c["layer"] == i]
                assert len(calls) == 2 * interval
                queries = torch.cat([c["query"] for c in calls[-W:]], dim=-2)
                last = calls[-1]
                assert last["key"].shape[:3] == (batch, 2, N + 2 * interval)
                want_k, want_v, _ = ops_kept(queries, last, decode_budget)
                assert isinstance(layer, CompressedLayer)
                assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)


def test_gemma3_recompression_uses_the_models_attention_scaling(monkeypatch):
    """Decode-time twin of test_hf_model_inputs' scaling case: Gemma3 scales attention by
    query_pre_attn_scalar ** -0.5, not head_dim ** -0.5; the recompression of its full-attention
    layers is the ops' selection with the module's own scaling (and a default scaling would
    have kept other tokens, so the check can tell)."""
    model, make_inputs = hf_models.gemma3()
    seen = hf_models.record_attention(monkeypatch)
    N, budget, decode_budget, interval = 70, 40, 30, 5
    ids = make_inputs(N)["input_ids"]
    with pytest.warns(UserWarning, match="sliding-window"):
        handle = mixkv.patch(model, "mixkv", budget=budget, window=W,
                             decode_budget=decode_budget, interval=interval)
    with handle:
        cache = DynamicCache(config=model.config)
        token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for step in range(interval):
            out = model(token, past_key_values=cache, position_ids=torch.tensor([[N + step]]),
                        use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
    compressed = [i for i, layer in enumerate(cache.layers) if isinstance(layer, CompressedLayer)]
    assert compressed and handle.decoding.compressions == len(compressed)
    differs = []
    for i in compressed:
        calls = [c for c in seen.calls if c["layer"] == i]
        queries = torch.cat([calls[0]["query"][..., -(W - interval):, :]]
                            + [c["query"] for c in calls[1:]], dim=-2)
        last, scaling = calls[-1], calls[-1]["scaling"]
        assert scaling == model.get_decoder().layers[i].self_attn.scaling != 16 ** -0.5
        want_k, want_v, _ = ops_kept(queries, last, decode_budget, scaling=scaling)
        assert torch.equal(cache.layers[i].keys, want_k)
        assert torch.equal(cache.layers[i].values, want_v)
        differs.append(not torch.equal(ops_kept(queries, last, decode_budget, scaling=None)[0],
                                       want_k))
    assert any(differs)
