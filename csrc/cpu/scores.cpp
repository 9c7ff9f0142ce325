// CPU kernels of the scoring ops: window_importance, value_norm, key_diversity, mix_scores.
// Work is split over (batch row, KV head); every sum accumulates in float32 or wider.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cpu/kernels.h"
#include "cpu/row_kernels.h"
#include "mixkv/options.h"

namespace mixkv::cpu {

RealTokens::RealTokens(const OptTensor& key_mask) {
  if (!key_mask) return;
  storage_ = key_mask->to(at::kBool).contiguous();
  data_ = storage_.data_ptr<bool>();
  stride_ = storage_.size(1);
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// 1-D pooling over one head's candidates, stride 1, padding k/2: "avg" divides by k with the
// zero padding counted (F.avg_pool1d defaults), "max" ignores padding and padded tokens.
void pool_candidates(const float* in, float* out, int64_t C, int64_t kernel, Pooling pooling,
                     const RealTokens& real, int64_t b) {
  const int64_t half = kernel / 2;
  for (int64_t j = 0; j < C; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - half), hi = std::min<int64_t>(C - 1, j + half);
    if (pooling == Pooling::Avg) {
      float sum = 0.f;
      for (int64_t t = lo; t <= hi; ++t) sum += in[t];
      out[j] = sum / static_cast<float>(kernel);
    } else {
      float best = kNegInf;
      for (int64_t t = lo; t <= hi; ++t) {
        if (real(b, t)) best = std::max(best, in[t]);
      }
      out[j] = best;
    }
    if (!real(b, j)) out[j] = 0.f;
  }
}

}  // namespace

