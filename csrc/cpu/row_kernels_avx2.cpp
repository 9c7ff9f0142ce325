// The row kernels for x86-64 CPUs with AVX2 and FMA (compiled with -mavx2 -mfma; used only after
// row_kernels.cpp has checked the CPU). Nothing here includes a header with inline code: an
// inline function compiled for AVX2 could be picked by the linker for the portable callers too.
//
// The logits GEMM is register-tiled: 3 keys x 32 queries (12 accumulators, 4 loads and 3
// broadcasts per 12 FMAs), which runs near the FMA peak on Zen 3 where ATen's BLAS reaches ~60%.
#include <immintrin.h>

#include <cstdint>

#include "cpu/row_kernels.h"

namespace mixkv::cpu {
namespace {

constexpr int64_t kPanel = 32;  // query columns per packed panel (4 vectors of 8)

inline int64_t smaller(int64_t a, int64_t b) { return a < b ? a : b; }

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x for x <= 88 to ~2 ulp: x = n ln2 + t with |t| <= ln2/2, e^t by its degree-6 Taylor
// polynomial (remainder < 1.2e-7 relative), times 2^n built in the exponent bits. Inputs below
// -87.3 (where 2^n would leave the normal range), -inf included, give exactly 0.
inline __m256 exp_ps(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2 split in two so that n * ln2_hi is exact.
  __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  t = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), t);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(underflow, result);
}

// Packed layout: panels of kPanel columns (the last one narrower, a multiple of 8); panel p
// starts at p * kPanel * D and holds its columns d-major: [D][width].
void pack_queries(const float* q, int64_t R, int64_t D, float* packed) {
  const int64_t Rp = (R + 7) / 8 * 8;
  for (int64_t c0 = 0; c0 < Rp; c0 += kPanel) {
    const int64_t width = smaller(kPanel, Rp - c0);
    float* panel = packed + c0 * D;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t c = 0; c < width; ++c) {
        panel[d * width + c] = c0 + c < R ? q[(c0 + c) * D + d] : 0.f;
      }
    }
  }
}

// out[i, :8 VECS] = keys[i, :] . panel columns, for i < ROWS.
template <int ROWS, int VECS>
inline void logits_tile(const float* keys, int64_t D, const float* panel, float* out,
                        int64_t Rp) {
  // Fully unrolled early (the pragmas) so that GCC keeps the accumulators in registers.
  __m256 acc[ROWS][VECS];
#pragma GCC unroll 4
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) acc[i][v] = _mm256_setzero_ps();
  }
  for (int64_t d = 0; d < D; ++d) {
    __m256 q[VECS];
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) q[v] = _mm256_loadu_ps(panel + d * 8 * VECS + 8 * v);
#pragma GCC unroll 4
    for (int i = 0; i < ROWS; ++i) {
      const __m256 k = _mm256_broadcast_ss(keys + i * D + d);
#pragma GCC unroll 4
      for (int v = 0; v < VECS; ++v) acc[i][v] = _mm256_fmadd_ps(k, q[v], acc[i][v]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < VECS; ++v) _mm256_storeu_ps(out + i * Rp + 8 * v, acc[i][v]);
  }
}

template <int ROWS>
inline void logits_rows(const float* keys, int64_t D, const float* packed, int64_t Rp,
                        float* out) {
  // Every panel against the same ROWS keys, which stay in L1 across panels.
  for (int64_t c0 = 0; c0 < Rp; c0 += kPanel) {
    const float* panel = packed + c0 * D;
    switch (smaller(kPanel, Rp - c0) / 8) {
      case 4: logits_tile<ROWS, 4>(keys, D, panel, out + c0, Rp); break;
      case 3: logits_tile<ROWS, 3>(keys, D, panel, out + c0, Rp); break;
      case 2: logits_tile<ROWS, 2>(keys, D, panel, out + c0, Rp); break;
      default: logits_tile<ROWS, 1>(keys, D, panel, out + c0, Rp); break;
    }
  }
}

void logits(const float* keys, int64_t rows, int64_t D, const float* packed, int64_t Rp,
            float* out) {
  int64_t j = 0;
  for (; j + 3 <= rows; j += 3) logits_rows<3>(keys + j * D, D, packed, Rp, out + j * Rp);
  if (rows - j == 2) logits_rows<2>(keys + j * D, D, packed, Rp, out + j * Rp);
  if (rows - j == 1) logits_rows<1>(keys + j * D, D, packed, Rp, out + j * Rp);
}

