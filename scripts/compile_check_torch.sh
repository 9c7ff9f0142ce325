#!/usr/bin/env bash
# Compile every C++/CUDA source against another torch's headers (no linking, no GPU), e.g. the
# torch 2.11 CUDA build of the GPU machine: scripts/compile_check_torch.sh 2.11.0
# Downloads that torch wheel once (~0.5 GB, kept in $MIXKV_TORCH_CACHE, default /tmp) and
# extracts only its headers. Not part of `make test` because of that download.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/compile_check_torch.sh TORCH_VERSION}
PY=${PYTHON:-python3}
CACHE=${MIXKV_TORCH_CACHE:-/tmp}/mixkv-torch-$VERSION
mkdir -p "$CACHE/obj"
if [ ! -d "$CACHE/torch/include" ]; then
  "$PY" -m pip download --quiet --no-deps "torch==$VERSION" -d "$CACHE/wheel"
  (cd "$CACHE" && unzip -q -o wheel/torch-*.whl 'torch/include/*')
fi
INC=(-Icsrc -I"$CACHE/torch/include" -I"$CACHE/torch/include/torch/csrc/api/include")
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
[ -d "$CUDA_HOME/include" ] && INC+=(-I"$CUDA_HOME/include")
status=0
for f in csrc/*.cpp csrc/cpu/*.cpp csrc/meta/*.cpp csrc/cuda/*.cpp; do
  isa=()
  [[ $f == *_avx2.cpp ]] && isa=(-mavx2 -mfma)  # as CMakeLists.txt compiles it
  g++ -std=gnu++20 -O1 -fPIC -DMIXKV_WITH_CUDA -Wall -Wno-unused-parameter -Werror "${isa[@]}" "${INC[@]}" \
    -c "$f" -o "$CACHE/obj/${f//\//_}.o" || { echo "FAILED: $f"; status=1; }
done
if command -v nvcc >/dev/null; then
  for f in csrc/cuda/*.cu; do
    nvcc -std=c++20 -arch=sm_90 --expt-relaxed-constexpr -Werror=all-warnings "${INC[@]}" \
      -c "$f" -o "$CACHE/obj/${f//\//_}.o" || { echo "FAILED: $f"; status=1; }
  done
fi
[ "$status" = 0 ] && echo "mixkv: every source compiles against torch $VERSION's headers"
exit "$status"
