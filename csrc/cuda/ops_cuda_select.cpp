// Torch-facing glue of the CUDA selection ops (head_budgets, select_kv, select_kv_ragged) and of
// the fused compress / compress_ragged: checks (shared shape functions), device guard, current
// stream, launch checks.
//
// Device -> host synchronisations, each one small copy:
// - select_kv / compress: one, at the end, to raise the CPU op's error when a real candidate's
//   score is NaN or inf (the kernels have already run; the outputs are discarded).
// - select_kv_ragged / compress_ragged: one before the selection: the output size T (the sum
//   of the segment lengths) is data dependent, and the same copy carries the capacity and
//   finiteness checks.
// - head_budgets (and so compress_ragged): the CPU kernel computes the capacities (see below).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cpu/kernels.h"
#include "cuda/glue.h"
#include "cuda/select.cuh"
#include "mixkv/compose.h"
#include "mixkv/checks.h"
#include "mixkv/options.h"
#include "mixkv/shapes.h"

namespace mixkv::cuda {
namespace {

void check_positions_fit(const char* op, int64_t N) {
  MIXKV_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), op,
                    "the prompt length N = ", N, " does not fit the int32 kept positions");
}

// head_budgets: the capacities are computed by the CPU kernel on a host copy of the (small)
// inputs and copied back. Reason: the adaptive policy sums each head's top-c scores in double in
// an order that std::nth_element chooses, and that sum scales the head's scores before the
// global top-(Hkv*c) with its (head, position) tie-break; a device reduction cannot promise the
// same bits, and the capacities must be identical to the CPU op's. Only the adaptive policy
// reads the importance values; the other policies copy only key_mask (for the per-row count of
// real candidates).
at::Tensor head_budgets(const at::Tensor& importance, int64_t capacity, c10::string_view policy,
                        double floor_alpha, bool normalize, const OptTensor& key_mask,
                        int64_t layer, int64_t num_layers, int64_t pyramid_beta,
                        const OptTensor& profile) {
  head_budgets_shape(importance, capacity, policy, floor_alpha, key_mask, layer, num_layers,
                     pyramid_beta, profile);
  const c10::cuda::CUDAGuard guard(importance.device());
  const bool adaptive = parse_policy("head_budgets", policy) == Policy::Adaptive;
  const at::Tensor host_importance =
      adaptive ? importance.cpu()
               : at::empty(importance.sizes(), at::TensorOptions().dtype(at::kFloat));
  const OptTensor host_mask = key_mask ? OptTensor(key_mask->cpu()) : std::nullopt;
  const OptTensor host_profile = profile ? OptTensor(profile->cpu()) : std::nullopt;
  const at::Tensor caps =
      mixkv::cpu::head_budgets(host_importance, capacity, policy, floor_alpha, normalize,
                               host_mask, layer, num_layers, pyramid_beta, host_profile);
  at::Tensor out = at::empty(caps.sizes(), importance.options().dtype(at::kInt));
  out.copy_(caps);
  return out;
}

