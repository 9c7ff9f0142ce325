"""``mixkv.kvpress.MethodPress``: every registered mixkv scorer under a uniform budget, plain and
inside MixKV, as a kvpress ScorerPress. It keeps exactly what ``mixkv.patch`` keeps with the
same method and budget (up to exact score ties), on tiny random Llama and Qwen2 models run by
kvpress's own hooks; it composes with AdaKVPress and kvpress's pipeline; what a ScorerPress
cannot run is refused by name. The methods come from the registry: a newly registered scorer
is tested here without editing any list."""

import functools

import pytest
import torch

from kvpress import AdaKVPress, DecodingPress
from kvpress.utils import compute_n_kept
from transformers import DynamicCache

import hf_models
from mixkv import methods as M
from mixkv.kvpress import MethodPress, MixKVPress
from peers import (TINY, WINDOW, all_kept, differ_only_in_ties, prefill, ratio_for,
                   record_scores, tiny_model)

LENGTH = 300
BUDGET = 100


def _scorer_methods():
    """Every registered scorer a ScorerPress can run (a reconstruction pass cannot: kvpress
    has its own KVzipPress), plain and, unless it is a mixer itself, inside MixKV."""
    names = []
    for name, cls in M.SCORERS.items():
        if cls.needs_reconstruction:
            continue
        names.append(name)
        if not issubclass(cls, M.Mixer):
            names.append(f"mixkv({name})")
    return names


METHODS = _scorer_methods()


def _options(method, model):
    """kvzap needs a surrogate for the tiny model (none ships for it): a random one."""
    return dict(weights=hf_models.kvzap_weights(model)) if "kvzap" in method else {}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@functools.lru_cache(maxsize=None)
def _full(name, seed):
    ids = hf_models._text_prompt(LENGTH, seed)
    return ids, prefill(tiny_model(name), ids)[0]


def test_the_registry_is_covered():
    assert {"tova", "knorm", "streamingllm", "random", "expected_attention", "mixkv(tova)",
            "mixkv(knorm)", "snapkv", "mixkv", "kvzap", "mixkv(kvzap)"} <= set(METHODS)
    assert "kvzip" not in METHODS


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", METHODS)
def test_press_keeps_what_the_shim_keeps(method, name):
    ids, keys = _full(name, 1)
    options = _options(method, tiny_model(name))
    press = MethodPress(compression_ratio=ratio_for(LENGTH, BUDGET), method=method,
                        options=options)
    scores = record_scores(press)
    kept = all_kept(keys, prefill(tiny_model(name), ids, press=press)[0])
    shim = all_kept(keys, prefill(tiny_model(name), ids,
                                  patch=dict(method=method, budget=BUDGET, window=WINDOW,
                                             **options))[0])
    assert len(kept) == len(shim) == tiny_model(name).config.num_hidden_layers
    for layer in range(len(kept)):
        assert all(len(head) == BUDGET for head in kept[layer][0])
        assert all(head[-WINDOW:] == list(range(LENGTH - WINDOW, LENGTH))
                   for head in kept[layer][0])                    # the window is kept
        differ_only_in_ties(kept[layer], shim[layer], scores[layer])


def test_options_reach_the_method():
    """streamingllm's sinks and random's seed change what is kept, as in mixkv.patch."""
    ids, keys = _full("llama", 1)
    kept = {}
    for key, options in {"4": dict(sinks=4), "20": dict(sinks=20)}.items():
        press = MethodPress(compression_ratio=ratio_for(LENGTH, BUDGET), method="streamingllm",
                            options=options)
        kept[key] = all_kept(keys, prefill(tiny_model("llama"), ids, press=press)[0])
    assert kept["4"][0][0][0][:20] == list(range(4)) + kept["4"][0][0][0][4:20]
    assert kept["20"][0][0][0][:20] == list(range(20))
    seeds = [all_kept(keys, prefill(tiny_model("llama"), ids, press=MethodPress(
        compression_ratio=ratio_for(LENGTH, BUDGET), method="random", options=dict(seed=s)))[0])
        for s in (0, 1)]
    assert seeds[0] != seeds[1]


def test_objects_and_names_are_one_method():
    ids, keys = _full("qwen2", 2)
    ratio = ratio_for(LENGTH, BUDGET)
    by_name = prefill(tiny_model("qwen2"), ids, press=MethodPress(ratio, method="mixkv(tova)"))[0]
    by_object = prefill(tiny_model("qwen2"), ids,
                        press=MethodPress(ratio, method=M.MixKV(M.SnapKV())))[0]
    snap = prefill(tiny_model("qwen2"), ids, press=MethodPress(ratio, method="mixkv"))[0]
    assert all(torch.equal(a, b) for a, b in zip(by_object, snap))
    assert not all(torch.equal(a, b) for a, b in zip(by_name, snap))