// Row by row (the block is [rows, Rp] row-major): the running max / sum of each 8-column slice
// stays in L1, and every logits row is read once, front to back.
void column_max(const float* L, int64_t rows, int64_t Rp, float* max) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t r = 0; r < Rp; r += 8) {
      _mm256_storeu_ps(max + r, _mm256_max_ps(_mm256_loadu_ps(max + r),
                                              _mm256_loadu_ps(L + j * Rp + r)));
    }
  }
}

void exp_sum(float* L, int64_t rows, int64_t Rp, const float* shift, float* sum) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t r = 0; r < Rp; r += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(L + j * Rp + r),
                                            _mm256_loadu_ps(shift + r)));
      _mm256_storeu_ps(L + j * Rp + r, e);
      _mm256_storeu_ps(sum + r, _mm256_add_ps(_mm256_loadu_ps(sum + r), e));
    }
  }
}

// sum_i x[i] y[i] for i < n.
inline float dot(const float* x, const float* y, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), a1);
  }
  if (i + 8 <= n) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
    i += 8;
  }
  float s = horizontal_sum(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

void group_dots(const float* L, int64_t rows, int64_t Rp, const float* weight, int64_t G,
                int64_t W, float* out, int64_t out_stride) {
  for (int64_t j = 0; j < rows; ++j) {
    for (int64_t g = 0; g < G; ++g) {
      out[g * out_stride + j] = dot(L + j * Rp + g * W, weight + g * W, W);
    }
  }
}

void row_norms(const float* x, int64_t rows, int64_t D, float* out) {
  for (int64_t j = 0; j < rows; ++j) {
    const float sq = dot(x + j * D, x + j * D, D);
    out[j] = _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(sq)));
  }
}

// acc[:8 VECS] += sum_j w[j] x[j, :8 VECS] (row stride D), the sums held in registers.
template <int VECS>
inline void weighted_slice_sum(const float* x, int64_t rows, int64_t D, const float* w,
                               float* acc) {
  __m256 a[VECS];
#pragma GCC unroll 8
  for (int v = 0; v < VECS; ++v) a[v] = _mm256_loadu_ps(acc + 8 * v);
  for (int64_t j = 0; j < rows; ++j) {
    const __m256 wj = _mm256_broadcast_ss(w + j);
#pragma GCC unroll 8
    for (int v = 0; v < VECS; ++v) {
      a[v] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(x + j * D + 8 * v), a[v]);
    }
  }
#pragma GCC unroll 8
  for (int v = 0; v < VECS; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
}

void weighted_row_sum(const float* x, int64_t rows, int64_t D, const float* w, float* acc) {
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) weighted_slice_sum<8>(x + d, rows, D, w, acc + d);
  switch ((D - d) / 8) {
    case 7: weighted_slice_sum<7>(x + d, rows, D, w, acc + d); break;
    case 6: weighted_slice_sum<6>(x + d, rows, D, w, acc + d); break;
    case 5: weighted_slice_sum<5>(x + d, rows, D, w, acc + d); break;
    case 4: weighted_slice_sum<4>(x + d, rows, D, w, acc + d); break;
    case 3: weighted_slice_sum<3>(x + d, rows, D, w, acc + d); break;
    case 2: weighted_slice_sum<2>(x + d, rows, D, w, acc + d); break;
    case 1: weighted_slice_sum<1>(x + d, rows, D, w, acc + d); break;
    default: break;
  }
  for (d += (D - d) / 8 * 8; d < D; ++d) {
    for (int64_t j = 0; j < rows; ++j) acc[d] += w[j] * x[j * D + d];
  }
}

void row_dots(const float* x, int64_t rows, int64_t D, const float* m, float* out) {
  for (int64_t j = 0; j < rows; ++j) out[j] = dot(x + j * D, m, D);
}

}  // namespace

// Constant-initialised data, not code: reading it on a CPU without AVX2 is safe.
extern const RowKernels kAvx2RowKernels{"avx2",     pack_queries, logits,
                                        column_max, exp_sum,      group_dots,
                                        row_norms,  weighted_row_sum, row_dots};

}  // namespace mixkv::cpu
