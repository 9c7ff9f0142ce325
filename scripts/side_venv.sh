# Sourced by scripts/kvpress_test.sh and scripts/transformers_test.sh: tests that need another
# transformers than the main environment's run in a virtual environment of their own, with the
# same CPU torch, so the op library the tree already holds (mixkv/_C*.so, built by
# scripts/setup.sh) loads there unchanged and is imported from the tree (PYTHONPATH).
#   side_venv_args "$@"        parse [--install-only] [VENV] [pytest args...] into INSTALL_ONLY,
#                              SIDE_VENV (default: $1 of side_venv_args' caller) and PYTEST_ARGS
#   side_venv_create           create SIDE_VENV (from $PYTHON's interpreter) with torch first
#                              ($MIXKV_TORCH_SPEC, default torch==2.13.0: no CUDA wheel pulled)
#   side_pip ARGS...           pip install into it
#   side_venv_check_ops        fail clearly when the tree's op library does not load there
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

side_venv_args() {  # usage: side_venv_args DEFAULT_VENV "$@"
  SIDE_VENV=$1
  shift
  INSTALL_ONLY=0
  PYTEST_ARGS=()
  for arg in "$@"; do
    if [ "$arg" = "--install-only" ]; then INSTALL_ONLY=1
    elif [ ${#PYTEST_ARGS[@]} = 0 ] && [ "${arg#-}" = "$arg" ] && [ "${SIDE_VENV_SET:-0}" = 0 ]; then
      SIDE_VENV=$arg; SIDE_VENV_SET=1
    else PYTEST_ARGS+=("$arg"); fi
  done
  SIDE_PY="$SIDE_VENV/bin/python"
}

side_pip() { "$SIDE_PY" -m pip install --quiet --disable-pip-version-check "$@"; }

side_venv_create() {
  if [ ! -x "$SIDE_PY" ]; then
    echo "mixkv: creating $SIDE_VENV"
    "${PYTHON:-python3}" -m venv "$SIDE_VENV"
  fi
  local spec=${MIXKV_TORCH_SPEC:-torch==2.13.0}
  "$SIDE_PY" -c "import torch" 2>/dev/null || { echo "mixkv: installing $spec into $SIDE_VENV"; side_pip "$spec"; }
  "$SIDE_PY" -c "import pytest, numpy" 2>/dev/null || side_pip "pytest>=8" "numpy>=1.24"
}

side_venv_check_ops() {
  if ! ls mixkv/_C*.so >/dev/null 2>&1; then
    echo "mixkv: no op library in the tree; build it first (scripts/setup.sh)" >&2
    exit 1
  fi
  if ! PYTHONPATH="$ROOT" "$SIDE_PY" -c "import mixkv" 2>"$SIDE_VENV/import-error.txt"; then
    cat "$SIDE_VENV/import-error.txt" >&2
    echo "mixkv: mixkv/_C*.so does not load under $SIDE_VENV's torch" \
         "($("$SIDE_PY" -c 'import torch; print(torch.__version__)')): give both environments" \
         "the same torch (MIXKV_TORCH_SPEC)" >&2
    exit 1
  fi
}
