"""The Hugging Face shim: ``patch(model, method=..., budget=...)`` and ``unpatch(model)``."""

from .headwise import HeadwiseLayer
from .patch import MixKVPatch, check_transformers_version, find_attention_modules, patch, unpatch

__all__ = ["patch", "unpatch", "MixKVPatch", "HeadwiseLayer", "find_attention_modules",
           "check_transformers_version"]
