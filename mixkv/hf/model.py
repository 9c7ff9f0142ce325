"""What the shim asks of a Hugging Face model, answered in one place: its attention modules, its
sliding-window layers and the ones it compresses, the name of its forward's cache argument, where
a call's cache and hidden states are, a module's attention scaling, a cache's layer, and whether
the installed transformers is one the shim supports.
Imports nothing else from ``mixkv.hf``, so every module of the shim can use it (and the
evaluation, the calibration and the benchmarks) without an import cycle."""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from typing import List, Optional

import torch
from torch import nn

# The oldest transformers the shim is tested with (scripts/transformers_test.sh in CI; the
# newest runs in the main suite). README "Supported versions".
OLDEST_TRANSFORMERS = (5, 3)


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


def hidden_states_of(args, kwargs) -> Optional[torch.Tensor]:
    """An attention module's input hidden states [B, N, hidden] from its call arguments."""
    hidden = kwargs.get("hidden_states")
    return hidden if hidden is not None else (args[0] if args else None)


def attention_scaling(module: nn.Module, kwargs: Optional[dict] = None) -> Optional[float]:
    """The softmax scaling of an attention module's call (its ``scaling`` argument, else the
    module's attribute); None: 1/sqrt(head dim)."""
    scaling = (kwargs or {}).get("scaling", getattr(module, "scaling", None))
    return None if scaling is None else float(scaling)


def warn_from_caller(message: str) -> None:
    """A UserWarning attributed to the first frame outside the mixkv package: the user's line,
    however many frames of mixkv (or of wrappers around them) lie in between."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame = sys._getframe(1)
    while frame.f_back is not None and \
            os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame = frame.f_back
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"),
                           registry=frame.f_globals.setdefault("__warningregistry__", {}),
                           module_globals=frame.f_globals)


def _version_tuple(version: str):
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_transformers_version(version: Optional[str] = None) -> bool:
    """Warn (once per call site) when transformers is older than the oldest the shim supports;
    True when the version is supported."""
    if version is None:
        import transformers

        version = transformers.__version__
    if _version_tuple(version) >= OLDEST_TRANSFORMERS:
        return True
    oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
    warn_from_caller(f"mixkv: transformers {version} is older than {oldest}, the oldest the "
                      "shim supports (README 'Supported versions'); with kvpress, whose "
                      "transformers is older, use mixkv.kvpress's presses")
    return False
