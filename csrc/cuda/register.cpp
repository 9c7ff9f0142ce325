// The CUDA kernels of every mixkv op, registered in one place (tests/test_cuda_ops.py checks that
// none is missing).
#include <torch/library.h>

#include "cuda/ops.h"
#include "mixkv/compose.h"

TORCH_LIBRARY_IMPL(mixkv, CUDA, m) {
  m.impl("window_importance", &mixkv::cuda::window_importance);
  m.impl("value_norm", &mixkv::cuda::value_norm);
  m.impl("key_diversity", &mixkv::cuda::key_diversity);
  m.impl("mix_scores", &mixkv::cuda::mix_scores);
  m.impl("head_budgets", &mixkv::cuda::head_budgets);
  m.impl("select_kv", &mixkv::cuda::select_kv);
  m.impl("select_kv_ragged", &mixkv::cuda::select_kv_ragged);
  m.impl("compress", &mixkv::compress_with<mixkv::cuda::CudaOps>);
  m.impl("compress_ragged", &mixkv::compress_ragged_with<mixkv::cuda::CudaOps>);
  m.impl("ragged_attention", &mixkv::cuda::ragged_attention);
}
