// The float32 inner loops of the CPU scoring ops, behind one table so that a build for the
// machine's vector unit can stand in for the portable one at run time. scores.cpp writes each
// op's algorithm once against this table; row_kernels.cpp holds the portable table (ATen's GEMM,
// plain loops) and row_kernels_avx2.cpp the AVX2+FMA one (hand-tiled GEMM, polynomial exp).
//
// Layout: the logits of one key block are [rows, Rp] row-major with Rp = padded_width(R): the
// columns past R come from zero queries and are never read back as results.
#pragma once

#include <cstdint>

namespace mixkv::cpu {

struct RowKernels {
  const char* name;
  // Window queries q [R, D] (row-major, already scaled) into the layout logits() reads:
  // packed_floats(R, D) floats, the columns past R zero.
  void (*pack_queries)(const float* q, int64_t R, int64_t D, float* packed);
  // out[j, r] = keys[j, :] . q[r, :] for j < rows, r < Rp (keys row-major [rows, D]).
  void (*logits)(const float* keys, int64_t rows, int64_t D, const float* packed, int64_t Rp,
                 float* out);
  // max[r] = max(max[r], L[j, r]) over the rows.
  void (*column_max)(const float* L, int64_t rows, int64_t Rp, float* max);
  // L[j, r] = exp(L[j, r] - shift[r]) (exactly 0 for -inf), and sum[r] += the new L[j, r].
  void (*exp_sum)(float* L, int64_t rows, int64_t Rp, const float* shift, float* sum);
  // out[g * out_stride + j] = sum_i L[j, g W + i] * weight[g W + i], g < G, i < W.
  void (*group_dots)(const float* L, int64_t rows, int64_t Rp, const float* weight, int64_t G,
                     int64_t W, float* out, int64_t out_stride);
  // out[j] = |x[j, :]|_2 (x row-major [rows, D]).
  void (*row_norms)(const float* x, int64_t rows, int64_t D, float* out);
  // acc[d] += sum_j w[j] x[j, d].
  void (*weighted_row_sum)(const float* x, int64_t rows, int64_t D, const float* w, float* acc);
  // out[j] = x[j, :] . m.
  void (*row_dots)(const float* x, int64_t rows, int64_t D, const float* m, float* out);
};

inline int64_t padded_width(int64_t R) { return (R + 7) / 8 * 8; }
inline int64_t packed_floats(int64_t R, int64_t D) { return padded_width(R) * D; }

// The table the ops use: AVX2+FMA when this build has it and the CPU supports it, else the
// portable one. MIXKV_CPU_KERNELS=generic forces the portable table (tests compare both),
// =avx2 insists on the fast one (an error where it is unavailable); read on every call.
const RowKernels& row_kernels();

const RowKernels& generic_row_kernels();
// nullptr when this build or this CPU lacks AVX2+FMA.
const RowKernels* avx2_row_kernels();

}  // namespace mixkv::cpu
