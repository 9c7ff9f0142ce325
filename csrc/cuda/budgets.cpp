// Torch-facing glue of the CUDA head_budgets: the capacities come from the CPU kernel (below).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "cpu/kernels.h"
#include "cuda/ops.h"
#include "mixkv/options.h"
#include "mixkv/shapes.h"

namespace mixkv::cuda {

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

}  // namespace mixkv::cuda
