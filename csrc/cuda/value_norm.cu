// value_norm on CUDA: one warp per candidate row, fp32 accumulation, warp-shuffle reduction.
#include "cuda/dtype.cuh"

namespace mixkv::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void value_norm_kernel(const T* __restrict__ values, const bool* __restrict__ key_mask,
                                  float* __restrict__ out, int64_t Hkv, int64_t N, int64_t D,
                                  int64_t C, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t bh = row / C, j = row % C;
  if (key_mask != nullptr && !key_mask[(bh / Hkv) * N + j]) {
    if (lane == 0) out[row] = 0.f;
    return;
  }
  const T* x = values + (bh * N + j) * D;
  float sq = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    const float v = to_float(x[d]);
    sq += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
  if (lane == 0) out[row] = sqrtf(sq);
}

template <typename T>
void launch(const void* values, const bool* key_mask, float* out, int64_t B, int64_t Hkv,
            int64_t N, int64_t D, int64_t C, cudaStream_t stream) {
  const int64_t rows = B * Hkv * C;
  if (rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  value_norm_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(values), key_mask, out, Hkv, N, D, C, rows);
}

}  // namespace

void launch_value_norm(const void* values, DType dtype, const bool* key_mask, float* out,
                       int64_t B, int64_t Hkv, int64_t N, int64_t D, int64_t C,
                       cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    launch<decltype(tag)>(values, key_mask, out, B, Hkv, N, D, C, stream);
  });
}

}  // namespace mixkv::cuda
