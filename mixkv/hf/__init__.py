"""The Hugging Face shim: ``patch(model, method=..., budget=...)`` and ``unpatch(model)``.

``capture.py``: the attention-lookup wrapper (query capture); ``layers.py``: the compressed
cache layers; ``patch.py``: hooks, refusals, statistics; ``decode.py``: compression during
generation (``decode_budget``).
"""

from .capture import capture_prefill
from .decode import DecodeCompression
from .layers import CompressedLayer, HeadwiseLayer
from .patch import (MixKVPatch, check_transformers_version, find_attention_modules, patch,
                    unpatch)

__all__ = ["patch", "unpatch", "MixKVPatch", "HeadwiseLayer", "CompressedLayer",
           "find_attention_modules", "capture_prefill", "check_transformers_version",
           "DecodeCompression"]
