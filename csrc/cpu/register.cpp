// The CPU kernels of every mixkv op, registered in one place; the fused compress and
// compress_ragged are the shared flow of mixkv/compose.h over them.
#include <torch/library.h>

#include "cpu/kernels.h"
#include "mixkv/compose.h"

TORCH_LIBRARY_IMPL(mixkv, CPU, m) {
  m.impl("window_importance", &mixkv::cpu::window_importance);
  m.impl("value_norm", &mixkv::cpu::value_norm);
  m.impl("key_diversity", &mixkv::cpu::key_diversity);
  m.impl("mix_scores", &mixkv::cpu::mix_scores);
  m.impl("head_budgets", &mixkv::cpu::head_budgets);
  m.impl("select_kv", &mixkv::cpu::select_kv);
  m.impl("select_kv_ragged", &mixkv::cpu::select_kv_ragged);
  m.impl("compress", &mixkv::compress_with<mixkv::cpu::CpuOps>);
  m.impl("compress_ragged", &mixkv::compress_ragged_with<mixkv::cpu::CpuOps>);
  m.impl("ragged_attention", &mixkv::cpu::ragged_attention);
}
