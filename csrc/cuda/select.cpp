// Torch-facing glue of the CUDA selection ops (select_kv, select_kv_ragged; the fused compress /
// compress_ragged run them through mixkv/compose.h, registered in register.cpp): checks (shared
// shape functions), device guard, current stream, launch checks.
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
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/glue.h"
#include "cuda/ops.h"
#include "cuda/select.cuh"
#include "mixkv/checks.h"
#include "mixkv/shapes.h"

namespace mixkv::cuda {
namespace {

void check_positions_fit(const char* op, int64_t N) {
  MIXKV_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), op,
                    "the prompt length N = ", N, " does not fit the int32 kept positions");
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

}  // namespace

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

}  // namespace mixkv::cuda