at::Tensor window_importance(const at::Tensor& q_window, const at::Tensor& keys,
                             const OptTensor& key_mask, int64_t pool_kernel,
                             c10::string_view pooling_name, c10::string_view gqa_reduce_name,
                             std::optional<double> scaling) {
  window_importance_shape(q_window, keys, key_mask, pool_kernel, pooling_name, gqa_reduce_name);
  const Pooling pooling = parse_pooling("window_importance", pooling_name);
  const GqaReduce reduce = parse_gqa_reduce("window_importance", gqa_reduce_name);
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  const int64_t Hq = q_window.size(1), W = q_window.size(2), G = Hq / Hkv, C = N - W;
  const double scale = scaling.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  const RealTokens real(key_mask);
  const RowKernels& kern = row_kernels();
  // Scores carry no gradient; detached inputs let ATen write into our buffers.
  const at::Tensor q = q_window.detach().contiguous(), k = keys.detach().contiguous();
  at::Tensor out = at::zeros({B, Hkv, C}, keys.options().dtype(at::kFloat));
  float* out_data = out.data_ptr<float>();

  const int64_t R = G * W;  // the window queries of one KV head's group; column r = g * W + i
  const int64_t Rp = padded_width(R);
  // Keys are processed in blocks whose [kKeyBlock, Rp] logits stay in the L2 cache: each block's
  // logits are masked and exponentiated right after its GEMM against the running column max
  // (online softmax), so the [N, Rp] logits are read back from memory once, for the final sums.
  constexpr int64_t kKeyBlock = 512;
  const int64_t blocks = (N + kKeyBlock - 1) / kKeyBlock;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> running_max(Rp), running_sum(Rp), block_shift(blocks * Rp);
    std::vector<float> block_max(Rp), shift(Rp), weight(R), per_query_head(G * C), reduced(C);
    std::vector<float> packed(packed_floats(R, D));
    at::Tensor logits = at::empty({N, Rp}, keys.options().dtype(at::kFloat));
    float* const L = logits.data_ptr<float>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const at::Tensor q_scaled = q.select(0, b).narrow(0, h * G, G).reshape({R, D})
                                      .to(at::kFloat).mul(scale).contiguous();
      kern.pack_queries(q_scaled.const_data_ptr<float>(), R, D, packed.data());
      const at::Tensor k_head = k.select(0, b).select(0, h);
      int64_t real_queries = 0;
      for (int64_t i = 0; i < W; ++i) real_queries += real(b, C + i);
      std::fill(running_max.begin(), running_max.end(), kNegInf);
      std::fill(running_sum.begin(), running_sum.end(), 0.f);
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t j0 = blk * kKeyBlock, rows = std::min(kKeyBlock, N - j0);
        float* const block = L + j0 * Rp;
        const at::Tensor k_block = k_head.narrow(0, j0, rows).to(at::kFloat).contiguous();
        kern.logits(k_block.const_data_ptr<float>(), rows, D, packed.data(), Rp, block);
        // Masking: window query i sits at position C + i and sees keys 0 .. C + i; padding is
        // invisible, and a padded query sees nothing (its column ends up all zero).
        for (int64_t j = std::max(j0, C + 1); j < j0 + rows; ++j) {
          for (int64_t g = 0; g < G; ++g) std::fill_n(L + j * Rp + g * W, j - C, kNegInf);
        }
        if (!real.all_real()) {
          for (int64_t j = j0; j < j0 + rows; ++j) {
            if (!real(b, j)) std::fill_n(L + j * Rp, R, kNegInf);
            for (int64_t r = 0; r < R; ++r) {
              if (!real(b, C + r % W)) L[j * Rp + r] = kNegInf;
            }
          }
        }
        std::fill(block_max.begin(), block_max.end(), kNegInf);
        kern.column_max(block, rows, Rp, block_max.data());
        for (int64_t r = 0; r < Rp; ++r) {
          const float new_max = std::max(running_max[r], block_max[r]);
          const float used = new_max == kNegInf ? 0.f : new_max;  // a column with no key yet
          running_sum[r] *= std::exp(running_max[r] - used);      // exp(-inf) = 0: no NaN
          running_max[r] = new_max;
          shift[r] = used;
          block_shift[blk * Rp + r] = new_max;  // -inf: the column had no visible key yet
        }
        kern.exp_sum(block, rows, Rp, shift.data(), running_sum.data());
      }
      // Softmax weights: a block holds exp(x - shift); times exp(shift - max) / (sum * real
      // window queries) gives the softmax with the mean over the window folded in.
      const float queries = static_cast<float>(std::max<int64_t>(real_queries, 1));
      for (int64_t j0 = 0; j0 < C; j0 += kKeyBlock) {
        const float* shift_blk = block_shift.data() + (j0 / kKeyBlock) * Rp;
        for (int64_t r = 0; r < R; ++r) {
          const float final_max = running_max[r] == kNegInf ? 0.f : running_max[r];
          // shift <= final max (-inf for a block the column saw nothing in), so the factor is
          // at most 1: never inf * 0.
          weight[r] = running_sum[r] > 0.f
                          ? std::exp(shift_blk[r] - final_max) / (running_sum[r] * queries)
                          : 0.f;
        }
        kern.group_dots(L + j0 * Rp, std::min(kKeyBlock, C - j0), Rp, weight.data(), G, W,
                        per_query_head.data() + j0, C);
      }
      // GQA reduce over the group's query heads.
      for (int64_t j = 0; j < C; ++j) {
        float r = per_query_head[j];
        for (int64_t g = 1; g < G; ++g) {
          const float x = per_query_head[g * C + j];
          r = reduce == GqaReduce::Mean ? r + x : std::max(r, x);
        }
        reduced[j] = reduce == GqaReduce::Mean ? r / static_cast<float>(G) : r;
      }
      pool_candidates(reduced.data(), out_data + task * C, C, pool_kernel, pooling, real, b);
    }
  });
  return out;
}

