// CPU implementations of the mixkv ops (registered in register_cpu.cpp; the fused compress and
// compress_ragged, in compress.cpp, call them directly, without a dispatcher round trip).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "mixkv/checks.h"
#include "mixkv/shapes.h"

namespace mixkv::cpu {

// Which tokens are real: a view of key_mask as bool [B, N]; every token is real without a mask.
class RealTokens {
 public:
  explicit RealTokens(const OptTensor& key_mask);
  bool operator()(int64_t b, int64_t j) const { return data_ == nullptr || data_[b * stride_ + j]; }
  bool all_real() const { return data_ == nullptr; }

 private:
  at::Tensor storage_;
  const bool* data_ = nullptr;
  int64_t stride_ = 0;
};

at::Tensor window_importance(const at::Tensor& q_window, const at::Tensor& keys,
                             const OptTensor& key_mask, int64_t pool_kernel,
                             c10::string_view pooling, c10::string_view gqa_reduce,
                             std::optional<double> scaling);

at::Tensor value_norm(const at::Tensor& values, int64_t window, const OptTensor& key_mask);

std::tuple<at::Tensor, at::Tensor> key_diversity(const at::Tensor& keys, int64_t window,
                                                 const OptTensor& key_mask);

at::Tensor mix_scores(const at::Tensor& importance, const OptTensor& value_norm,
                      const OptTensor& diversity, const OptTensor& redundancy,
                      c10::string_view mode, const OptTensor& key_mask);

at::Tensor head_budgets(const at::Tensor& importance, int64_t capacity, c10::string_view policy,
                        double floor_alpha, bool normalize, const OptTensor& key_mask,
                        int64_t layer, int64_t num_layers, int64_t pyramid_beta,
                        const OptTensor& profile);

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_kv(const at::Tensor& scores,
                                                         const at::Tensor& keys,
                                                         const at::Tensor& values,
                                                         int64_t capacity, int64_t window,
                                                         const OptTensor& key_mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_kv_ragged(
    const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& capacity, int64_t window, const OptTensor& key_mask);

at::Tensor ragged_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& starts,
                            const at::Tensor& lengths, const OptTensor& valid,
                            std::optional<double> scaling);

}  // namespace mixkv::cpu
