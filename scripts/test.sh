#!/usr/bin/env bash
# All tests: pytest, the GoogleTest suite (ctest) and, when an nvcc >= 12 exists, the CUDA
# compile check (every CUDA source compiled for sm_80 and sm_90). Run scripts/setup.sh --test
# first (`make test` does both). The tools are the ones scripts/buildtools.py finds at their
# minimum versions (the same ones setup.py built the op library with).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-$(nproc)}

echo "== pytest"
"$PY" -m pytest -q tests

CUDA_CHECK=(-DMIXKV_CUDA_COMPILE_CHECK=OFF)
if NVCC=$("$PY" scripts/buildtools.py find nvcc); then
  CUDA_CHECK=(-DMIXKV_CUDA_COMPILE_CHECK=ON "-DCMAKE_CUDA_COMPILER=$NVCC")
  echo "== C++ tests (GoogleTest via ctest) + CUDA compile check ($NVCC)"
else
  echo "== C++ tests (GoogleTest via ctest); no CUDA compile check (see the line above)"
fi
# Same build folder as setup.py: the op library is not compiled twice.
"$PY" scripts/buildtools.py configure build/cmake -DCMAKE_BUILD_TYPE=Release \
  -DMIXKV_BUILD_TESTS=ON "${CUDA_CHECK[@]}" >/dev/null
"$PY" scripts/buildtools.py build build/cmake -j "$JOBS"
"$PY" scripts/buildtools.py ctest build/cmake
