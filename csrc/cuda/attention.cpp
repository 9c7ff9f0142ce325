// Torch-facing glue of the CUDA ragged_attention (the head-wise cache's attention): checks
// (shared shape functions), device guard, current stream, workspace, launch checks. Kernel in
// attention.cu.
#include <cmath>

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/kernels.cuh"
#include "cuda/ops.h"
#include "mixkv/checks.h"
#include "mixkv/shapes.h"

namespace mixkv::cuda {

at::Tensor ragged_attention(const at::Tensor& query, const at::Tensor& keys,
                            const at::Tensor& values, const at::Tensor& starts,
                            const at::Tensor& lengths, const OptTensor& valid,
                            std::optional<double> scaling) {
  ragged_attention_shape(query, keys, values, starts, lengths, valid);
  const int64_t B = query.size(0), Hq = query.size(1), q = query.size(2), D = query.size(3);
  MIXKV_CHECK_VALUE(D <= kRaggedAttentionMaxHeadDim, "ragged_attention",
                    "the CUDA kernel supports query head dim D <= ", kRaggedAttentionMaxHeadDim,
                    ", got ", D);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor out = at::empty({B, q, Hq, D}, query.options());
  if (out.numel() == 0) return out;
  const at::Tensor qc = query.contiguous(), k = keys.contiguous(), v = values.contiguous();
  const at::Tensor st = starts.contiguous(), len = lengths.contiguous();
  const at::Tensor mask = valid ? valid->contiguous() : at::Tensor();
  RaggedAttention p{};
  p.query = qc.const_data_ptr();
  p.keys = k.const_data_ptr();
  p.values = v.const_data_ptr();
  p.starts = st.const_data_ptr<int32_t>();
  p.lengths = len.const_data_ptr<int32_t>();
  p.valid = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  p.out = out.data_ptr();
  p.dtype = dtype_of(qc);
  p.B = B, p.Hq = Hq, p.Hkv = starts.size(1), p.q = q, p.D = D, p.S = keys.size(0);
  p.scale = static_cast<float>(scaling.value_or(1.0 / std::sqrt(static_cast<double>(D))));
  const at::Tensor workspace =
      at::empty({plan_ragged_attention(p, query.get_device())}, query.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  launch_ragged_attention(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace mixkv::cuda
