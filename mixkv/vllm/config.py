"""The plugin's settings and the rules both sides of the engine share; no vLLM import here.

``additional_config={"mixkv": {"method": ..., "budget": ..., "window": ..., **options}}`` is
parsed by :meth:`MixKVConfig.from_additional` with ``mixkv.methods.resolve`` (the vocabulary
of ``mixkv.patch``). :func:`plan` is the one rule the scheduler (which leading blocks to free)
and the workers (where the kept tokens go) both apply, so no message crosses the process
boundary (docs/vllm-plugin.md sections 7-9).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Optional, Tuple

from ..methods import Method, resolve

KEY = "mixkv"                      # the additional_config key the plugin answers to
_SETTING = 'additional_config["mixkv"]'
# mixkv.patch options that need a cache the block layout cannot express (yet).
_DECODE_OPTIONS = ("decode_budget", "interval")


@functools.lru_cache(maxsize=4096)   # asked per request and layer at every prefill step
def kept_tokens(num_prompt: int, budget: Optional[int], ratio: Optional[float],
                window: int) -> int:
    """Tokens each head keeps of a prompt: Method.budget_for, from numbers alone (the
    scheduler's process may not know user-registered scorers)."""
    return Method(scorer=None, policy=None, budget=budget, ratio=ratio,
                  window=window).budget_for(num_prompt)


def plan(num_prompt: int, kept: int, block_size: int) -> Optional[Tuple[int, int]]:
    """None (nothing to drop) or ``(s, g)``: of ``d = N - kept`` dropped tokens, the first
    ``s = d // block_size`` blocks are freed; the kept tokens fill cache indices
    ``[s*bs, s*bs + kept)`` and every later position p is cached at ``p - g``, ``g = d - s*bs``.
    Block-aligned because the CPU kernel reads a request from slot 0 of its first block."""
    if num_prompt <= kept:
        return None
    drop = num_prompt - kept
    s = drop // block_size
    return s, drop - s * block_size


@dataclasses.dataclass(frozen=True)
class MixKVConfig:
    method: Method
    raw: Dict[str, Any]            # the setting as given (JSON: it is part of vLLM's config hash)

    @property
    def budget(self) -> Optional[int]:
        return self.method.budget

    @property
    def ratio(self) -> Optional[float]:
        return self.method.ratio

    @property
    def window(self) -> int:
        return self.method.window

    def kept(self, num_prompt: int) -> int:
        return kept_tokens(num_prompt, self.budget, self.ratio, self.window)

    @classmethod
    def from_additional(cls, additional_config) -> Optional["MixKVConfig"]:
        """The parsed setting, or None when the engine does not ask for mixkv (the plugin is
        then inert). Errors name the setting."""
        if not isinstance(additional_config, dict) or additional_config.get(KEY) is None:
            return None
        raw = additional_config[KEY]
        if not isinstance(raw, dict):
            raise ValueError(f"mixkv: {_SETTING} must be a dict such as "
                             '{"method": "mixkv", "budget": 256, "window": 32}, got '
                             f"{raw!r}")
        options = dict(raw)
        name = options.pop("method", "mixkv")
        if not isinstance(name, str):
            raise ValueError(f"mixkv: {_SETTING}['method'] must be a method name (it goes into "
                             f"vLLM's JSON config hash), got {type(name).__name__}; register a "
                             "custom scorer with mixkv.methods.register_scorer and give its name")
        for key in _DECODE_OPTIONS:
            if key in options:
                raise ValueError(f"mixkv: {_SETTING}['{key}'] (compression during decoding) is "
                                 "not supported by the vLLM plugin; it compresses each prompt "
                                 "once, after its prefill")
        try:
            method = resolve(name, **options)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"mixkv: {_SETTING} = {raw!r}: {exc}") from exc
        if method.scorer is None:
            raise ValueError(f"mixkv: {_SETTING}['method'] = {name!r} does not compress; leave "
                             f"{_SETTING} unset to run vLLM unchanged")
        if method.headwise:
            raise ValueError(
                f"mixkv: {_SETTING}['method'] = {method.label!r} gives KV heads different "
                f"budgets (policy {method.policy.label!r}); the vLLM plugin supports uniform "
                "budgets only (one block table per request holds one length for every head)")
        if method.needs_hidden_states:
            raise ValueError(f"mixkv: {_SETTING}['method'] = {method.label!r} scores from the "
                             "layers' hidden states, which vLLM's attention backend does not see")
        if method.needs_reconstruction:
            raise ValueError(f"mixkv: {_SETTING}['method'] = {method.label!r} re-reads the "
                             "context (a reconstruction pass), which the vLLM plugin cannot run")
        return cls(method=method, raw=raw)


def refusal(vllm_config, *, cuda: bool = False) -> Optional[str]:
    """Why an engine with mixkv configured cannot run (None: it can). Reads public config
    fields only; each message names the setting to change. ``cuda``: the engine runs on a
    CUDA platform (FlashAttention through the V1 model runner, unverified: section 14)."""
    cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
    parallel, model = vllm_config.parallel_config, vllm_config.model_config
    checks = [
        (cache.enable_prefix_caching,
         "prefix caching shares and hashes blocks that compression overwrites: set "
         "enable_prefix_caching=False"),
        (sched.enable_chunked_prefill,
         "a prompt must be prefilled in one step to be compressed: set "
         "enable_chunked_prefill=False"),
        (sched.long_prefill_token_threshold > 0,
         "long_prefill_token_threshold > 0 chunks prompts: leave it at 0"),
        (vllm_config.speculative_config is not None,
         "speculative decoding (speculative_config) is not supported"),
        (cache.cache_dtype != "auto",
         f"kv_cache_dtype={cache.cache_dtype!r} is not supported: use 'auto'"),
        (vllm_config.kv_transfer_config is not None,
         "kv_transfer_config (a KV connector) is not supported"),
        # Tensor parallelism needs nothing: each rank compresses its own KV heads by the
        # same plan, and uniform budgets need no score from another rank.
        (parallel.pipeline_parallel_size > 1
         or getattr(parallel, "decode_context_parallel_size", 1) > 1,
         "pipeline and decode-context parallelism are not supported yet"),
        (model is not None and model.get_sliding_window() is not None,
         "models with sliding-window layers are not supported"),
    ]
    if cuda:
        graphs = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
        checks += [
            (vllm_config.use_v2_model_runner,
             "the V2 model runner is not supported: set VLLM_USE_V2_MODEL_RUNNER=0"),
            # Full CUDA graphs replay the block table and sequence lengths captured in the
            # runner's buffers; the plugin shifts copies of them (piecewise graphs are fine).
            (graphs is not None and graphs.has_full_cudagraphs(),
             "full CUDA graphs are not supported: set enforce_eager=True or "
             "compilation_config={'cudagraph_mode': 'PIECEWISE'}"),
        ]
    reasons = [why for bad, why in checks if bad]
    if not reasons:
        return None
    return (f"mixkv: {_SETTING} is set, but " + "; ".join(reasons)
            + " (docs/vllm-plugin.md section 10)")
