"""mixkv: MixKV KV-cache compression as PyTorch custom ops (``torch.ops.mixkv.*``).

Importing the package loads the compiled op library (CPU and Meta kernels always, CUDA kernels
when built with CUDA) and the Python fake kernels of the ragged ops.
"""

from pathlib import Path
import importlib.machinery

import torch


def _load_library() -> Path:
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_C{suffix}"
        if candidate.exists():
            torch.ops.load_library(str(candidate))
            return candidate
    raise ImportError(
        f"mixkv: the compiled op library (_C*.so) is missing from {here}; build it with "
        "`pip install --no-build-isolation .` (or `-e .`) from the repository root")


LIBRARY_PATH = _load_library()

from . import _fake  # noqa: E402,F401  (registers fake kernels of the ragged ops)
from . import ops, reference  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["ops", "reference", "patch", "unpatch", "LIBRARY_PATH"]


def patch(model, method="mixkv", **options):
    """Compress `model`'s KV cache after every prefill; see :func:`mixkv.hf.patch`."""
    from .hf import patch as _patch  # transformers is imported only when patching

    return _patch(model, method, **options)


def unpatch(model):
    """Undo :func:`patch` (no-op if `model` is not patched)."""
    from .hf import unpatch as _unpatch

    _unpatch(model)
