// Launchers of the mixkv CUDA kernels: raw pointers and sizes only, no torch headers, so the
// .cu files compile fast and the glue files (scores.cpp, budgets.cpp, select.cpp,
// attention.cpp) hold all torch-facing code.
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

// ragged_attention: segment s = b * Hkv + h owns rows starts[s] .. starts[s] + lengths[s] of
// keys/values [S, D]; its q newest tokens' queries (query [B, Hq, q, D], contiguous) attend to
// it causally, skipping rows where valid [S] (or nullptr) is false; out is [B, q, Hq, D]. A
// segment outside the buffer or shorter than q gives NaN (checking it on the host would cost a
// device sync per call), a query that sees no valid token gives zeros.
constexpr int64_t kRaggedAttentionMaxHeadDim = 256;

struct RaggedAttention {
  const void* query;
  const void* keys;
  const void* values;
  const int32_t* starts;  // [B * Hkv]
  const int32_t* lengths;
  const bool* valid;
  void* out;
  float* workspace;  // plan_ragged_attention(...) floats
  DType dtype;
  int64_t B, Hq, Hkv, q, D, S;
  float scale;
  int64_t splits;  // token splits per segment, set by plan_ragged_attention
};

// Chooses p.splits for `device` and returns the workspace size in floats.
int64_t plan_ragged_attention(RaggedAttention& p, int device);
void launch_ragged_attention(const RaggedAttention& p, cudaStream_t stream);

}  // namespace mixkv::cuda
