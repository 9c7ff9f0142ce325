#!/usr/bin/env bash
# The Hugging Face shim's tests under one transformers version, in a virtual environment of its
# own: CI runs the oldest supported version this way (the main environment, `make test`, has the
# newest).
#   scripts/transformers_test.sh [--install-only] [VENV] [pytest args...]
# The version is $MIXKV_TRANSFORMERS_OLDEST, else 5.3.0 (the oldest the shim supports); VENV
# defaults to .venv-transformers-VERSION in the repository (scripts/side_venv.sh: torch first).
# --install-only sets it up and runs nothing (scripts/setup.sh --kvpress).
source "$(dirname "$0")/side_venv.sh"
VERSION=${MIXKV_TRANSFORMERS_OLDEST:-5.3.0}
side_venv_args ".venv-transformers-$VERSION" "$@"
side_venv_create
if [ "$("$SIDE_PY" -c 'import transformers; print(transformers.__version__)' 2>/dev/null)" != "$VERSION" ]; then
  echo "mixkv: installing transformers==$VERSION"
  side_pip "transformers==$VERSION"
fi
side_pip "matplotlib>=3.5" "tqdm>=4.60"  # test_methods runs the evaluation, which plots
side_venv_check_ops
PYTHONPATH="$ROOT" "$SIDE_PY" -c "import mixkv, torch, transformers; \
print('mixkv transformers: transformers', transformers.__version__, '| torch', torch.__version__)"
[ "$INSTALL_ONLY" = 1 ] && exit 0
PYTHONPATH="$ROOT" "$SIDE_PY" -m pytest -q -p no:cacheprovider tests/hf/test_hf_patch.py \
  tests/hf/test_hf_architectures.py tests/hf/test_hf_probe.py tests/hf/test_hf_multidevice.py \
  tests/hf/test_hf_differential.py tests/hf/test_hf_headwise_cache.py tests/hf/test_hf_model_inputs.py \
  tests/hf/test_hf_layers.py tests/hf/test_hf_decode_compression.py \
  tests/methods/test_methods.py ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} \
  -k "not mrope"  # that test recomputes Qwen2-VL's queries with the merged mrope cos/sin of newer
                  # transformers (5.3 hands attention per-section ones); 5.3 runs the rest of it
