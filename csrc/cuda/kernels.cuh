// Launchers of the mixkv CUDA kernels: raw pointers and sizes only, no torch headers, so the
// .cu files compile fast and ops_cuda.cpp holds all torch-facing glue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace mixkv::cuda {

// Element type tags shared with the glue (kept here so the .cu files need no ATen types).
enum class DType { Float, Half, BFloat16 };

// out[r] = ||values[bh, j, :]||_2 for each candidate row r = bh * C + j (0 where the token is
// padding). values: [B * Hkv, N, D] contiguous; key_mask: [B, N] bool or nullptr.
void launch_value_norm(const void* values, DType dtype, const bool* key_mask, float* out,
                       int64_t B, int64_t Hkv, int64_t N, int64_t D, int64_t C,
                       cudaStream_t stream);

}  // namespace mixkv::cuda
