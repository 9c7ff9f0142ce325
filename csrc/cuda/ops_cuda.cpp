// Torch-facing glue of the CUDA kernels: checks (shared shape functions), device guard,
// current stream, launch checks. Ops without a CUDA kernel yet are not registered here, so
// calling them on CUDA tensors fails with the dispatcher's clear "no CUDA kernel" error.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/kernels.cuh"
#include "mixkv/shapes.h"

namespace mixkv::cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: return DType::Float;
  }
}

// key_mask as a contiguous bool tensor on the device (undefined when absent).
at::Tensor bool_mask(const OptTensor& key_mask) {
  return key_mask ? key_mask->to(at::kBool).contiguous() : at::Tensor();
}

at::Tensor value_norm(const at::Tensor& values, int64_t window, const OptTensor& key_mask) {
  value_norm_shape(values, window, key_mask);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t B = values.size(0), Hkv = values.size(1), N = values.size(2), D = values.size(3);
  const at::Tensor v = values.contiguous(), mask = bool_mask(key_mask);
  at::Tensor out = at::empty({B, Hkv, N - window}, values.options().dtype(at::kFloat));
  launch_value_norm(v.const_data_ptr(), dtype_of(v),
                    mask.defined() ? mask.const_data_ptr<bool>() : nullptr,
                    out.data_ptr<float>(), B, Hkv, N, D, N - window,
                    c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace mixkv::cuda

TORCH_LIBRARY_IMPL(mixkv, CUDA, m) {
  m.impl("value_norm", &mixkv::cuda::value_norm);
}
