// Error helpers: every message starts with "mixkv::<op>: " and names the offending argument.
#pragma once

#include <cstdint>
#include <limits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define MIXKV_CHECK_VALUE(cond, op, ...) TORCH_CHECK_VALUE(cond, "mixkv::", op, ": ", __VA_ARGS__)
#define MIXKV_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "mixkv::", op, ": ", __VA_ARGS__)

namespace mixkv {

// Accepted dtypes of K/V/Q and of float score inputs.
inline bool is_kv_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  MIXKV_CHECK_VALUE(t.dim() == rank, op, name, " must be ", layout, ", got ", t.sym_sizes());
}

inline void check_kv_dtype(const char* op, const char* name, const at::Tensor& t) {
  MIXKV_CHECK_TYPE(is_kv_dtype(t.scalar_type()), op, name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref, const char* ref_name) {
  MIXKV_CHECK_VALUE(t.device() == ref.device(), op, name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t,
                             const at::Tensor& ref, const char* ref_name) {
  MIXKV_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has ", ref.scalar_type());
}

// Data checks of the selection ops, shared by the CPU and CUDA kernels (same messages).
inline void check_scores_finite(const char* op, bool all_finite) {
  MIXKV_CHECK_VALUE(all_finite, op, "scores must be finite at real candidates (found NaN or inf)");
}

// Capacity of head `bh` (in (row, head) order over Hkv heads).
inline void check_head_capacity(const char* op, int64_t capacity, int64_t bh, int64_t Hkv) {
  MIXKV_CHECK_VALUE(capacity >= 0, op, "capacity must be >= 0, got ", capacity, " at [",
                    bh / Hkv, ", ", bh % Hkv, "]");
}

inline void check_offsets_fit(const char* op, int64_t total) {
  MIXKV_CHECK_VALUE(total <= std::numeric_limits<int32_t>::max(), op,
                    "the kept tokens overflow int32 offsets");
}

}  // namespace mixkv
