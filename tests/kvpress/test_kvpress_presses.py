"""mixkv's presses inside kvpress (mixkv.kvpress): each keeps exactly the tokens that
``torch.ops.mixkv.compress`` selects from the same window queries and cache, on tiny random
Llama and Qwen2 models, run by kvpress's own forward hooks; and they compose with kvpress's
AdaKVPress and PerLayerCompressionPress.

The op side gets the window queries the model itself computed (recorded from its attention
call, as mixkv's evaluation harness does), not the press's recomputation from hidden states;
the two are compared too. Where kvpress's top-k and the op differ, it may only be between
tokens whose press scores are exactly equal (mixkv keeps the lower position; torch.topk leaves
ties open)."""

import functools

import pytest
import torch

from kvpress import AdaKVPress, PerLayerCompressionPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

import hf_models
import mixkv
from mixkv.eval.engine import capture_window_queries
from mixkv.kvpress import (MixKVKeyDiffPress, MixKVMix3Press, MixKVPress, MixKVSnapKVPress,
                           MixKVValueNormPress, window_queries, window_scores)
from peers import (TINY, WINDOW, all_kept, differ_only_in_ties, op_kept,
                   prefill, ratio_for, record_scores, tiny_model)

LENGTH = 300
PRESSES = {"mixkv": MixKVPress, "attn": MixKVSnapKVPress, "vnorm": MixKVValueNormPress,
           "keydiff": MixKVKeyDiffPress, "mix3": MixKVMix3Press}
SHIM_METHOD = {"mixkv": "mixkv", "attn": "snapkv", "vnorm": "vnorm", "keydiff": "keydiff",
               "mix3": "mix3"}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@functools.lru_cache(maxsize=None)