at::Tensor value_norm(const at::Tensor& values, int64_t window, const OptTensor& key_mask) {
  value_norm_shape(values, window, key_mask);
  const int64_t B = values.size(0), Hkv = values.size(1), N = values.size(2), D = values.size(3);
  const int64_t C = N - window;
  const RealTokens real(key_mask);
  const RowKernels& kern = row_kernels();
  const at::Tensor v = values.detach().contiguous().view({B * Hkv, N, D});
  at::Tensor out = at::empty({B, Hkv, C}, values.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  constexpr int64_t kRows = 1024;  // tokens per task, converted to float32 together
  const int64_t blocks = (C + kRows - 1) / kRows;
  at::parallel_for(0, B * Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, j0 = (task % blocks) * kRows;
      const int64_t rows = std::min(kRows, C - j0);
      const at::Tensor x = v.select(0, bh).narrow(0, j0, rows).to(at::kFloat).contiguous();
      float* norms = o + bh * C + j0;
      kern.row_norms(x.const_data_ptr<float>(), rows, D, norms);
      for (int64_t j = 0; j < rows; ++j) {
        if (!real(bh / Hkv, j0 + j)) norms[j] = 0.f;
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> key_diversity(const at::Tensor& keys, int64_t window,
                                                 const OptTensor& key_mask) {
  key_diversity_shape(keys, window, key_mask);
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  const int64_t C = N - window;
  const RealTokens real(key_mask);
  const RowKernels& kern = row_kernels();
  const at::Tensor k = keys.detach().contiguous().view({B * Hkv, N, D});
  at::Tensor diversity = at::empty({B, Hkv, C}, keys.options().dtype(at::kFloat));
  at::Tensor redundancy = at::empty({B, Hkv}, keys.options().dtype(at::kFloat));
  float* div = diversity.data_ptr<float>();
  float* red = redundancy.data_ptr<float>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    // Unit keys are summed in float32 blocks of kBlock tokens (converted to float32 together),
    // blocks in double: exact enough for 128K tokens while the inner loops stay in float32.
    constexpr int64_t kBlock = 256;
    std::vector<double> total(D);
    std::vector<float> block_sum(D), mean(D), inv_norm(N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv;
      const at::Tensor kh = k.select(0, bh);
      // Pass 1: mean direction m of the unit keys of all real tokens (window included).
      std::fill(total.begin(), total.end(), 0.0);
      int64_t n = 0;
      for (int64_t j0 = 0; j0 < N; j0 += kBlock) {
        const int64_t rows = std::min(kBlock, N - j0);
        const at::Tensor x = kh.narrow(0, j0, rows).to(at::kFloat).contiguous();
        float* inv = inv_norm.data() + j0;
        kern.row_norms(x.const_data_ptr<float>(), rows, D, inv);
        for (int64_t j = 0; j < rows; ++j) {
          const bool is_real = real(b, j0 + j);
          inv[j] = is_real ? 1.f / std::max(inv[j], 1e-12f) : 0.f;  // 0: padding adds nothing
          n += is_real;
        }
        // Summed run by run of real tokens: a padded row adds nothing, not even 0 * inf.
        std::fill(block_sum.begin(), block_sum.end(), 0.f);
        for (int64_t j = 0; j < rows;) {
          int64_t stop = j;
          while (stop < rows && real(b, j0 + stop)) ++stop;
          kern.weighted_row_sum(x.const_data_ptr<float>() + j * D, stop - j, D, inv + j,
                                block_sum.data());
          j = stop + 1;
        }
        for (int64_t d = 0; d < D; ++d) total[d] += block_sum[d];
      }
      double mean_sq = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double m = total[d] / static_cast<double>(std::max<int64_t>(n, 1));
        mean[d] = static_cast<float>(m);
        mean_sq += m * m;
      }
      // Mean pairwise cosine similarity, from |m|^2 in O(nD): (n |m|^2 - 1) / (n - 1).
      const double r = n >= 2 ? (static_cast<double>(n) * mean_sq - 1.0) / static_cast<double>(n - 1) : 0.0;
      red[bh] = static_cast<float>(std::clamp(r, 0.0, 1.0));
      // Pass 2: diversity = -cos(k_j, m) for candidates (0 for padding).
      for (int64_t j0 = 0; j0 < C; j0 += kBlock) {
        const int64_t rows = std::min(kBlock, C - j0);
        const at::Tensor x = kh.narrow(0, j0, rows).to(at::kFloat).contiguous();
        float* d_out = div + bh * C + j0;
        kern.row_dots(x.const_data_ptr<float>(), rows, D, mean.data(), d_out);
        for (int64_t j = 0; j < rows; ++j) {
          d_out[j] = real(b, j0 + j) ? -d_out[j] * inv_norm[j0 + j] : 0.f;
        }
      }
    }
  });
  return {diversity, redundancy};
}

namespace {

// Min-max normalise x over one head's real candidates, then rescale so that its mean equals
// mean_importance. Writes 0 when x is constant or all-zero after min-max (never NaN).
void normalise_like(const float* x, float* out, int64_t C, double mean_importance,
                    const RealTokens& real, int64_t b) {
  float lo = std::numeric_limits<float>::max(), hi = -std::numeric_limits<float>::max();
  int64_t count = 0;
  for (int64_t j = 0; j < C; ++j) {
    if (!real(b, j)) continue;
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
    ++count;
  }
  const float spread = hi - lo;
  double sum = 0.0;
  for (int64_t j = 0; j < C; ++j) {
    out[j] = real(b, j) ? unit_scaled(x[j], lo, spread) : 0.f;
    sum += out[j];
  }
  const double mean_unit = sum / static_cast<double>(std::max<int64_t>(count, 1));
  const float factor = mean_unit > 0.0 ? static_cast<float>(mean_importance / mean_unit) : 0.f;
  for (int64_t j = 0; j < C; ++j) out[j] = mul_rn(out[j], factor);
}

}  // namespace

at::Tensor mix_scores(const at::Tensor& importance, const OptTensor& value_norm,
                      const OptTensor& diversity, const OptTensor& redundancy,
                      c10::string_view mode_name, const OptTensor& key_mask) {
  mix_scores_shape(importance, value_norm, diversity, redundancy, mode_name, key_mask);
  const Mode mode = parse_mode("mix_scores", mode_name);
  const int64_t B = importance.size(0), Hkv = importance.size(1), C = importance.size(2);
  const RealTokens real(key_mask);
  auto as_float = [](const OptTensor& t) {
    return t ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor A = importance.to(at::kFloat).contiguous();
  const at::Tensor V = as_float(value_norm), Dv = as_float(diversity), R = as_float(redundancy);
  const bool use_v = mode_uses_value_norm(mode), use_d = mode_uses_diversity(mode);
  at::Tensor out = at::empty({B, Hkv, C}, importance.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> v_tilde(use_v ? C : 0), d_tilde(use_d ? C : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv;
      const float* a = A.const_data_ptr<float>() + bh * C;
      double sum_a = 0.0;
      int64_t count = 0;
      for (int64_t j = 0; j < C; ++j) {
        if (!real(b, j)) continue;
        sum_a += a[j];
        ++count;
      }
      const double mean_a = sum_a / static_cast<double>(std::max<int64_t>(count, 1));
      if (use_v) normalise_like(V.const_data_ptr<float>() + bh * C, v_tilde.data(), C, mean_a, real, b);
      if (use_d) normalise_like(Dv.const_data_ptr<float>() + bh * C, d_tilde.data(), C, mean_a, real, b);
      const float r = mode_uses_redundancy(mode) ? R.const_data_ptr<float>()[bh] : 0.f;
      float* s = o + bh * C;
      for (int64_t j = 0; j < C; ++j) {
        if (!real(b, j)) {
          s[j] = 0.f;
          continue;
        }
        s[j] = mix_score(mode, a[j], use_v ? v_tilde[j] : 0.f, use_d ? d_tilde[j] : 0.f, r);
      }
    }
  });
  return out;
}

}  // namespace mixkv::cpu
