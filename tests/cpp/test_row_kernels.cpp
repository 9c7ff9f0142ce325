// The CPU row kernels (csrc/cpu/row_kernels.h), each table that this machine can run, against
// plain loops on small integer data (exact in float32) and against known values of exp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cpu/row_kernels.h"

namespace {

using mixkv::cpu::RowKernels;

std::vector<const RowKernels*> tables() {
  std::vector<const RowKernels*> out{&mixkv::cpu::generic_row_kernels()};
  if (const RowKernels* fast = mixkv::cpu::avx2_row_kernels()) out.push_back(fast);
  return out;
}

// Small integers, varied by position: every product and sum below is exact in float32.
float small_int(int64_t i, int64_t salt) { return static_cast<float>((i * 7 + salt * 3) % 9 - 4); }

TEST(RowKernels, LogitsMatchAPlainLoopAndPaddedColumnsAreZero) {
  for (int64_t R : {1, 11, 24, 40, 99}) {
    for (int64_t D : {1, 13, 64}) {
      const int64_t rows = 7, Rp = mixkv::cpu::padded_width(R);
      std::vector<float> keys(rows * D), q(R * D), packed(mixkv::cpu::packed_floats(R, D));
      for (int64_t i = 0; i < rows * D; ++i) keys[i] = small_int(i, 1);
      for (int64_t i = 0; i < R * D; ++i) q[i] = small_int(i, 2);
      for (const RowKernels* k : tables()) {
        std::vector<float> out(rows * Rp, -1.f);
        k->pack_queries(q.data(), R, D, packed.data());
        k->logits(keys.data(), rows, D, packed.data(), Rp, out.data());
        for (int64_t j = 0; j < rows; ++j) {
          for (int64_t r = 0; r < Rp; ++r) {
            float want = 0.f;
            for (int64_t d = 0; r < R && d < D; ++d) want += keys[j * D + d] * q[r * D + d];
            ASSERT_EQ(out[j * Rp + r], want) << k->name << " R=" << R << " D=" << D << " j=" << j
                                             << " r=" << r;
          }
        }
      }
    }
  }
}

TEST(RowKernels, ExpSumKnownValues) {
  const float inf = std::numeric_limits<float>::infinity();
  // One row of 16 columns, shifts chosen so that x - shift covers the exp's range.
  const std::vector<float> x{0.f, 1.f, -1.f, 2.5f, -20.f, -inf, 3.f, 80.f,
                             -87.f, -0.5f, 0.25f, -5.f, 10.f, -inf, 0.f, -60.f};
  const std::vector<float> shift{0.f, 1.f, 0.f, 0.f, 0.f, 0.f, 3.f, 0.f,
                                 0.f, 0.f, 0.f, 0.f, 10.f, -2.f, 0.f, 0.f};
  for (const RowKernels* k : tables()) {
    std::vector<float> L = x, sum(16, 1.f);
    k->exp_sum(L.data(), 1, 16, shift.data(), sum.data());
    for (int r = 0; r < 16; ++r) {
      const double want = std::exp(static_cast<double>(x[r]) - shift[r]);
      EXPECT_NEAR(L[r], want, 4e-7 * want) << k->name << " exp(" << x[r] - shift[r] << ")";
      EXPECT_NEAR(sum[r], 1.0 + want, 4e-7 * (1.0 + want)) << k->name;
    }
    EXPECT_EQ(L[5], 0.f) << k->name << ": exp(-inf) must be exactly 0";
    EXPECT_EQ(L[13], 0.f) << k->name;
  }
}

TEST(RowKernels, ColumnMaxGroupDotsAndRowStatistics) {
  const int64_t rows = 5, Rp = 16, G = 3, W = 5, D = 12;  // R = 15 of 16 columns
  std::vector<float> L(rows * Rp), weight(G * W), x(rows * D), m(D), w(rows);
  for (int64_t i = 0; i < rows * Rp; ++i) L[i] = small_int(i, 4);
  for (int64_t i = 0; i < G * W; ++i) weight[i] = small_int(i, 5);
  for (int64_t i = 0; i < rows * D; ++i) x[i] = small_int(i, 6);
  for (int64_t i = 0; i < D; ++i) m[i] = small_int(i, 7);
  for (int64_t i = 0; i < rows; ++i) w[i] = small_int(i, 8);
  x[0] = 3.f;  // row 0 of x: (3, 4, 0, ...) has norm 5 exactly
  x[1] = 4.f;
  for (int64_t d = 2; d < D; ++d) x[d] = 0.f;
  for (const RowKernels* k : tables()) {
    std::vector<float> max(Rp, -100.f), dots(G * rows), norms(rows), acc(D, 1.f), xm(rows);
    k->column_max(L.data(), rows, Rp, max.data());
    k->group_dots(L.data(), rows, Rp, weight.data(), G, W, dots.data(), rows);
    k->row_norms(x.data(), rows, D, norms.data());
    k->weighted_row_sum(x.data(), rows, D, w.data(), acc.data());
    k->row_dots(x.data(), rows, D, m.data(), xm.data());
    for (int64_t r = 0; r < Rp; ++r) {
      float want = -100.f;
      for (int64_t j = 0; j < rows; ++j) want = std::max(want, L[j * Rp + r]);
      EXPECT_EQ(max[r], want) << k->name;
    }
    for (int64_t j = 0; j < rows; ++j) {
      for (int64_t g = 0; g < G; ++g) {
        float want = 0.f;
        for (int64_t i = 0; i < W; ++i) want += L[j * Rp + g * W + i] * weight[g * W + i];
        EXPECT_EQ(dots[g * rows + j], want) << k->name;
      }
      float sq = 0.f, dot = 0.f;
      for (int64_t d = 0; d < D; ++d) {
        sq += x[j * D + d] * x[j * D + d];
        dot += x[j * D + d] * m[d];
      }
      EXPECT_FLOAT_EQ(norms[j], std::sqrt(sq)) << k->name;
      EXPECT_EQ(xm[j], dot) << k->name;
    }
    EXPECT_EQ(norms[0], 5.f) << k->name;
    for (int64_t d = 0; d < D; ++d) {
      float want = 1.f;
      for (int64_t j = 0; j < rows; ++j) want += w[j] * x[j * D + d];
      EXPECT_EQ(acc[d], want) << k->name;
    }
  }
}

}  // namespace
