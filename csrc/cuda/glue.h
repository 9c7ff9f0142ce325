// Small helpers shared by the torch-facing CUDA glue files (scores.cpp, budgets.cpp, select.cpp, attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "cuda/kernels.cuh"
#include "mixkv/shapes.h"

namespace mixkv::cuda {

// The kernels' element type tag of a float32/float16/bfloat16 tensor.
inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float;
  }
}

// key_mask as a contiguous bool tensor on the device (undefined when absent).
inline at::Tensor bool_mask(const OptTensor& key_mask) {
  return key_mask ? key_mask->to(at::kBool).contiguous() : at::Tensor();
}

inline const bool* mask_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
}

}  // namespace mixkv::cuda