// Positions and K/V rows of the selection, into outputs allocated by the caller.
void select_into(const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
                 const at::Tensor& mask, const at::Tensor& offsets, int64_t dense_k,
                 int64_t window, int64_t T, int64_t* nonfinite, at::Tensor& out_k,
                 at::Tensor& out_v, at::Tensor& idx) {
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* off = offsets.defined() ? offsets.const_data_ptr<int32_t>() : nullptr;
  SelectPositions p{};
  p.scores = scores.const_data_ptr<float>();
  p.key_mask = mask_ptr(mask);
  p.offsets = off;
  p.kept = idx.data_ptr<int32_t>();
  p.nonfinite = nonfinite;
  p.dense_k = dense_k;
  p.B = B, p.Hkv = Hkv, p.N = N, p.W = window;
  launch_select_positions(p, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_gather_rows(keys.const_data_ptr(), values.const_data_ptr(), out_k.data_ptr(),
                     out_v.data_ptr(), idx.const_data_ptr<int32_t>(), off, dense_k + window, T,
                     B * Hkv, N, D * keys.element_size(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_kv(const at::Tensor& scores,
                                                         const at::Tensor& keys,
                                                         const at::Tensor& values,
                                                         int64_t capacity, int64_t window,
                                                         const OptTensor& key_mask) {
  const char* op = "select_kv";
  select_kv_shape(scores, keys, values, capacity, window, key_mask);
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  check_positions_fit(op, N);
  const int64_t C = N - window, k = std::min(capacity, C), L = k + window;
  const at::Tensor s = scores.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const at::Tensor mask = bool_mask(key_mask);
  at::Tensor out_k = at::empty({B, Hkv, L, D}, keys.options());
  at::Tensor out_v = at::empty({B, Hkv, L, D}, values.options());
  at::Tensor idx = at::empty({B, Hkv, L}, keys.options().dtype(at::kInt));
  if (B * Hkv == 0) return {out_k, out_v, idx};
  const at::Tensor flag = at::zeros({1}, keys.options().dtype(at::kLong));
  select_into(s, kc, vc, mask, at::Tensor(), k, window, B * Hkv * L, flag.data_ptr<int64_t>(),
              out_k, out_v, idx);
  check_scores_finite(op, flag.cpu().const_data_ptr<int64_t>()[0] == 0);
  return {out_k, out_v, idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_kv_ragged(
    const at::Tensor& scores, const at::Tensor& keys, const at::Tensor& values,
    const at::Tensor& capacity, int64_t window, const OptTensor& key_mask) {
  const char* op = "select_kv_ragged";
  select_kv_ragged_check(scores, keys, values, capacity, window, key_mask);
  const c10::cuda::CUDAGuard guard(keys.device());
  const int64_t B = keys.size(0), Hkv = keys.size(1), N = keys.size(2), D = keys.size(3);
  check_positions_fit(op, N);
  const int64_t C = N - window, BH = B * Hkv;
  const at::Tensor s = scores.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const at::Tensor caps = capacity.contiguous(), mask = bool_mask(key_mask);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // status: [0] total kept rows, [1] first head with a negative capacity or -1, [2] non-finite.
  at::Tensor offsets = at::empty({BH + 1}, capacity.options());
  const at::Tensor status = at::zeros({3}, keys.options().dtype(at::kLong));
  int64_t* st = status.data_ptr<int64_t>();
  launch_check_finite(s.const_data_ptr<float>(), mask_ptr(mask), st + 2, B, Hkv, N, C, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_ragged_offsets(caps.const_data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), st, BH, C,
                        window, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = status.cpu();
  const int64_t total = host.const_data_ptr<int64_t>()[0];
  const int64_t negative = host.const_data_ptr<int64_t>()[1];
  if (negative >= 0) {  // the CPU op's message: the first negative capacity in (row, head) order
    check_head_capacity(op, caps.cpu().const_data_ptr<int32_t>()[negative], negative, Hkv);
  }
  check_offsets_fit(op, total);
  check_scores_finite(op, host.const_data_ptr<int64_t>()[2] == 0);

  at::Tensor out_k = at::empty({total, D}, keys.options());
  at::Tensor out_v = at::empty({total, D}, values.options());
  at::Tensor idx = at::empty({total}, keys.options().dtype(at::kInt));
  if (BH > 0) select_into(s, kc, vc, mask, offsets, 0, window, total, nullptr, out_k, out_v, idx);
  return {out_k, out_v, idx, offsets};
}

// The score ops, called through the dispatcher (their CUDA kernels live in other files).
at::Tensor call_window_importance(const at::Tensor& q_window, const at::Tensor& keys,
                                  const OptTensor& key_mask, int64_t pool_kernel,
                                  c10::string_view pooling, c10::string_view gqa_reduce,
                                  std::optional<double> scaling) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mixkv::window_importance", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                            c10::string_view, c10::string_view, std::optional<double>)>();
  return op.call(q_window, keys, key_mask, pool_kernel, pooling, gqa_reduce, scaling);
}

at::Tensor call_value_norm(const at::Tensor& values, int64_t window, const OptTensor& key_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mixkv::value_norm", "")
          .typed<at::Tensor(const at::Tensor&, int64_t, const OptTensor&)>();
  return op.call(values, window, key_mask);
}

std::tuple<at::Tensor, at::Tensor> call_key_diversity(const at::Tensor& keys, int64_t window,
                                                      const OptTensor& key_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mixkv::key_diversity", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t,
                                                    const OptTensor&)>();
  return op.call(keys, window, key_mask);
}

at::Tensor call_mix_scores(const at::Tensor& importance, const OptTensor& value_norm,
                           const OptTensor& diversity, const OptTensor& redundancy,
                           c10::string_view mode, const OptTensor& key_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mixkv::mix_scores", "")
          .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                            const OptTensor&, c10::string_view, const OptTensor&)>();
  return op.call(importance, value_norm, diversity, redundancy, mode, key_mask);
}

// The fused ops through the shared flow (mixkv/compose.h) with this file's selection kernels
// and the score ops' CUDA kernels.
struct CudaOps {
  using DeviceGuard = c10::cuda::CUDAGuard;
  static constexpr auto window_importance = &call_window_importance;
  static constexpr auto value_norm = &call_value_norm;
  static constexpr auto key_diversity = &call_key_diversity;
  static constexpr auto mix_scores = &call_mix_scores;
  static constexpr auto head_budgets = &cuda::head_budgets;
  static constexpr auto select_kv = &cuda::select_kv;
  static constexpr auto select_kv_ragged = &cuda::select_kv_ragged;
};

}  // namespace
}  // namespace mixkv::cuda

TORCH_LIBRARY_IMPL(mixkv, CUDA, m) {
  m.impl("head_budgets", &mixkv::cuda::head_budgets);
  m.impl("select_kv", &mixkv::cuda::select_kv);
  m.impl("select_kv_ragged", &mixkv::cuda::select_kv_ragged);
  m.impl("compress", &mixkv::compress_with<mixkv::cuda::CudaOps>);
  m.impl("compress_ragged", &mixkv::compress_ragged_with<mixkv::cuda::CudaOps>);
}
