"""Version probe: fails loudly when transformers changes one of the facts the shim relies on
(see docs/design.md section 7 and mixkv/hf/patch.py). Each assertion names the fact."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402


def test_transformers_is_5x():
    major = int(transformers.__version__.split(".")[0])
    assert major == 5, f"the shim was written for transformers 5.x, found {transformers.__version__}"


def test_attention_function_is_looked_up_per_call():
    """The one capture point: attention modules call get_interface(name, eager) every forward."""
    params = list(inspect.signature(ALL_ATTENTION_FUNCTIONS.get_interface).parameters)
    assert params[:2] == ["attn_implementation", "default"], params
    source = inspect.getsource(modeling_llama.LlamaAttention.forward)
    assert "ALL_ATTENTION_FUNCTIONS.get_interface(" in source
    assert "self.layer_idx" in source


def test_attention_function_receives_final_queries_and_cache_keys():
    seen = {}
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recorder(module, query, key, value, attention_mask, *args, **kwargs):
        seen.setdefault(module.layer_idx, (query.shape, key.shape, sorted(kwargs)))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    mapping["sdpa"] = recorder
    try:
        cache = DynamicCache(config=config)
        model(torch.randint(0, 50, (1, 9)), past_key_values=cache, use_cache=True)
    finally:
        mapping["sdpa"] = original
    q_shape, k_shape, kwarg_names = seen[0]
    assert tuple(q_shape) == (1, 4, 9, 8) and tuple(k_shape) == (1, 2, 9, 8)
    assert "scaling" in kwarg_names
    layer = cache.layers[0]
    assert type(layer) is DynamicLayer and layer.keys.shape == (1, 2, 9, 8)


def test_decoder_passes_the_cache_to_attention_by_keyword():
    source = inspect.getsource(modeling_llama.LlamaDecoderLayer.forward)
    assert "self.self_attn(" in source
    assert "hidden_states=hidden_states" in source
    assert ("past_key_values=past_key_values" in source) or ("cache=cache" in source)


def test_shorter_layer_tensors_drive_lengths_and_masks():
    """Assigning shorter keys/values after prefill: seq length and mask sizes follow."""
    layer = DynamicLayer()
    k = torch.randn(1, 2, 10, 4)
    layer.update(k, k)
    layer.keys, layer.values = k[:, :, :3], k[:, :, :3]
    assert layer.get_seq_length() == 3
    # one new query: newer transformers pass its length, 5.3 and older its cache_position
    query = 1 if "query_length" in inspect.signature(layer.get_mask_sizes).parameters \
        else torch.tensor([3])
    assert layer.get_mask_sizes(query) == (4, 0)
    assert DynamicSlidingWindowLayer.is_sliding is True


def test_prefill_chunking_and_cache_options_still_exist():
    from transformers import GenerationConfig

    config = GenerationConfig()
    assert hasattr(config, "prefill_chunk_size") and hasattr(config, "cache_implementation")
    assert "offloading" in inspect.signature(DynamicCache.__init__).parameters
