// Torch-facing glue of the CUDA score ops (window_importance, value_norm, key_diversity,
// mix_scores): checks (shared shape functions), device guard, current stream, launch checks.
// Kernels in scores.cu and value_norm.cu; semantics as the CPU ops (csrc/cpu/scores.cpp).
#include <cmath>
#include <tuple>

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/kernels.cuh"
#include "cuda/ops.h"
#include "cuda/scores.cuh"
#include "mixkv/checks.h"
#include "mixkv/options.h"
#include "mixkv/shapes.h"

namespace mixkv::cuda {

at::Tensor window_importance(const at::Tensor& q_window, const at::Tensor& keys,
                             const OptTensor& key_mask, int64_t pool_kernel,
                             c10::string_view pooling_name, c10::string_view gqa_reduce_name,
                             std::optional<double> scaling) {
  const char* op = "window_importance";
  window_importance_shape(q_window, keys, key_mask, pool_kernel, pooling_name, gqa_reduce_name);
  const Pooling pooling = parse_pooling(op, pooling_name);
  const GqaReduce reduce = parse_gqa_reduce(op, gqa_reduce_name);
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  const int64_t Hq = q_window.size(1), W = q_window.size(2), G = Hq / Hkv, C = N - W;
  at::Tensor out = at::empty({B, Hkv, C}, keys.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (G == 0) return out.zero_();  // no query heads: no attention anywhere

  // Logits [B*Hkv, G*W, N] = Q K^T per KV head (the group's query heads are contiguous in
  // q_window, so no repeat of K), by cuBLAS with fp32 accumulation and an fp32 result: fp16/bf16
  // products are exact in fp32, so this matches the CPU op's upcast-then-multiply up to the
  // summation order. fp32 inputs follow torch's float32 matmul precision setting (TF32 only if
  // the user allows it). The scale is applied in fp32 by the kernels.
  const at::Tensor q = q_window.contiguous().reshape({B * Hkv, G * W, D});
  const at::Tensor kT = keys.contiguous().reshape({B * Hkv, N, D}).transpose(1, 2);
  const at::Tensor logits =
      (q.scalar_type() == at::kFloat ? at::bmm(q, kT) : at::bmm(q, kT, at::kFloat)).contiguous();
  const at::Tensor mask = bool_mask(key_mask);

  WindowImportance p{};
  p.logits = logits.const_data_ptr<float>();
  p.key_mask = mask_ptr(mask);
  p.out = out.data_ptr<float>();
  p.B = B, p.Hkv = Hkv, p.G = G, p.W = W, p.N = N, p.C = C, p.pool_kernel = pool_kernel;
  // With D = 0 the logits are exactly 0 (as on the CPU); 1/sqrt(0) must not turn them to NaN.
  p.scale = D == 0 ? 1.f
                   : static_cast<float>(scaling.value_or(1.0 / std::sqrt(static_cast<double>(D))));
  p.max_pool = pooling == Pooling::Max;
  p.max_reduce = reduce == GqaReduce::Max;
  const at::Tensor workspace =
      at::empty({window_importance_workspace(p)}, keys.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  launch_window_importance(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> key_diversity(const at::Tensor& keys, int64_t window,
                                                 const OptTensor& key_mask) {
  const char* op = "key_diversity";
  key_diversity_shape(keys, window, key_mask);
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  at::Tensor diversity = at::empty({B, Hkv, N - window}, keys.options().dtype(at::kFloat));
  at::Tensor redundancy = at::empty({B, Hkv}, keys.options().dtype(at::kFloat));
  if (B * Hkv == 0) return {diversity, redundancy};
  MIXKV_CHECK_VALUE(D <= kKeyDiversityMaxHeadDim, op, "the CUDA kernel supports keys head dim D <= ",
                    kKeyDiversityMaxHeadDim, ", got ", D);
  const at::Tensor k = keys.contiguous(), mask = bool_mask(key_mask);

  KeyDiversity p{};
  p.keys = k.const_data_ptr();
  p.dtype = dtype_of(k);
  p.key_mask = mask_ptr(mask);
  p.diversity = diversity.data_ptr<float>();
  p.redundancy = redundancy.data_ptr<float>();
  p.B = B, p.Hkv = Hkv, p.N = N, p.D = D, p.C = N - window;
  const at::Tensor workspace =
      at::empty({plan_key_diversity(p)}, keys.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  launch_key_diversity(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {diversity, redundancy};
}

at::Tensor mix_scores(const at::Tensor& importance, const OptTensor& value_norm,
                      const OptTensor& diversity, const OptTensor& redundancy,
                      c10::string_view mode_name, const OptTensor& key_mask) {
  const char* op = "mix_scores";
  mix_scores_shape(importance, value_norm, diversity, redundancy, mode_name, key_mask);
  const Mode mode = parse_mode(op, mode_name);
  const c10::cuda::CUDAGuard guard(importance.device());
  const int64_t B = importance.size(0), Hkv = importance.size(1), C = importance.size(2);
  at::Tensor out = at::empty({B, Hkv, C}, importance.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  auto as_float = [](const OptTensor& t, bool used) {
    return used ? t->to(at::kFloat).contiguous() : at::Tensor();
  };
  const at::Tensor A = importance.to(at::kFloat).contiguous();
  const at::Tensor V = as_float(value_norm, mode_uses_value_norm(mode));
  const at::Tensor Dv = as_float(diversity, mode_uses_diversity(mode));
  const at::Tensor R = as_float(redundancy, mode_uses_redundancy(mode));
  const at::Tensor mask = bool_mask(key_mask);

  MixScores p{};
  p.importance = A.const_data_ptr<float>();
  p.value_norm = V.defined() ? V.const_data_ptr<float>() : nullptr;
  p.diversity = Dv.defined() ? Dv.const_data_ptr<float>() : nullptr;
  p.redundancy = R.defined() ? R.const_data_ptr<float>() : nullptr;
  p.key_mask = mask_ptr(mask);
  p.out = out.data_ptr<float>();
  p.B = B, p.Hkv = Hkv, p.C = C;
  p.mask_stride = mask.defined() ? mask.size(1) : 0;
  p.mode = mode;
  launch_mix_scores(p, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
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

}  // namespace mixkv::cuda
