#!/usr/bin/env python
"""Groundwork probe for the vLLM plugin (issue 27): what a plugin can reach in vLLM's v1 CPU path.

Run from the repository root, in the vLLM venv, with the tree's op library importable:

    PYTHONPATH=. /work/vllm-venv/bin/python scripts/vllm_probe.py [--keep DIR]

It builds a tiny random Llama (hidden 128, 4 query heads, 2 KV heads, head_dim 32, 2 layers,
vocab 256; save_pretrained to a temporary folder, no tokenizer: vLLM runs with
skip_tokenizer_init=True on token-id prompts) and checks, in one vLLM engine (single process,
VLLM_ENABLE_V1_MULTIPROCESSING=0, a 16-block pool of 32 tokens, eager, float32):

1. greedy tokens equal Hugging Face's (model.generate on the same folder) and the sampled
   tokens' logprobs agree within 1e-4, for 4 prompts of 7-150 tokens in one batch;
2. an attention backend registered *in place of* CPU_ATTN (``register_backend(
   AttentionBackendEnum.CPU_ATTN, ...)``, what a general plugin would do) is used by every
   layer, and its ``forward`` sees each prefill's post-RoPE queries, keys and values;
3. one layer's K/V cache of each request is read back through its block table (the key cache
   is stored in an ISA-dependent packed order inside each (block, head); the order is learnt
   by writing coded keys through vLLM's own ``cpu_attn_reshape_and_cache`` into a scratch block)
   and equals the keys/values the layer's forward received;
4. the window queries and keys vLLM's layers see give exactly the tokens mixkv keeps from
   Hugging Face's (``torch.ops.mixkv.compress``, per KV head, heads keeping different tokens);
5. a custom KV-cache spec (``customize_spec`` of that backend) with its own
   SingleTypeKVCacheManager (``KVCacheSpecRegistry``) is used by the scheduler, whose
   ``remove_skipped_blocks`` is called every step with the processed-token count and the prompt
   length: the place where a compressed request's leading blocks go back to the pool;
6. stage 2, the mechanism docs/vllm-plugin.md proposes, end to end in the same engine: after
   each prefill every layer's forward selects with ``torch.ops.mixkv.compress`` (budget 24,
   window 8) and writes each head's kept tokens to cache indices [s*bs, s*bs + 24) through the
   backend's reshape-and-cache op (s = (N - 24) // bs); the manager frees the s leading blocks;
   for later steps the metadata builder shifts the request's block-table row by s blocks and
   its seq_len by N - 24, and a runner hook moves its slot mapping down by g = N - 24 - s*bs
   (positions, hence RoPE, untouched). Greedy tokens equal ``mixkv.patch(model, "mixkv")`` +
   ``generate`` (and differ from the full cache's), logprobs within 1e-4, 4 blocks freed.

The plugin built on it is mixkv/vllm (docs/vllm-plugin.md section 14); this script stays as the
record of the groundwork. Stage 2 is a probe, not the plugin: it monkeypatches GPUModelRunner._prepare_inputs in this
process, handles no chunked prefill, preemption or prefix caching, and compresses every prompt.
Prints what it measured and exits non-zero on any failed check (about 15 s on 2 cores). Under
ATEN_CPU_CAPABILITY=default it sets TORCH_COMPILE_DISABLE=1 (see below).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, fields

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # engine core + worker in-process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")            # GiB; the pool is overridden below
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
    # Asking for logprobs makes vLLM's sampler torch.compile a helper
    # (v1/sample/ops/logprobs.py: batched_count_greater_than, inductor on CPU), whose generated
    # C++ does not compile under ATEN_CPU_CAPABILITY=default ("'at::vec' has not been
    # declared"); run it eagerly there (the CI reruns suites under that setting).
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import torch  # noqa: E402

PROMPT_LENGTHS = (7, 40, 75, 150)  # 1, 2, 3 and 5 blocks of 32 tokens (150 waits a step)
MAX_TOKENS = 8
BLOCK = 32
NUM_BLOCKS = 16
WINDOW = 8                         # mixkv window (queries) for the selection check
BUDGET = 24                        # kept tokens per KV head (window included)
LOGPROB_TOL = 1e-4

# What the probe backend / manager record (the engine runs in this process).
RECORD: dict = {"armed": False, "prefill": {}, "decode_meta": None, "impls": 0, "calls": []}
# The compression experiment (stage 2): per-step rows from the runner hook, per-request plans.
STATE: dict = {"compress": False, "rows": [], "plan": {}, "freed": [], "written": 0}


def plan_of(num_prompt: int, budget: int, block: int):
    """The one rule both sides apply (scheduler: which blocks to free; worker: where the kept
    tokens go): keep `budget` tokens per head out of `num_prompt`, drop d = N - budget; the
    first s = d // block blocks are freed and the kept tokens fill cache indices
    [s*block, s*block + budget); every later token p is cached at p - g, g = d - s*block."""
    if num_prompt <= budget:
        return None
    drop = num_prompt - budget
    s = drop // block
    return s, drop - s * block


# ----------------------------------------------------------------------------- the model
def build_model(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, num_hidden_layers=2, vocab_size=256, max_position_embeddings=512,
        rms_norm_eps=1e-6, initializer_range=0.1,        # peaked logits: no greedy near-ties
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)


def make_prompts() -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


# ----------------------------------------------------------------------------- K/V cache access
_PERMUTATIONS: dict = {}


def key_order(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> torch.Tensor:
    """For the CPU backend's key cache: index[o * D + d] = where key (slot o, dim d) of one
    (block, head) lies in that block's bs*D elements. Learnt by writing coded keys through
    vLLM's own reshape-and-cache op into a scratch one-block, one-head cache (codes < 128 are
    exact in every supported dtype, so slot and dim are written in two digits each)."""
    import vllm._custom_ops as ops

    cache_key = (isa, dtype, block_size, head_size)
    if cache_key in _PERMUTATIONS:
        return _PERMUTATIONS[cache_key]
    bs, D = block_size, head_size
    slot = torch.arange(bs)[:, None].expand(bs, D)
    dim = torch.arange(D)[None, :].expand(bs, D)
    digits = []
    for code in (slot % 128, slot // 128, dim % 128, dim // 128):
        kv = torch.zeros(1, 1, bs, 2 * D, dtype=dtype)
        key_cache, value_cache = kv.view(1, 1, 2 * bs, D).chunk(2, dim=2)
        key = code.to(dtype)[:, None, :].contiguous()            # [bs tokens, 1 head, D]
        ops.cpu_attn_reshape_and_cache(key, key.clone(), key_cache, value_cache,
                                       torch.arange(bs, dtype=torch.int64), isa)
        digits.append(key_cache[0, 0].reshape(-1).to(torch.int64))
    stored_slot = digits[0] + 128 * digits[1]
    stored_dim = digits[2] + 128 * digits[3]
    flat = stored_slot * D + stored_dim                          # plain index of each stored element
    assert torch.equal(flat.sort().values, torch.arange(bs * D)), "not a permutation"
    index = torch.empty_like(flat)
    index[flat] = torch.arange(bs * D)
    _PERMUTATIONS[cache_key] = index
    return index


def read_request_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, seq_len: int, isa: str):
    """K and V [Hkv, seq_len, D] of one request from a CPU_ATTN layer cache
    [num_blocks, Hkv, block_size, 2 * D] through its block-table row."""
    num_blocks, H, bs, two_d = kv_cache.shape
    D = two_d // 2
    nblk = -(-seq_len // bs)
    blocks = block_row[:nblk].to(torch.int64)
    key_cache, value_cache = kv_cache.view(num_blocks, H, 2 * bs, D).chunk(2, dim=2)
    order = key_order(isa, kv_cache.dtype, bs, D)
    stored = key_cache[blocks].reshape(nblk, H, bs * D)          # stored order
    keys = stored[..., order].view(nblk, H, bs, D)
    values = value_cache[blocks]                                  # values are plain [bs, D]
    keys = keys.permute(1, 0, 2, 3).reshape(H, nblk * bs, D)[:, :seq_len]
    values = values.permute(1, 0, 2, 3).reshape(H, nblk * bs, D)[:, :seq_len]
    return keys, values


# ----------------------------------------------------------------------------- probe backend/spec
def install_probe_backend() -> None:
    """What mixkv.vllm's plugin function would do: replace CPU_ATTN by a subclass (forward and
    spec hooks) and register a spec -> manager pair with the scheduler's registry."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend,
                                                     CPUAttentionBackendImpl,
                                                     CPUAttentionMetadataBuilder)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    @dataclass(frozen=True, kw_only=True)
    class ProbeSpec(FullAttentionSpec):
        probe_tag: str = "mixkv-probe"

    class ProbeManager(FullAttentionManager):
        def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                                  num_prompt_tokens=None):
            blocks = self.req_to_blocks.get(request_id, [])
            RECORD["calls"].append((request_id, processed_computed_tokens, num_prompt_tokens,
                                    len(blocks)))
            plan = (plan_of(num_prompt_tokens, BUDGET, self.block_size)
                    if STATE["compress"] and num_prompt_tokens is not None else None)
            if plan is not None and processed_computed_tokens >= num_prompt_tokens and plan[0]:
                held = [b for b in blocks[: plan[0]] if not b.is_null]
                if held:   # the worker compressed this request in the step that ended its prefill
                    self._remove_blocks_in_range(request_id, 0, plan[0])
                    STATE["freed"].append((request_id, num_prompt_tokens, len(held),
                                           self.block_pool.get_num_free_blocks()))
            return super().remove_skipped_blocks(request_id, processed_computed_tokens,
                                                 num_prompt_tokens)

    class ProbeImpl(CPUAttentionBackendImpl):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            RECORD["impls"] += 1

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                  output_scale, output_block_scale)
            if (RECORD["armed"] and attn_metadata is not None and key is not None
                    and self.attn_type == AttentionType.DECODER):
                record_step(layer, query, key, value, kv_cache, attn_metadata)
            if STATE["compress"] and attn_metadata is not None and key is not None:
                compress_prefills(self, layer, query, key, value, kv_cache, attn_metadata)
            return out

    class ProbeBuilder(CPUAttentionMetadataBuilder):
        def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            cm = common_attn_metadata
            if STATE["compress"] and any(rid in STATE["plan"] for rid, *_ in STATE["rows"]):
                seq_lens, table = cm.seq_lens.clone(), cm.block_table_tensor.clone()
                for r, (rid, n, _, _) in enumerate(STATE["rows"]):
                    if rid in STATE["plan"]:            # a compressed request: shifted view
                        s_blocks, _ = STATE["plan"][rid]
                        seq_lens[r] -= n - BUDGET
                        table[r, : table.shape[1] - s_blocks] = cm.block_table_tensor[r, s_blocks:]
                cm = dataclasses.replace(cm, seq_lens=seq_lens, block_table_tensor=table)
            return super().build(common_prefix_len, cm, fast_build)

    class ProbeBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return ProbeImpl

        @staticmethod
        def get_builder_cls():
            return ProbeBuilder

        @classmethod
        def customize_spec(cls, spec):
            spec = super().customize_spec(spec)
            if type(spec) is FullAttentionSpec:
                spec = ProbeSpec(**{f.name: getattr(spec, f.name) for f in fields(spec)})
            return spec

    module = sys.modules[__name__]
    module.ProbeBackend, module.ProbeSpec = ProbeBackend, ProbeSpec
    ProbeBackend.__qualname__ = "ProbeBackend"
    register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.ProbeBackend")

    prepare = GPUModelRunner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        """After vLLM's own: which request each batch row is, and (stage 2) the slot mapping of
        compressed requests moved g tokens down (positions, hence RoPE, are untouched)."""
        result = prepare(self, scheduler_output, num_scheduled_tokens)
        batch = self.input_batch
        n = batch.num_reqs
        STATE["rows"] = [(rid, int(batch.num_prompt_tokens[r]),
                          int(batch.num_computed_tokens_cpu[r]), int(num_scheduled_tokens[r]))
                         for r, rid in enumerate(batch.req_ids[:n])]
        if STATE["compress"] and STATE["plan"]:
            table = batch.block_table[0]
            bs = table.block_size
            slots = table.slot_mapping.cpu                   # the buffer the KV writes read
            rows = table.block_table.cpu
            qsl = self.query_start_loc.cpu[: n + 1].tolist()
            positions = self.positions[: qsl[-1]]
            for r, (rid, *_) in enumerate(STATE["rows"]):
                if rid in STATE["plan"]:
                    g = STATE["plan"][rid][1]
                    c = positions[qsl[r]: qsl[r + 1]] - g     # cache index of each new token
                    slots[qsl[r]: qsl[r + 1]] = rows[r, c // bs].to(torch.int64) * bs + c % bs
        return result

    GPUModelRunner._prepare_inputs = _prepare_inputs
    # The registry fills itself with vLLM's built-in specs only while it is empty: registering
    # first would leave FullAttentionSpec without a manager. Fill it, then add ours.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(ProbeSpec, ProbeManager, uniform_type_base_spec=FullAttentionSpec)


def layer_index(name: str) -> int:
    return int(re.search(r"layers\.(\d+)\.", name).group(1))


def record_step(layer, query, key, value, kv_cache, meta) -> None:
    qsl = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    for r in range(len(qsl) - 1):
        q0, q1 = qsl[r], qsl[r + 1]
        n = q1 - q0
        if n == 0 or r >= len(seq_lens):
            continue
        if n == seq_lens[r]:                       # the whole prompt in this step: a prefill
            k_cache, v_cache = read_request_kv(kv_cache, meta.block_table[r], n, layer.isa)
            RECORD["prefill"][(layer_index(layer.layer_name), n)] = dict(
                query=query[q0:q1].clone(), key=key[q0:q1].clone(), value=value[q0:q1].clone(),
                k_cache=k_cache.clone(), v_cache=v_cache.clone(),
                blocks=meta.block_table[r, : -(-n // BLOCK)].tolist(),
                kv_cache_shape=tuple(kv_cache.shape), isa=layer.isa)
        elif RECORD["decode_meta"] is None and n == 1 and layer_index(layer.layer_name) == 0:
            RECORD["decode_meta"] = dict(
                type=type(meta).__name__, query_start_loc=qsl, seq_lens=seq_lens,
                block_table=meta.block_table[: len(seq_lens), :4].tolist(),
                slot_mapping=meta.slot_mapping[: qsl[-1]].tolist(),
                max_seq_len=meta.max_seq_len, num_actual_tokens=meta.num_actual_tokens)


def compress_prefills(impl, layer, query, key, value, kv_cache, meta) -> None:
    """Stage 2: for each request whose prompt ends in this step, select with mixkv from the
    prefill's window queries and keys (this layer's full-attention output is already written)
    and write each head's kept tokens to cache indices [s*bs, s*bs + budget) through vLLM's
    own reshape-and-cache op (the first s blocks are freed by the scheduler's manager)."""
    import vllm._custom_ops as ops

    qsl = meta.query_start_loc.tolist()
    num_blocks, H, bs, two_d = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, H, 2 * bs, two_d // 2).chunk(2, dim=2)
    for r, (rid, n, computed, scheduled) in enumerate(STATE["rows"]):
        plan = plan_of(n, BUDGET, bs)
        if plan is None or computed != 0 or computed + scheduled != n:
            continue            # not a prompt processed whole in this step (no chunking here)
        q0, q1 = qsl[r], qsl[r + 1]
        q_window = query[q1 - WINDOW: q1].transpose(0, 1)[None]
        keys, values = key[q0:q1].transpose(0, 1)[None], value[q0:q1].transpose(0, 1)[None]
        kept_k, kept_v, _ = torch.ops.mixkv.compress(q_window, keys, values, None, BUDGET, WINDOW)
        s_blocks, _ = plan
        c = s_blocks * bs + torch.arange(BUDGET)
        slots = meta.block_table[r, c // bs].to(torch.int64) * bs + c % bs
        # kept rank j of every head goes to cache index s*bs + j: one "token" per rank
        ops.cpu_attn_reshape_and_cache(
            kept_k[0].transpose(0, 1).contiguous(), kept_v[0].transpose(0, 1).contiguous(),
            key_cache, value_cache, slots, layer.isa, k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float, kv_cache_dtype=impl.kv_cache_dtype)
        STATE["plan"][rid] = plan
        STATE["written"] += 1


# ----------------------------------------------------------------------------- runs
def run_hf(folder: str, prompts: list):
    from transformers import AutoModelForCausalLM

    import mixkv
    from mixkv.hf.capture import capture_prefill

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None      # vLLM runs with ignore_eos
    results = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            input_ids = torch.tensor([ids])
            out = model.generate(input_ids, max_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            tokens = out.sequences[0, len(ids):].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1)[t].item()
                        for step, t in zip(out.logits, tokens)]
            with capture_prefill(model, WINDOW) as captured:
                cache = model(input_ids, use_cache=True).past_key_values
            layers = {l: (captured.queries[l], cache.layers[l].keys, cache.layers[l].values)
                      for l in captured.queries}
            results.append(dict(tokens=tokens, logprobs=logprobs, layers=layers))
        t_hf = time.perf_counter() - t0
        for ids, res in zip(prompts, results):     # stage 2's reference: mixkv.patch + generate
            with mixkv.patch(model, "mixkv", budget=BUDGET, window=WINDOW):
                out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS,
                                     do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
            tokens = out.sequences[0, len(ids):].tolist()
            res["patched"] = dict(tokens=tokens, logprobs=[
                torch.log_softmax(step[0].float(), -1)[t].item()
                for step, t in zip(out.logits, tokens)])
    return results, t_hf


def run_vllm(folder: str, prompts: list):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=folder, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              block_size=BLOCK, num_gpu_blocks_override=NUM_BLOCKS, max_model_len=256,
              max_num_seqs=4, max_num_batched_tokens=256, enable_prefix_caching=False,
              enable_chunked_prefill=False, seed=0, disable_log_stats=True)
    t_init = time.perf_counter() - t0
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True,
                            detokenize=False)
    batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    RECORD["armed"] = True
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    t_first = time.perf_counter() - t0
    RECORD["armed"] = False
    t0 = time.perf_counter()
    llm.generate(batch, params, use_tqdm=False)
    t_second = time.perf_counter() - t0
    STATE["compress"] = True                      # stage 2: compress after each prefill
    t0 = time.perf_counter()
    outs_c = llm.generate(batch, params, use_tqdm=False)
    t_compress = time.perf_counter() - t0
    STATE["compress"] = False

    def unpack(o):
        c = o.outputs[0]
        return dict(tokens=list(c.token_ids),
                    logprobs=[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])

    results = [unpack(o) for o in outs]
    for res, o in zip(results, outs_c):
        res["compressed"] = unpack(o)
    core = llm.llm_engine.engine_core.engine_core                # InprocClient -> EngineCore
    runner = core.model_executor.driver_worker.worker.model_runner
    pool = core.scheduler.kv_cache_manager.block_pool
    info = dict(t_init=t_init, t_first=t_first, t_second=t_second, t_compress=t_compress,
                runner=type(runner).__name__, backend=runner.attn_groups[0][0].backend.__name__,
                spec=type(runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec).__name__,
                managers=[type(m).__name__
                          for m in core.scheduler.kv_cache_manager.coordinator.single_type_managers],
                free_blocks=pool.get_num_free_blocks(), num_blocks=pool.num_gpu_blocks)
    del llm
    return results, info


# ----------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", help="build the model in this folder (kept) instead of a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("  ok   " if ok else "  FAIL ") + what)
        if not ok:
            failures.append(what)

    import mixkv  # noqa: F401  (loads torch.ops.mixkv)
    import vllm

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="mixkv-vllm-probe-")
    folder = args.keep or tmp.name
    t0 = time.perf_counter()
    build_model(folder)
    prompts = make_prompts()
    print(f"mixkv vllm probe: vllm {vllm.__version__}, torch {torch.__version__}, model in {folder} "
          f"({time.perf_counter() - t0:.1f} s to build), prompts of {PROMPT_LENGTHS} tokens")

    hf, t_hf = run_hf(folder, prompts)
    install_probe_backend()
    vl, info = run_vllm(folder, prompts)

    print(f"\n[engine] runner {info['runner']}, backend {info['backend']}, spec {info['spec']}, "
          f"scheduler managers {info['managers']}, {RECORD['impls']} probe impls")
    check(info["backend"] == "ProbeBackend" and RECORD["impls"] >= 2,
          "the backend registered in place of CPU_ATTN serves every layer")
    check(info["spec"] == "ProbeSpec" and info["managers"] == ["ProbeManager"],
          "customize_spec's spec subclass reaches the scheduler, with its registered manager")

    print("\n[greedy] vLLM vs Hugging Face")
    worst = 0.0
    for n, h, v in zip(PROMPT_LENGTHS, hf, vl):
        diff = max(abs(a - b) for a, b in zip(h["logprobs"], v["logprobs"]))
        worst = max(worst, diff)
        print(f"  prompt {n:3d}: hf {h['tokens']}\n              vllm {v['tokens']}  "
              f"max |dlogprob| {diff:.2e}  (logprobs {v['logprobs'][0]:.3f} ...)")
        check(h["tokens"] == v["tokens"], f"prompt {n}: greedy tokens equal")
    check(worst < LOGPROB_TOL, f"logprobs within {LOGPROB_TOL} (worst {worst:.2e})")

    print("\n[cache] one layer's K/V read back through each request's block table")
    for (layer, n), rec in sorted(RECORD["prefill"].items()):
        if layer != 1:
            continue
        k_in = rec["key"].transpose(0, 1)                  # forward's key [N, Hkv, D] -> [Hkv, N, D]
        v_in = rec["value"].transpose(0, 1)
        print(f"  layer {layer} prompt {n:3d}: kv_cache {rec['kv_cache_shape']} (isa {rec['isa']}), "
              f"blocks {rec['blocks']}, read K {tuple(rec['k_cache'].shape)} V {tuple(rec['v_cache'].shape)}")
        check(torch.equal(rec["k_cache"], k_in) and torch.equal(rec["v_cache"], v_in),
              f"layer {layer} prompt {n}: cache read-back == the keys/values forward received")
    check(len(RECORD["prefill"]) == 2 * len(PROMPT_LENGTHS), "every layer's prefill of every prompt seen")
    meta = RECORD["decode_meta"]
    if meta:
        slots = meta["slot_mapping"]
        slots = slots if len(slots) <= 8 else slots[:5] + ["..."] + slots[-2:]
        print(f"  first decode step metadata ({meta['type']}): query_start_loc {meta['query_start_loc']}, "
              f"seq_lens {meta['seq_lens']}, slot_mapping {slots}, "
              f"block_table[:, :4] {meta['block_table']}")

    print(f"\n[queries] window W={WINDOW}: vLLM's post-RoPE queries/keys vs HF's, and mixkv's "
          f"selection at budget {BUDGET}")
    for i, n in enumerate(PROMPT_LENGTHS):
        for layer in (0, 1):
            rec = RECORD["prefill"].get((layer, n))
            if rec is None:
                continue
            hq, hk, hv = hf[i]["layers"][layer]
            vq = rec["query"][-WINDOW:].transpose(0, 1)[None]          # [1, Hq, W, D]
            vk, vv = rec["k_cache"][None], rec["v_cache"][None]        # [1, Hkv, N, D]
            dq = (vq - hq).abs().max().item()
            dk = (vk - hk).abs().max().item()
            dv = (vv - hv).abs().max().item()
            line = f"  prompt {n:3d} layer {layer}: |dq| {dq:.1e} |dk| {dk:.1e} |dv| {dv:.1e}"
            ok = max(dq, dk, dv) < 1e-4
            if n > BUDGET:
                kept_h = torch.ops.mixkv.compress(hq, hk, hv, None, BUDGET, WINDOW)[2]
                kept_v = torch.ops.mixkv.compress(vq, vk, vv, None, BUDGET, WINDOW)[2]
                same = torch.equal(kept_h.sort(-1).values, kept_v.sort(-1).values)
                heads_differ = not torch.equal(kept_v[0, 0].sort().values, kept_v[0, 1].sort().values)
                first = kept_v[0, :, : BUDGET - WINDOW].sort(-1).values.tolist()
                line += f"; kept (non-window) per head {first}, same as HF: {same}, heads differ: {heads_differ}"
                ok = ok and same
            print(line)
            check(ok, f"prompt {n} layer {layer}: queries/keys/values match HF"
                  + (" and mixkv keeps the same tokens" if n > BUDGET else ""))

    calls = RECORD["calls"]
    print(f"\n[scheduler] remove_skipped_blocks calls (request, processed tokens, prompt tokens, "
          f"blocks held): {len(calls)} calls, first ones {calls[:6]}")
    after_prefill = [c for c in calls if c[2] is not None and c[1] >= c[2]]
    check(bool(after_prefill), "the manager hears of each request once its prompt is processed "
          "(processed >= prompt length): where leading blocks can be freed")
    check(info["free_blocks"] == info["num_blocks"] - 1,
          f"all blocks back in the pool after the run ({info['free_blocks']} free of "
          f"{info['num_blocks']}, block 0 is the null block)")

    print(f"\n[compress] stage 2: mixkv (budget {BUDGET}, window {WINDOW}) after each prefill in "
          "vLLM (kept tokens in cache indices [s*bs, s*bs+budget), leading blocks freed, shifted "
          "block table / seq_lens, slot mapping moved by g) vs mixkv.patch + HF generate")
    worst = 0.0
    for n, h, v in zip(PROMPT_LENGTHS, hf, vl):
        hp, vc = h["patched"], v["compressed"]
        diff = max(abs(a - b) for a, b in zip(hp["logprobs"], vc["logprobs"]))
        worst = max(worst, diff)
        plan = plan_of(n, BUDGET, BLOCK)
        print(f"  prompt {n:3d} (s, g) = {plan}: hf+patch {hp['tokens']}\n"
              f"              vllm      {vc['tokens']}  max |dlogprob| {diff:.2e}; "
              f"full-cache tokens {'differ' if hp['tokens'] != h['tokens'] else 'same'}")
        check(hp["tokens"] == vc["tokens"], f"prompt {n}: compressed greedy tokens equal mixkv.patch's")
    check(worst < LOGPROB_TOL, f"compressed logprobs within {LOGPROB_TOL} (worst {worst:.2e})")
    expected = sum(plan_of(n, BUDGET, BLOCK)[0] for n in PROMPT_LENGTHS if n > BUDGET)
    freed = sum(f[2] for f in STATE["freed"])
    print(f"  freed leading blocks (request, prompt, blocks, pool free after): {STATE['freed']}")
    check(freed == expected, f"{freed} leading blocks freed after the prefills (expected {expected})")
    check(STATE["written"] == 2 * sum(n > BUDGET for n in PROMPT_LENGTHS),
          "every layer of every compressed prompt written once")

    print(f"\n[time] HF generate x{len(prompts)}: {t_hf:.2f} s; "
          f"vLLM engine start {info['t_init']:.1f} s, first generate {info['t_first']:.2f} s, "
          f"second {info['t_second']:.2f} s, compressed {info['t_compress']:.2f} s "
          f"({len(prompts)} prompts x {MAX_TOKENS} tokens)")
    if tmp is not None:
        tmp.cleanup()
    print("\nmixkv vllm probe: " + ("all checks passed" if not failures else
                                    f"{len(failures)} FAILED: {failures}"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
