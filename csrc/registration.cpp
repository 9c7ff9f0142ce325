// The one place where the mixkv op schemas live. Backends add kernels with TORCH_LIBRARY_IMPL
// (cpu/register.cpp, meta/register.cpp, cuda/register.cpp; the ragged ops' fake kernels are in
// mixkv/_fake.py); mixkv/ops.py documents each op, docs/design.md section 3 is the contract.
//
// Shapes: B batch, Hq query heads, Hkv KV heads (Hq % Hkv == 0), N prompt length, W window,
// D head dim, C = N - W candidates. key_mask is [B, N] (true = real token). Scores are float32.
#include <torch/library.h>

TORCH_LIBRARY(mixkv, m) {
  // Attention of the W window queries to each candidate (causal, softmax over all real keys),
  // mean over the window, GQA-reduced per KV head, then pooled. -> [B, Hkv, C] float32.
  m.def("window_importance(Tensor q_window, Tensor keys, Tensor? key_mask=None, int pool_kernel=5, "
        "str pooling=\"avg\", str gqa_reduce=\"mean\", float? scaling=None) -> Tensor");
  // L2 norm of each candidate's value vector. -> [B, Hkv, C] float32.
  m.def("value_norm(Tensor values, int window, Tensor? key_mask=None) -> Tensor");
  // -(cosine of each candidate key to the head's mean unit key), and the head's redundancy
  // (mean pairwise cosine similarity of its keys, in [0, 1]). -> ([B, Hkv, C], [B, Hkv]).
  m.def("key_diversity(Tensor keys, int window, Tensor? key_mask=None) -> (Tensor, Tensor)");
  // Normalise value norm and diversity to the importance scale and mix them by mode
  // (attn, keydiff, vnorm, mix3, mixkv). -> [B, Hkv, C] float32.
  m.def("mix_scores(Tensor importance, Tensor? value_norm=None, Tensor? diversity=None, "
        "Tensor? redundancy=None, str mode=\"mixkv\", Tensor? key_mask=None) -> Tensor");
  // Per-head capacities (uniform, pyramid, adaptive, explicit). -> [B, Hkv] int32.
  m.def("head_budgets(Tensor importance, int capacity, str policy=\"adaptive\", "
        "float floor_alpha=0.2, bool normalize=True, Tensor? key_mask=None, int layer=0, "
        "int num_layers=1, int pyramid_beta=20, Tensor? profile=None) -> Tensor");
  // Top-capacity candidates per head + the window, uniform capacity. -> (keys, values
  // [B, Hkv, min(capacity, C) + W, D], kept positions [B, Hkv, min(capacity, C) + W] int32).
  m.def("select_kv(Tensor scores, Tensor keys, Tensor values, int capacity, int window, "
        "Tensor? key_mask=None) -> (Tensor, Tensor, Tensor)");
  // As select_kv with capacity [B, Hkv] int32: segments in (row, head) order. -> (keys [T, D],
  // values [T, D], positions [T] int32, offsets [B * Hkv + 1] int32).
  m.def("select_kv_ragged(Tensor scores, Tensor keys, Tensor values, Tensor capacity, int window, "
        "Tensor? key_mask=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused path, uniform capacity budget - window: as select_kv.
  m.def("compress(Tensor q_window, Tensor keys, Tensor values, Tensor? key_mask, int budget, "
        "int window=32, str mode=\"mixkv\", Tensor? redundancy=None, int pool_kernel=5, "
        "str pooling=\"avg\", str gqa_reduce=\"mean\", float? scaling=None) "
        "-> (Tensor, Tensor, Tensor)");
  // Fused path with head-wise capacities from head_budgets: as select_kv_ragged.
  m.def("compress_ragged(Tensor q_window, Tensor keys, Tensor values, Tensor? key_mask, "
        "int budget, int window=32, str mode=\"mixkv\", Tensor? redundancy=None, "
        "int pool_kernel=5, str pooling=\"avg\", str gqa_reduce=\"mean\", float? scaling=None, "
        "str policy=\"adaptive\", float floor_alpha=0.2, bool normalize=True, int layer=0, "
        "int num_layers=1, int pyramid_beta=20, Tensor? profile=None) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Decode attention over the head-wise (ragged) cache: (row b, KV head h) owns rows
  // starts[b,h] .. starts[b,h] + lengths[b,h] of keys/values [S, D] (spare rows may follow). The
  // q queries [B, Hq, q, D] are the segment's last q tokens (causal); valid [S] false = padding.
  // -> [B, q, Hq, D] in query's dtype.
  m.def("ragged_attention(Tensor query, Tensor keys, Tensor values, Tensor starts, "
        "Tensor lengths, Tensor? valid=None, float? scaling=None) -> Tensor");
}