@pytest.mark.parametrize("method", ["tova", "mixkv(knorm)"])
def test_adakv_press_splits_any_method(method):
    """AdaKVPress(MethodPress(...)): per layer exactly Hkv * n_kept tokens stay visible, the
    window is never masked, and the masked tokens score no higher than the visible ones
    outside each head's safeguard."""
    inner = MethodPress(compression_ratio=ratio_for(LENGTH, BUDGET), method=method)
    press = AdaKVPress(inner, alpha_safeguard=0.2)
    scores = record_scores(inner)
    ids, _ = _full("llama", 1)
    model = tiny_model("llama")
    masked = {}

    def grab(module, args, kwargs, output):
        masked[module.layer_idx] = [x.tolist() for x in module.masked_key_indices[1:]]

    modules = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad(), press(model):
        hooks = [m.register_forward_hook(grab, with_kwargs=True) for m in modules]
        try:
            model(input_ids=ids, use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
    n_kept = compute_n_kept(LENGTH, inner.compression_ratio)
    n_safe = max(1, int(n_kept * 0.2))
    assert sorted(masked) == list(range(len(modules)))
    for layer, (heads, positions) in masked.items():
        s = scores[layer][0]
        Hkv = s.shape[0]
        assert len(positions) == Hkv * (LENGTH - n_kept)
        assert all(p < LENGTH - WINDOW for p in positions), "a window token was masked"
        visible = [set(range(LENGTH)) - {p for h, p in zip(heads, positions) if h == head}
                   for head in range(Hkv)]
        safe = [set(s[h].topk(n_safe).indices.tolist()) for h in range(Hkv)]
        lowest = min(s[h, p].item() for h in range(Hkv) for p in visible[h] - safe[h])
        assert max(s[h, p].item() for h, p in zip(heads, positions)) <= lowest
        if method != "tova":   # TOVA ranks every head alike (one mean over query heads)
            assert len({len(v) for v in visible}) > 1, "every head kept the same count"


def test_decoding_press_runs_a_query_scorer():
    ids = hf_models._text_prompt(LENGTH, 1)
    press = DecodingPress(base_press=MethodPress(method="tova"), compression_interval=40,
                          target_size=120, hidden_states_buffer_size=64)
    cache = DynamicCache()
    with torch.no_grad(), press(tiny_model("llama")):
        tiny_model("llama").generate(ids, past_key_values=cache, max_new_tokens=45,
                                 do_sample=False)
    assert [cache.get_seq_length(i) for i in range(len(cache))] == [124, 124]


def test_hidden_state_scorers_refuse_buffered_hidden_states():
    ids = hf_models._text_prompt(LENGTH, 1)
    press = DecodingPress(base_press=MethodPress(method="expected_attention"),
                          compression_interval=10, target_size=120,
                          hidden_states_buffer_size=64)
    with pytest.raises(ValueError, match=r"MethodPress: method 'expected_attention' reads the "
                                         r"hidden states of every cached token"):
        with torch.no_grad(), press(tiny_model("llama")):
            tiny_model("llama").generate(ids, past_key_values=DynamicCache(), max_new_tokens=12,
                                     do_sample=False)


@pytest.mark.parametrize("method, options, message", [
    ("mixkv+adakv", {}, r"MethodPress: method 'mixkv\+adakv' splits budgets by policy 'adakv'.*"
                        r"AdaKVPress\(MethodPress\(method=\.\.\.\)\)"),
    ("global", {}, r"MethodPress: method 'global' splits budgets by policy 'global'"),
    ("kvzip", {}, r"MethodPress: method 'kvzip' needs a reconstruction pass.*KVzipPress"),
    ("full", {}, r"MethodPress: method 'full' compresses nothing"),
    ("nosuch", {}, r"MethodPress: unknown method 'nosuch'"),
    ("tova", dict(sinks=3), r"MethodPress: option sinks=3 is not used by method 'tova'"),
])
def test_what_a_scorer_press_cannot_run_is_refused(method, options, message):
    with pytest.raises(ValueError, match=message):
        MethodPress(compression_ratio=0.5, method=method, options=options)


def test_values_and_repr():
    a = MethodPress(0.5, method="mixkv(tova)")
    assert a == MethodPress(0.5, method="mixkv(tova)") != MethodPress(0.5, method="tova")
    assert "method='mixkv(tova)'" in repr(a) and "compression_ratio=0.5" in repr(a)
    # the earlier presses keep their positional fields: ratio, window, kernel size, mode
    old = MixKVPress(0.5, 16, 3, "attn")
    assert (old.window_size, old.kernel_size, old.mode, old.method) == (16, 3, "attn", "snapkv")
