// Meta kernels: output shapes from the shared shape functions, no data access, symbolic sizes
// welcome (FakeTensor / torch.compile). The ragged ops' output length depends on the data, so
// their fake kernels live in Python (mixkv/_fake.py) where unbacked sizes can be created.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "mixkv/shapes.h"

namespace mixkv::meta {
namespace {

at::Tensor empty_like_shape(const Shape& shape, const at::Tensor& like, at::ScalarType dtype) {
  return at::empty_symint(shape, like.options().dtype(dtype));
}

at::Tensor window_importance(const at::Tensor& q_window, const at::Tensor& keys,
                             const OptTensor& key_mask, int64_t pool_kernel,
                             c10::string_view pooling, c10::string_view gqa_reduce,
                             std::optional<double>) {
  return empty_like_shape(
      window_importance_shape(q_window, keys, key_mask, pool_kernel, pooling, gqa_reduce), keys,
      at::kFloat);
}

at::Tensor value_norm(const at::Tensor& values, int64_t window, const OptTensor& key_mask) {
  return empty_like_shape(value_norm_shape(values, window, key_mask), values, at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> key_diversity(const at::Tensor& keys, int64_t window,
                                                 const OptTensor& key_mask) {
  auto [diversity, redundancy] = key_diversity_shape(keys, window, key_mask);
  return {empty_like_shape(diversity, keys, at::kFloat),
          empty_like_shape(redundancy, keys, at::kFloat)};
}

at::Tensor mix_scores(const at::Tensor& importance, const OptTensor& value_norm,
                      const OptTensor& diversity, const OptTensor& redundancy,
                      c10::string_view mode, const OptTensor& key_mask) {
  return empty_like_shape(
      mix_scores_shape(importance, value_norm, diversity, redundancy, mode, key_mask), importance,
      at::kFloat);
}

at::Tensor head_budgets(const at::Tensor& importance, int64_t capacity, c10::string_view policy,
                        double floor_alpha, bool, const OptTensor& key_mask, int64_t layer,
                        int64_t num_layers, int64_t pyramid_beta, const OptTensor& profile) {
  return empty_like_shape(head_budgets_shape(importance, capacity, policy, floor_alpha, key_mask,
                                             layer, num_layers, pyramid_beta, profile),
                          importance, at::kInt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kept(const Shape& shape, const at::Tensor& keys,
                                                    const at::Tensor& values) {
  return {empty_like_shape(shape, keys, keys.scalar_type()),
          empty_like_shape(shape, values, values.scalar_type()),
          empty_like_shape(without_last(shape), keys, at::kInt)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_kv(const at::Tensor& scores,
                                                         const at::Tensor& keys,
                                                         const at::Tensor& values,
                                                         int64_t capacity, int64_t window,
                                                         const OptTensor& key_mask) {
  return kept(select_kv_shape(scores, keys, values, capacity, window, key_mask), keys, values);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> compress(
    const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
    const OptTensor& key_mask, int64_t budget, int64_t window, c10::string_view mode,
    const OptTensor& redundancy, int64_t pool_kernel, c10::string_view pooling,
    c10::string_view gqa_reduce, std::optional<double>) {
  return kept(compress_shape(q_window, keys, values, key_mask, budget, window, mode, redundancy,
                             pool_kernel, pooling, gqa_reduce),
              keys, values);
}

at::Tensor ragged_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& starts,
                            const at::Tensor& lengths, const OptTensor& valid,
                            std::optional<double>) {
  return empty_like_shape(ragged_attention_shape(query, keys, values, starts, lengths, valid),
                          query, query.scalar_type());
}

}  // namespace
}  // namespace mixkv::meta

TORCH_LIBRARY_IMPL(mixkv, Meta, m) {
  m.impl("window_importance", &mixkv::meta::window_importance);
  m.impl("value_norm", &mixkv::meta::value_norm);
  m.impl("key_diversity", &mixkv::meta::key_diversity);
  m.impl("mix_scores", &mixkv::meta::mix_scores);
  m.impl("head_budgets", &mixkv::meta::head_budgets);
  m.impl("select_kv", &mixkv::meta::select_kv);
  m.impl("compress", &mixkv::meta::compress);
  m.impl("ragged_attention", &mixkv::meta::ragged_attention);
}
