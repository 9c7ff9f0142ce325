"""mixkv: MixKV KV-cache compression as PyTorch custom ops (``torch.ops.mixkv.*``).

Importing the package loads the compiled op library (CPU and Meta kernels always, CUDA kernels
when built with CUDA) and the Python fake kernels of the ragged ops.

The library is built against one torch (its C++ ABI changes between releases). setup.py records
that torch beside it (mixkv/_build_info.py); a different torch release is refused here, before
the library is loaded, with both versions and the rebuild command. Only the public version
X.Y.Z is compared: the local part (+cpu, +cu130) is not, since a CPU-built library loads in a
CUDA torch of the same release; a library that still fails to load (a CUDA-built one in a torch
without that CUDA, or one built by CMake directly, which records nothing) gets the same
explanation around the loader's error.
"""

from pathlib import Path
import importlib.machinery

import torch

try:  # written by setup.py when it builds the library
    from ._build_info import TORCH_VERSION as _BUILT_FOR
except ImportError:
    _BUILT_FOR = None

_HERE = Path(__file__).resolve().parent


def _rebuild_hint(here: Path) -> str:
    root = here.parent
    if (root / "setup.py").is_file() and (root / "CMakeLists.txt").is_file():  # a checkout
        return f"rebuild it against this torch: pip install --no-build-isolation -e {root}"
    return ("rebuild it against this torch: pip install --no-build-isolation . in a mixkv "
            "checkout, or install the mixkv wheel built for this torch")


def _load_library(here: Path = _HERE, built_for: str | None = _BUILT_FOR) -> Path:
    """Load ``here/_C<suffix>`` into torch.ops, after checking the torch it was built for."""
    running = str(torch.__version__)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"_C{suffix}"
        if not candidate.exists():
            continue
        if built_for is not None and built_for.split("+")[0] != running.split("+")[0]:
            raise ImportError(
                f"mixkv: the op library {candidate} was built for torch {built_for}, but torch "
                f"{running} is imported; {_rebuild_hint(here)}")
        try:
            torch.ops.load_library(str(candidate))
        except OSError as err:  # torch wraps the loader's error (undefined symbol: ...)
            reason = err.__cause__ if err.__cause__ is not None else err
            built = f"torch {built_for}" if built_for else "a torch it did not record"
            raise ImportError(
                f"mixkv: the op library {candidate} (built for {built}) does not load in torch "
                f"{running}: {reason}; {_rebuild_hint(here)}") from err
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