def _prefill(name, seed):
    """Full keys/values of each layer, the model's own window queries, and each layer's
    hidden states and (cos, sin) at its attention input."""
    model = tiny_model(name)
    ids = hf_models._text_prompt(LENGTH, seed)
    inputs = {}

    def note(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    hooks = [layer.self_attn.register_forward_pre_hook(note, with_kwargs=True)
             for layer in model.model.layers]
    try:
        with capture_window_queries(model, WINDOW) as queries:
            keys, values = prefill(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return ids, keys, values, dict(queries), inputs


def _run_press(name, seed, press):
    ids, keys, _, _, _ = _prefill(name, seed)
    scores = record_scores(press)
    return all_kept(keys, prefill(tiny_model(name), ids, press=press)[0]), scores


def _check_against_op(name, seed, kept, scores, budgets, mode="mixkv", redundancy=None):
    _, keys, values, queries, _ = _prefill(name, seed)
    model = tiny_model(name)
    for layer, budget in enumerate(budgets):
        module = model.model.layers[layer].self_attn
        r = None if redundancy is None else redundancy[layer].expand(1, keys[layer].shape[1])
        expected = op_kept(queries[layer], keys[layer], values[layer], budget, WINDOW, mode,
                           scaling=module.scaling, redundancy=r)
        assert all(len(head) == budget for head in kept[layer][0])
        differ_only_in_ties(kept[layer], expected, scores[layer])


@pytest.mark.parametrize("budget", [48, 200])
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("mode", list(PRESSES))
def test_press_keeps_what_the_op_selects(mode, name, seed, budget):
    press = PRESSES[mode](compression_ratio=ratio_for(LENGTH, budget), window_size=WINDOW)
    assert press.mode == mode
    kept, scores = _run_press(name, seed, press)
    _check_against_op(name, seed, kept, scores, [budget] * len(kept), mode)
    for layer in kept:  # the window is always kept
        assert all(head[-WINDOW:] == list(range(LENGTH - WINDOW, LENGTH)) for head in layer[0])


@pytest.mark.parametrize("name", TINY)
def test_press_equals_the_shim_on_the_sametiny_model(name):
    """Through the mixkv shim too (the uniform path runs on kvpress's transformers)."""
    ids, keys, _, _, _ = _prefill(name, 1)
    for mode in PRESSES:
        press = PRESSES[mode](compression_ratio=ratio_for(LENGTH, 100), window_size=WINDOW)
        kept, scores = _run_press(name, 1, press)
        shim = all_kept(keys, prefill(tiny_model(name), ids,
                                      patch=dict(method=SHIM_METHOD[mode], budget=100,
                                                 window=WINDOW))[0])
        for layer in range(len(kept)):
            differ_only_in_ties(kept[layer], shim[layer], scores[layer])


@pytest.mark.parametrize("name", TINY)
def test_recomputed_window_queries_match_the_models(name):
    _, _, _, queries, inputs = _prefill(name, 1)
    model = tiny_model(name)
    for layer, (hidden, rope) in inputs.items():
        q = window_queries(model.model.layers[layer].self_attn, hidden, WINDOW, rope)
        torch.testing.assert_close(q, queries[layer], rtol=1e-5, atol=1e-6)


def test_offline_redundancy_profile():
    profile = torch.tensor([[0.9, 0.1], [0.0, 1.0]])
    press = MixKVPress(compression_ratio=ratio_for(LENGTH, 100), redundancy=profile)
    kept, scores = _run_press("llama", 1, press)
    _check_against_op("llama", 1, kept, scores, [100, 100], "mixkv", redundancy=profile)
    online, _ = _run_press("llama", 1, MixKVPress(compression_ratio=ratio_for(LENGTH, 100)))
    assert kept != online


def test_per_layer_compression_press():
    budgets = [64, 180]
    press = PerLayerCompressionPress(MixKVPress(),
                                     compression_ratios=[ratio_for(LENGTH, b) for b in budgets])
    scores = record_scores(press.press)
    ids, keys, _, _, _ = _prefill("qwen2", 2)
    kept = all_kept(keys, prefill(tiny_model("qwen2"), ids, press=press)[0])
    _check_against_op("qwen2", 2, kept, scores, budgets)
    assert press.press.compression_ratio == 0.0  # restored after each layer


@pytest.mark.parametrize("name", TINY)
def test_adakv_press_keeps_the_window_and_the_total(name):
    """AdaKVPress(MixKVPress): head-wise budgets by masking (kvpress's AdaKV saves no memory).
    Per layer exactly Hkv * n_kept tokens stay visible, never a window token is masked, every
    head keeps its safeguard share, and the visible candidates are the layer's best by
    MixKVPress's scores once the safeguard is counted."""
    budget, alpha = 100, 0.2
    inner = MixKVPress(compression_ratio=ratio_for(LENGTH, budget))
    press = AdaKVPress(inner, alpha_safeguard=alpha)
    scores = record_scores(inner)
    ids, _, _, _, _ = _prefill(name, 1)
    model = tiny_model(name)
    modules = [layer.self_attn for layer in model.model.layers]
    masked = {}

    def grab(module, args, kwargs, output):
        batch, head, position = module.masked_key_indices
        masked[module.layer_idx] = (head.tolist(), position.tolist())

    with torch.no_grad(), press(model):
        # registered after kvpress's hooks, so they see the masks of this very call
        hooks = [m.register_forward_hook(grab, with_kwargs=True) for m in modules]
        try:
            model(input_ids=ids, use_cache=True)
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
        finally:
            for hook in hooks:
                hook.remove()
    assert out.shape[1] == LENGTH + 3
    assert sorted(masked) == list(range(len(modules)))
    n_kept = compute_n_kept(LENGTH, inner.compression_ratio)
    n_safe = max(1, int(n_kept * alpha))
    for layer, (heads, positions) in masked.items():
        Hkv = scores[layer].shape[1]
        assert len(positions) == Hkv * (LENGTH - n_kept)
        assert all(p < LENGTH - WINDOW for p in positions), "a window token was masked"
        visible = [set(range(LENGTH)) - {p for h, p in zip(heads, positions) if h == head}
                   for head in range(Hkv)]
        assert sum(map(len, visible)) == Hkv * n_kept
        assert all(len(v) >= n_safe for v in visible)
        s = scores[layer][0]
        # Every masked token scores no higher than every visible non-safeguarded token.
        safe = [set(s[h].topk(n_safe).indices.tolist()) for h in range(Hkv)]
        lowest_visible = min(s[h, p].item() for h in range(Hkv) for p in visible[h] - safe[h])
        highest_masked = max(s[h, p].item() for h, p in zip(heads, positions))
        assert highest_masked <= lowest_visible


def test_window_scores_rank_the_window_first_latest_first():
    candidates = torch.tensor([[[3.0, -1.0, 7.0], [0.5, 9.0, 2.0]]])
    scores = window_scores(candidates, 4)
    assert scores.shape == (1, 2, 7)
    assert torch.equal(scores[..., :3], candidates)
    window = scores[..., 3:]
    assert bool((window > 9.0).all()) and bool((window.diff(dim=-1) > 0).all())
    # a budget below the window keeps its most recent tokens
    assert sorted(scores[0, 0].topk(2).indices.tolist()) == [5, 6]


@pytest.mark.parametrize("kwargs, message", [
    (dict(compression_ratio=1.0), "MixKVPress: compression_ratio must be in [0, 1)"),
    (dict(window_size=0), "MixKVPress: window_size must be an integer >= 1"),
    (dict(kernel_size=4), "MixKVPress: kernel_size must be an odd integer"),
    (dict(mode="snap"), "MixKVPress: unknown mode 'snap'"),
    (dict(pooling="sum"), "MixKVPress: pooling must be 'avg' or 'max'"),
    (dict(gqa_reduce="min"), "MixKVPress: gqa_reduce must be 'mean' or 'max'"),
    (dict(mode="attn", redundancy=torch.zeros(2, 2)),
     "MixKVPress: a redundancy profile is only used by mode 'mixkv'"),
    (dict(redundancy=torch.zeros(2)), "MixKVPress: redundancy: mixkv: redundancy profile must"),
])
def test_bad_arguments_name_the_press_and_argument(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        MixKVPress(**kwargs)


def test_subclass_errors_name_the_subclass():
    with pytest.raises(ValueError, match="MixKVKeyDiffPress: window_size"):
        MixKVKeyDiffPress(window_size=-1)


def test_redundancy_profile_of_the_wrong_shape_is_refused_at_the_layer():
    press = MixKVPress(compression_ratio=0.5, redundancy=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"MixKVPress: redundancy profile has shape \(3, 2\), "
                                         r"the model needs \[2, 2\]"):
        prefill(tiny_model("llama"), hf_models._text_prompt(LENGTH, 1), press=press)


def test_prompt_not_longer_than_the_window_is_refused():
    press = MixKVPress(compression_ratio=0.5, window_size=64)
    with pytest.raises(ValueError, match=r"MixKVPress: the prompt \(40 tokens\) must be longer "
                                         r"than window_size \(64\)"):
        prefill(tiny_model("llama"), hf_models._text_prompt(40, 1), press=press)


def test_slicing_wrappers_are_refused():
    """ChunkPress scores slices of the sequence with the whole sequence's rotary embeddings:
    the window queries would sit at the wrong positions."""
    from kvpress import ChunkPress

    press = ChunkPress(MixKVPress(compression_ratio=0.5), chunk_length=128)
    with pytest.raises(ValueError, match=r"MixKVPress: this call has 128 hidden states but "
                                         r"rotary embeddings for 300 positions"):
        prefill(tiny_model("llama"), hf_models._text_prompt(LENGTH, 1), press=press)


@pytest.mark.parametrize("name", TINY)
def test_buffered_hidden_states_score_like_the_prefill(name):
    """DecodingPress hands the press a buffer of hidden states with the rotary embeddings of
    the current step only; the press then takes the positions from cache_position. Scoring the
    prefill that way gives the prefill's scores."""
    ids, keys, values, _, inputs = _prefill(name, 1)
    model = tiny_model(name)
    press = MixKVPress(compression_ratio=0.5)
    for layer, (hidden, (cos, sin)) in inputs.items():
        module = model.model.layers[layer].self_attn
        module.rotary_emb = model.model.rotary_emb  # as kvpress's press(model) does
        try:
            full = press.score(module, hidden, keys[layer], values[layer], None,
                               {"position_embeddings": (cos, sin)})
            step = press.score(module, hidden, keys[layer], values[layer], None,
                               {"position_embeddings": (cos[:, -1:], sin[:, -1:]),
                                "cache_position": torch.arange(LENGTH)[-1:]})
        finally:
            del module.rotary_emb
        torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-7)


def test_decoding_press_compresses_while_generating():
    from kvpress import DecodingPress

    ids = hf_models._text_prompt(LENGTH, 1)
    model = tiny_model("llama")
    press = DecodingPress(base_press=MixKVPress(), compression_interval=40, target_size=120,
                          hidden_states_buffer_size=64)
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=45, do_sample=False)
    assert out.shape[1] == LENGTH + 45
    # compressed to 120 at the 40th decoding step, then 5 more tokens (the last one's K/V are
    # not computed by generate)
    assert [cache.get_seq_length(i) for i in range(len(cache))] == [124, 124]


def test_no_compression_at_ratio_zero():
    ids, keys, _, _, _ = _prefill("llama", 1)
    kept = prefill(tiny_model("llama"), ids, press=MixKVPress())[0]
    assert all(torch.equal(a, b) for a, b in zip(kept, keys))
    assert mixkv.LIBRARY_PATH.exists()
