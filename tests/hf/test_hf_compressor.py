"""The shim's one layer compressor (mixkv/hf/compressor.py), where the other hf tests do not look
(each case below was a surviving mutant of scripts/mutation.sh): the statistics of a layer left
whole, the refusal of one budget over layers of different lengths, the headroom of the
head-wise layers decoding installs, and a static scorer decoding after a prefill it did not
compress."""

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import HeadwiseLayer  # noqa: E402

import hf_models  # noqa: E402
from helpers import exactly  # noqa: E402

W = 8
pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n, seed=3):
    return torch.randint(2, hf_models.TEXT_VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _prefill(model, ids, cache):
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{hf_models.cache_kwarg(): cache})


def test_statistics_of_whole_and_compressed_layers():
    model, _ = hf_models.llama()
    with mixkv.patch(model, "snapkv", budget=24, window=W) as handle:
        assert handle.stats()["total"] == dict(bytes_before=0, bytes_after=0, ratio=1.0)
        short = DynamicCache(config=model.config)
        _prefill(model, _ids(20), short)              # 20 <= 24: left whole
        whole = handle.stats()
        long = DynamicCache(config=model.config)
        _prefill(model, _ids(50), long)
        cut = handle.stats()
    for layer, stats in whole["layers"].items():
        assert stats["prompt"] == 20 and stats["kept"].tolist() == [[20, 20]]
        assert stats["bytes_before"] == stats["bytes_after"] == \
            short.layers[layer].keys.nbytes + short.layers[layer].values.nbytes
    assert whole["total"]["ratio"] == 1.0
    for layer, stats in cut["layers"].items():
        assert stats["prompt"] == 50 and stats["kept"].tolist() == [[24, 24]]
        assert stats["bytes_after"] == 2 * long.layers[layer].keys.nbytes
        assert stats["bytes_before"] * 24 == stats["bytes_after"] * 50


def test_one_budget_over_layers_of_different_lengths_is_refused():
    model, _ = hf_models.llama()
    cache = DynamicCache(config=model.config)
    g = torch.Generator().manual_seed(0)
    queries = {}
    for layer, n in enumerate((40, 56)):   # a ratio gives each length its own budget
        keys, values = (torch.randn(1, 2, n, 16, generator=g) for _ in range(2))
        cache.update(keys, values, layer)
        queries[layer] = torch.randn(1, 4, W, 16, generator=g)
    with mixkv.patch(model, "snapkv+global", ratio=0.5, window=W) as handle:
        with pytest.raises(ValueError, match=exactly(
                "mixkv: method 'global' splits one budget over every layer, but the "
                "layers hold prompts of different lengths (budgets [20, 28])")):
            handle.compress_cache(cache, queries)


@pytest.mark.parametrize("budget", [24, 200])   # compressed at prefill, or left whole
def test_layers_decoding_installs_have_the_interval_as_headroom(budget):
    """A head-wise layer made during generation has room for exactly the next `interval`
    tokens (design section 7: no regrowth before the next compression)."""
    model, _ = hf_models.llama()
    interval = 5
    with mixkv.patch(model, "adakv", budget=budget, window=W, decode_budget=24,
                     interval=interval) as handle:
        # 6 decode calls after the prefill: one compression per layer, the layers it made
        out = model.generate(_ids(40), max_new_tokens=interval + 2, do_sample=False,
                             return_dict_in_generate=True)
    assert handle.decoding.compressions == 2
    for layer in out.past_key_values.layers:
        assert isinstance(layer, HeadwiseLayer) and layer.headroom == interval


def test_a_static_scorer_decodes_after_a_prefill_left_whole():
    """KVzap keeps a score per cached token: a prompt within the prefill budget is not
    compressed, but its scores must still be kept for the compressions during generation."""
    model, _ = hf_models.llama()
    with mixkv.patch(model, "kvzap", budget=64, window=W, decode_budget=24, interval=4,
                     weights=hf_models.kvzap_weights(model)) as handle:
        out = model.generate(_ids(30), max_new_tokens=12, do_sample=False,
                             return_dict_in_generate=True)
    assert [s["kept"].tolist() for s in handle.stats()["layers"].values()] == [[[30, 30]]] * 2
    assert handle.decoding.compressions > 0
    assert all(layer.keys.shape[-2] <= 24 + 4 for layer in out.past_key_values.layers)
