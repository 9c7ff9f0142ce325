#!/usr/bin/env bash
# The Hugging Face shim's tests (tests/test_hf_*.py) under one transformers version, in a
# virtual environment of its own: CI runs the oldest supported version this way (the main
# environment, `make test`, has the newest).
#   scripts/transformers_test.sh [--install-only] [VERSION] [VENV] [pytest args...]
# VERSION defaults to $MIXKV_TRANSFORMERS_OLDEST, else 5.3.0 (the oldest the shim supports);
# VENV to .venv-transformers-VERSION in the repository. torch is installed first (the CPU build,
# $MIXKV_TORCH_SPEC, default torch==2.13.0, the same as scripts/setup.sh) so the tree's op
# library (mixkv/_C*.so, built by scripts/setup.sh) loads unchanged; without one it is built.
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
VERSION=${MIXKV_TRANSFORMERS_OLDEST:-5.3.0}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then VERSION=$1; shift; fi
VENV=.venv-transformers-$VERSION
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then VENV=$1; shift; fi
BASE_PY=${PYTHON:-python3}
TORCH_SPEC=${MIXKV_TORCH_SPEC:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || { echo "mixkv transformers: creating $VENV"; "$BASE_PY" -m venv "$VENV"; }
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
"$PY" -c "import torch" 2>/dev/null || { echo "mixkv transformers: installing $TORCH_SPEC"; pip_install "$TORCH_SPEC"; }
if [ "$("$PY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null)" != "$VERSION" ]; then
  echo "mixkv transformers: installing transformers==$VERSION"
  pip_install "transformers==$VERSION"
fi
"$PY" -c "import pytest, numpy" 2>/dev/null || pip_install pytest numpy

if ! ls mixkv/_C*.so >/dev/null 2>&1; then
  echo "mixkv transformers: building the op library in place"
  "$PY" -c "import setuptools, wheel" 2>/dev/null || pip_install setuptools wheel
  command -v cmake >/dev/null || pip_install "cmake>=3.18" ninja
  "$PY" setup.py --quiet build_ext --inplace
fi
PYTHONPATH="$ROOT" "$PY" -c "import mixkv, torch, transformers; \
print('mixkv transformers: transformers', transformers.__version__, '| torch', torch.__version__)"
[ "$INSTALL_ONLY" = 1 ] && exit 0
PYTHONPATH="$ROOT" "$PY" -m pytest -q -p no:cacheprovider tests/test_hf_patch.py \
  tests/test_hf_architectures.py tests/test_hf_probe.py tests/test_hf_multidevice.py "$@"
