"""What the shim asks of a Hugging Face model, answered in one place: its attention modules, its
sliding-window layers and the ones it compresses, the name of its forward's cache argument, where
a call's cache is and a cache's layer.
Imports nothing else from ``mixkv.hf``, so every module of the shim can use it (and the
evaluation, the calibration and the benchmarks) without an import cycle."""

from __future__ import annotations

import inspect
from typing import List

from torch import nn


def find_attention_modules(model: nn.Module):
    """(decoder, its self-attention modules in layer order); a clear error if there are none."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in (layers or [])]
    if not modules or any(m is None or not hasattr(m, "layer_idx") for m in modules):
        raise NotImplementedError(
            f"mixkv: {type(model).__name__} is not a supported architecture: mixkv needs a "
            "decoder (model.get_decoder()) whose layers have a `self_attn` module with a "
            "`layer_idx` (Llama, Mistral, Qwen2/3, Gemma, Qwen2-VL, LLaVA language models)")
    return decoder, modules


def sliding_layers(config, num_layers: int) -> List[int]:
    """The layers that use sliding-window attention, which the shim leaves uncompressed: those
    a ``layer_types`` entry names sliding, or every layer when the config has a
    ``sliding_window`` and no ``layer_types`` (Mistral)."""
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "sliding_window", None) and not layer_types:
        return list(range(num_layers))
    return sorted(i for i, t in enumerate(layer_types) if "sliding" in str(t))


def compressed_layers(model: nn.Module):
    """(decoder, its attention modules, the layer indices the shim compresses): every layer
    but the sliding-window ones."""
    decoder, modules = find_attention_modules(model)
    sliding = set(sliding_layers(decoder.config, len(modules)))
    return decoder, modules, [m.layer_idx for m in modules if m.layer_idx not in sliding]


def cache_keyword(module: nn.Module) -> str:
    """The name of the cache argument of a model's or decoder's forward: transformers >= 5.2x
    calls it ``cache``, earlier 5.x ``past_key_values``."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def layer_of(cache, layer_idx: int):
    """Layer `layer_idx` of a cache (None when the cache has no such layer yet)."""
    layers = getattr(cache, "layers", None)
    return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None


def cache_of(kwargs):
    """The cache a layer's call got (its keyword arguments), under either name; None if none."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")
