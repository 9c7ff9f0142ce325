// The portable row kernels (ATen's GEMM and exp, plain loops that the compiler vectorises for the
// baseline ISA) and the run-time choice between them and the AVX2 build.
#include "cpu/row_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

namespace mixkv::cpu {
namespace {

at::Tensor view(const float* data, at::IntArrayRef shape) {
  return at::from_blob(const_cast<float*>(data), shape, at::TensorOptions().dtype(at::kFloat));
}

// Packed layout: q transposed, [D, Rp] (the GEMM's right operand as is).
void pack_queries(const float* q, int64_t R, int64_t D, float* packed) {
  const int64_t Rp = padded_width(R);
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t r = 0; r < Rp; ++r) packed[d * Rp + r] = r < R ? q[r * D + d] : 0.f;
  }
}

void logits(const float* keys, int64_t rows, int64_t D, const float* packed, int64_t Rp,
            float* out) {
  at::Tensor result = view(out, {rows, Rp});
  at::mm_out(result, view(keys, {rows, D}), view(packed, {D, Rp}));
}

void column_max(const float* L, int64_t rows, int64_t Rp, float* max) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t r = 0; r < Rp; ++r) max[r] = std::max(max[r], L[j * Rp + r]);
  }
}

void exp_sum(float* L, int64_t rows, int64_t Rp, const float* shift, float* sum) {
  view(L, {rows, Rp}).sub_(view(shift, {Rp})).exp_();  // ATen's vectorised exp
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t r = 0; r < Rp; ++r) sum[r] += L[j * Rp + r];
  }
}

void group_dots(const float* L, int64_t rows, int64_t Rp, const float* weight, int64_t G,
                int64_t W, float* out, int64_t out_stride) {
  for (int64_t j = 0; j < rows; ++j) {
    const float* row = L + j * Rp;
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int64_t i = 0; i < W; ++i) sum += row[g * W + i] * weight[g * W + i];
      out[g * out_stride + j] = sum;
    }
  }
}

void row_norms(const float* x, int64_t rows, int64_t D, float* out) {
  for (int64_t j = 0; j < rows; ++j) {
    float sq = 0.f;
    for (int64_t d = 0; d < D; ++d) sq += x[j * D + d] * x[j * D + d];
    out[j] = std::sqrt(sq);
  }
}

void weighted_row_sum(const float* x, int64_t rows, int64_t D, const float* w, float* acc) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t d = 0; d < D; ++d) acc[d] += w[j] * x[j * D + d];
  }
}

void row_dots(const float* x, int64_t rows, int64_t D, const float* m, float* out) {
  for (int64_t j = 0; j < rows; ++j) {
    float dot = 0.f;
    for (int64_t d = 0; d < D; ++d) dot += x[j * D + d] * m[d];
    out[j] = dot;
  }
}

const RowKernels kGeneric{"generic", pack_queries, logits,           column_max,
                          exp_sum,   group_dots,   row_norms, weighted_row_sum,
                          row_dots};

}  // namespace

const RowKernels& generic_row_kernels() { return kGeneric; }

#ifdef MIXKV_HAVE_AVX2_KERNELS
extern const RowKernels kAvx2RowKernels;  // row_kernels_avx2.cpp
#endif

const RowKernels* avx2_row_kernels() {
#ifdef MIXKV_HAVE_AVX2_KERNELS
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported ? &kAvx2RowKernels : nullptr;
#else
  return nullptr;
#endif
}

const RowKernels& row_kernels() {
  const char* choice = std::getenv("MIXKV_CPU_KERNELS");
  if (choice == nullptr || *choice == '\0' || std::strcmp(choice, "auto") == 0) {
    const RowKernels* fast = avx2_row_kernels();
    return fast != nullptr ? *fast : kGeneric;
  }
  if (std::strcmp(choice, "generic") == 0) return kGeneric;
  if (std::strcmp(choice, "avx2") == 0) {
    const RowKernels* fast = avx2_row_kernels();
    TORCH_CHECK(fast != nullptr,
                "mixkv: MIXKV_CPU_KERNELS=avx2, but this build or this CPU lacks AVX2+FMA");
    return *fast;
  }
  TORCH_CHECK(false, "mixkv: MIXKV_CPU_KERNELS must be 'auto', 'generic' or 'avx2', got '",
              choice, "'");
}

}  // namespace mixkv::cpu
