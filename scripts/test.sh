#!/usr/bin/env bash
# All tests: pytest, the GoogleTest suite (ctest) and, when nvcc exists, the CUDA compile check
# (every CUDA source compiled for sm_80 and sm_90). Run scripts/setup.sh --test first
# (`make test` does both).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-$(nproc)}

echo "== pytest"
"$PY" -m pytest -q tests

echo "== C++ tests (GoogleTest via ctest)$(command -v nvcc >/dev/null && echo ' + CUDA compile check')"
CUDA_CHECK=OFF
command -v nvcc >/dev/null && CUDA_CHECK=ON
# Same build folder as setup.py: the op library is not compiled twice.
cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  -DMIXKV_BUILD_TESTS=ON -DMIXKV_CUDA_COMPILE_CHECK=$CUDA_CHECK >/dev/null
cmake --build build/cmake -j "$JOBS"
(cd build/cmake && ctest --output-on-failure)
