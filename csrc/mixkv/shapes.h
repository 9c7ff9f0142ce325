// Argument checks and output shapes of every op, written once and used by the CPU, CUDA and
// Meta kernels. They read only metadata (sizes, dtypes, devices), so they also run on
// FakeTensors with symbolic sizes (SymInt) under torch.compile.
//
// Notation: B batch, Hq query heads, Hkv KV heads (G = Hq / Hkv), N prompt length, W window,
// D head dim, C = N - W candidates.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>

namespace mixkv {

using Shape = std::vector<c10::SymInt>;
using OptTensor = std::optional<at::Tensor>;

// q_window [B,Hq,W,D], keys [B,Hkv,N,D] -> importance [B,Hkv,C]
Shape window_importance_shape(const at::Tensor& q_window, const at::Tensor& keys,
                              const OptTensor& key_mask, int64_t pool_kernel,
                              c10::string_view pooling, c10::string_view gqa_reduce);

// values [B,Hkv,N,D] -> [B,Hkv,C]
Shape value_norm_shape(const at::Tensor& values, int64_t window, const OptTensor& key_mask);

// keys [B,Hkv,N,D] -> (diversity [B,Hkv,C], redundancy [B,Hkv])
std::pair<Shape, Shape> key_diversity_shape(const at::Tensor& keys, int64_t window,
                                            const OptTensor& key_mask);

// importance [B,Hkv,C] (+ value_norm/diversity [B,Hkv,C], redundancy [B,Hkv]) -> [B,Hkv,C]
Shape mix_scores_shape(const at::Tensor& importance, const OptTensor& value_norm,
                       const OptTensor& diversity, const OptTensor& redundancy,
                       c10::string_view mode, const OptTensor& key_mask);

// importance [B,Hkv,C] -> capacities [B,Hkv] int32
Shape head_budgets_shape(const at::Tensor& importance, int64_t capacity, c10::string_view policy,
                         double floor_alpha, const OptTensor& key_mask, int64_t layer,
                         int64_t num_layers, int64_t pyramid_beta, const OptTensor& profile);

// scores [B,Hkv,C], keys/values [B,Hkv,N,D] -> kept keys/values [B,Hkv,min(capacity,C)+W,D]
Shape select_kv_shape(const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
                      int64_t capacity, int64_t window, const OptTensor& key_mask);

// As select_kv with capacity [B,Hkv] int32; the ragged total depends on the data.
void select_kv_ragged_check(const at::Tensor& scores, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& capacity, int64_t window,
                            const OptTensor& key_mask);

// Checks shared by compress and compress_ragged (all score-stage arguments); returns the
// candidate count C.
c10::SymInt compress_check(const char* op, const at::Tensor& q_window, const at::Tensor& keys,
                           const at::Tensor& values, const OptTensor& key_mask, int64_t budget,
                           int64_t window, c10::string_view mode, const OptTensor& redundancy,
                           int64_t pool_kernel, c10::string_view pooling,
                           c10::string_view gqa_reduce);

// compress: kept keys/values [B,Hkv,min(budget-W,C)+W,D]
Shape compress_shape(const at::Tensor& q_window, const at::Tensor& keys, const at::Tensor& values,
                     const OptTensor& key_mask, int64_t budget, int64_t window,
                     c10::string_view mode, const OptTensor& redundancy, int64_t pool_kernel,
                     c10::string_view pooling, c10::string_view gqa_reduce);

// query [B,Hq,q,D], keys/values [S,D], starts/lengths [B,Hkv] int32, valid [S] bool
// -> attention output [B,q,Hq,D] in query's dtype. Segment contents are checked by the kernels.
Shape ragged_attention_shape(const at::Tensor& query, const at::Tensor& keys,
                             const at::Tensor& values, const at::Tensor& starts,
                             const at::Tensor& lengths, const OptTensor& valid);

// Drops the last dimension (kept keys [.., D] -> kept indices [..]).
inline Shape without_last(const Shape& s) { return Shape(s.begin(), s.end() - 1); }

}  // namespace mixkv
