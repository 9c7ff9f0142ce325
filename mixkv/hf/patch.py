"""Patch a Hugging Face decoder model so that each layer's KV cache is compressed after prefill.

Integration by hooks only (no model code is copied):
- every model's attention module asks ``ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)`` for
  its attention function at each call; one wrapper around that lookup sees the final queries
  (post-RoPE, post-q_norm, post-mrope) and the cache's K/V of every layer, whatever the
  implementation (sdpa, eager, ...). At prefill it stashes the window queries and which keys are
  padding; on a compressed padded layer it rebuilds the mask; on a head-wise layer it runs
  ``torch.ops.mixkv.ragged_attention`` instead.
- a forward pre-hook on each decoder attention module notes the cache of this call, and a forward
  hook compresses ``cache.layers[i]`` once the prefill attention has run.
Prefill is "the layer holds exactly this call's tokens"; ``cache_position`` is never read.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
import weakref
from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..methods import PLAIN_SCORES, Method, resolve
from .headwise import HeadwiseLayer

# Patched attention module -> its _LayerState; the lookup wrapper is installed while any exists.
_PATCHED: "weakref.WeakKeyDictionary[nn.Module, _LayerState]" = weakref.WeakKeyDictionary()
_WRAPPED: dict = {}
# The oldest transformers the shim is tested with (scripts/transformers_test.sh in CI; the
# newest runs in the main suite). README "Supported versions".
OLDEST_TRANSFORMERS = (5, 3)
_REFUSED_CACHE_IMPLEMENTATIONS = ("static", "offloaded", "offloaded_static", "quantized",
                                  "sliding_window", "hybrid", "mamba", "paged")


class _LayerState:
    """What one patched attention module carries between its hooks and the attention call."""

    def __init__(self, handle: "MixKVPatch", layer_idx: int):
        self.handle = handle
        self.layer_idx = layer_idx
        self.cache = None         # the Cache of the current call (set by the pre-hook)
        self.q_window = None      # [B, Hq, W, D] window queries at prefill
        self.key_mask = None      # [B, N] bool real tokens at prefill (None: no padding)


def _real_keys(attention_mask, batch: int, length: int) -> Optional[torch.Tensor]:
    """Which of the prefill's keys are real, read off the mask row of the last query (which
    sees every real key under a causal, left-padded mask). None when nothing is padding."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(
            f"mixkv: attention masks of type {type(attention_mask).__name__} are not supported; "
            "use attn_implementation='sdpa' or 'eager'")
    if attention_mask.dim() == 2:
        row = attention_mask[:, -length:].bool()
    else:
        row = attention_mask[:, 0, -1, -length:]
        if row.dtype != torch.bool:
            row = row > torch.finfo(row.dtype).min / 2
    row = row.expand(batch, length)
    return None if bool(row.all()) else row


def _decode_mask(kept_real: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 additive_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Mask [B, 1, q, kv] for a compressed, padded layer: kept real tokens plus the causal
    appended ones (bool for sdpa, additive in `additive_dtype` for eager)."""
    B, q, kv = query.shape[0], query.shape[-2], key.shape[-2]
    kept = kept_real.shape[1]
    real = torch.cat([kept_real, kept_real.new_ones(B, kv - kept)], dim=1)
    position = torch.arange(kv, device=key.device)
    causal = position[None, :] <= (kv - q + torch.arange(q, device=key.device))[:, None]
    allowed = real[:, None, None, :] & causal[None, None]
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=key.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


def _wrap(attention_fn):
    """The attention function wrapper handed to patched modules (cached per function)."""
    if attention_fn in _WRAPPED:
        return _WRAPPED[attention_fn]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        state = _PATCHED.get(module)
        if state is None:
            return attention_fn(module, query, key, value, attention_mask, *args, **kwargs)
        layer = state.handle._layer(state.cache, state.layer_idx)
        if isinstance(layer, HeadwiseLayer):
            if kwargs.get("softcap") is not None:
                raise NotImplementedError("mixkv: head-wise budgets do not support attention "
                                          "logit soft-capping; use base='snapkv'")
            return layer.attend(query, kwargs.get("scaling", getattr(module, "scaling", None)))
        if query.shape[-2] == key.shape[-2]:  # prefill: this call's keys are the whole cache
            W = min(state.handle.method.window, query.shape[-2])
            state.q_window = query[..., -W:, :]
            state.key_mask = _real_keys(attention_mask, key.shape[0], key.shape[-2])
        else:
            kept_real = getattr(state.cache, "_mixkv_kept_real", {}).get(state.layer_idx)
            if kept_real is not None:
                eager = getattr(module.config, "_attn_implementation", None) == "eager"
                attention_mask = _decode_mask(kept_real, query, key, query.dtype if eager else None)
        return attention_fn(module, query, key, value, attention_mask, *args, **kwargs)

    _WRAPPED[attention_fn] = attention
    return attention


def _install_lookup_wrapper():
    if "get_interface" in vars(ALL_ATTENTION_FUNCTIONS):
        return
    original = ALL_ATTENTION_FUNCTIONS.get_interface

    def get_interface(attn_implementation, default):
        return _wrap(original(attn_implementation, default))

    ALL_ATTENTION_FUNCTIONS.get_interface = get_interface


def _remove_lookup_wrapper():
    if len(_PATCHED) == 0 and "get_interface" in vars(ALL_ATTENTION_FUNCTIONS):
        del ALL_ATTENTION_FUNCTIONS.get_interface
        _WRAPPED.clear()


def _caller_stacklevel() -> int:
    """warnings.warn stacklevel of the first frame outside the mixkv package."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _cache_of(kwargs):
    # transformers >= 5.2x passes the cache as `cache`, earlier 5.x as `past_key_values`.
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def find_attention_modules(model: nn.Module):
    """The decoder's self-attention modules, in layer order (clear error if there are none)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    modules = [getattr(layer, "self_attn", None) for layer in (layers or [])]
    if not modules or any(m is None or not hasattr(m, "layer_idx") for m in modules):
        raise NotImplementedError(
            f"mixkv: {type(model).__name__} is not a supported architecture: mixkv needs a "
            "decoder (model.get_decoder()) whose layers have a `self_attn` module with a "
            "`layer_idx` (Llama, Mistral, Qwen2/3, Gemma, Qwen2-VL, LLaVA language models)")
    return decoder, modules


class MixKVPatch:
    """Handle returned by :func:`patch`: a context manager; ``unpatch()``; ``stats()``."""

    def __init__(self, model: nn.Module, method: Method):
        self.model, self.method = model, method
        decoder, self.modules = find_attention_modules(model)
        config = decoder.config
        self.num_layers = len(self.modules)
        layer_types = getattr(config, "layer_types", None) or []
        self.sliding_layers = sorted(i for i, t in enumerate(layer_types) if "sliding" in str(t))
        if getattr(config, "sliding_window", None) and not layer_types:
            self.sliding_layers = list(range(self.num_layers))
        if self.sliding_layers:
            warnings.warn(f"mixkv: {len(self.sliding_layers)} of {self.num_layers} layers use "
                          "sliding-window attention and stay uncompressed",
                          stacklevel=_caller_stacklevel())
        if method.headwise and getattr(config, "attn_logit_softcapping", None):
            raise NotImplementedError(
                f"mixkv: {type(model).__name__} soft-caps attention logits, which the head-wise "
                "cache's attention does not do; use a uniform budget (base='snapkv')")
        self._check_generation_config(getattr(model, "generation_config", None))
        self._stats: dict = {}
        self._hooks = []
        for module in self.modules:
            if module in _PATCHED:
                raise RuntimeError("mixkv: this model is already patched; unpatch it first")
        _install_lookup_wrapper()
        for module in self.modules:
            _PATCHED[module] = _LayerState(self, module.layer_idx)
            self._hooks.append(module.register_forward_pre_hook(self._before_attention,
                                                                with_kwargs=True))
            self._hooks.append(module.register_forward_hook(self._after_attention,
                                                            with_kwargs=True))
        self._original_generate = None
        if hasattr(model, "generate"):
            self._original_generate = model.generate
            model.generate = self._generate

    # -- refusals ----------------------------------------------------------------------------
    @staticmethod
    def _check_generation_config(config):
        if config is None:
            return
        implementation = getattr(config, "cache_implementation", None)
        if implementation in _REFUSED_CACHE_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"mixkv: cache_implementation={implementation!r} cannot be compressed (only the "
                "default dynamic cache can); unset it")
        if getattr(config, "prefill_chunk_size", None):
            raise NotImplementedError("mixkv: chunked prefill (prefill_chunk_size) is not "
                                      "supported: compression needs the whole prompt at once")

    def _generate(self, *args, **kwargs):
        self._check_generation_config(kwargs.get("generation_config"))
        self._check_generation_config(_KwargsView(kwargs))
        return self._original_generate(*args, **kwargs)

    # -- hooks -------------------------------------------------------------------------------
    def _before_attention(self, module, args, kwargs):
        state = _PATCHED[module]
        state.cache = _cache_of(kwargs)
        state.q_window = state.key_mask = None
        if state.cache is not None and getattr(state.cache, "offloading", False):
            raise NotImplementedError("mixkv: offloaded caches cannot be compressed")

    @staticmethod
    def _layer(cache, layer_idx: int):
        layers = getattr(cache, "layers", None)
        return layers[layer_idx] if layers is not None and layer_idx < len(layers) else None

    def _after_attention(self, module, args, kwargs, output):
        state = _PATCHED[module]
        q_window, key_mask, cache = state.q_window, state.key_mask, state.cache
        state.q_window = state.key_mask = state.cache = None
        if cache is None or self.method.name == "full":
            return
        layer = self._layer(cache, state.layer_idx)
        if not self.compressible(cache, state.layer_idx):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if q_window is None or layer.keys.shape[-2] != hidden.shape[1]:
            return  # not a prefill: the layer held tokens before this call
        with torch.no_grad():
            self._compress(module, cache, state.layer_idx, layer, q_window, key_mask)

    def compressible(self, cache, idx: int) -> bool:
        """Whether layer `idx` of `cache` is one the shim compresses: False for sliding-window
        and already head-wise layers; a clear error for caches it cannot shrink."""
        layer = self._layer(cache, idx)
        if isinstance(layer, (DynamicSlidingWindowLayer, HeadwiseLayer)) or getattr(layer, "is_sliding", False):
            return False
        if idx in self.sliding_layers:
            if type(layer) is DynamicLayer:  # a DynamicCache() built without the model's config
                raise NotImplementedError(
                    f"mixkv: layer {idx} uses sliding-window attention but the cache "
                    "holds it as a plain DynamicLayer; build the cache as "
                    "DynamicCache(config=model.config) (generate does)")
            return False
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(
                f"mixkv: cannot compress a {type(cache).__name__} with {type(layer).__name__} "
                "layers; static, quantized and offloaded caches are not supported (use the "
                "default DynamicCache)")
        return True

    # -- compression -------------------------------------------------------------------------
    def _compress(self, module, cache, idx, layer, q_window, key_mask):
        m = self.method
        keys, values = layer.keys, layer.values
        B, Hkv, N, D = keys.shape
        budget = m.budget_for(N)
        before = keys.nbytes + values.nbytes
        if N <= budget:  # nothing to remove: the cache stays as it is, bit for bit
            self._stats[idx] = dict(kept=torch.full((B, Hkv), N), bytes_before=before,
                                    bytes_after=before, prompt=N)
            return
        if key_mask is not None:
            key_mask = key_mask.to(keys.device)
        W = m.window
        if m.name in PLAIN_SCORES:
            scores = self._plain_scores(keys, key_mask, W, idx)
            kept_k, kept_v, kept_pos = torch.ops.mixkv.select_kv(scores, keys, values, budget - W,
                                                                 W, key_mask)
        else:
            redundancy = None
            if m.redundancy is not None:
                if m.redundancy.shape != (self.num_layers, Hkv):
                    raise ValueError(f"mixkv: redundancy profile has shape "
                                     f"{tuple(m.redundancy.shape)}, the model needs "
                                     f"[{self.num_layers}, {Hkv}]")
                redundancy = m.redundancy[idx].to(keys.device).expand(B, Hkv)
            scaling = getattr(module, "scaling", None)
            common = (q_window.to(keys.device), keys, values, key_mask, budget, W, m.mode,
                      redundancy, m.pool_kernel, m.pooling, m.gqa_reduce,
                      None if scaling is None else float(scaling))
            if m.headwise:
                profile = None if m.profile is None else m.profile.to(keys.device)
                if profile is not None and profile.shape != (self.num_layers, Hkv):
                    raise ValueError(f"mixkv: capacity profile has shape {tuple(profile.shape)}, "
                                     f"the model needs [{self.num_layers}, {Hkv}]")
                flat_k, flat_v, positions, offsets = torch.ops.mixkv.compress_ragged(
                    *common, m.policy, m.floor_alpha, True, idx, self.num_layers,
                    m.pyramid_beta, profile)
                valid = torch.ones_like(positions, dtype=torch.bool)
                if key_mask is not None:
                    row = torch.repeat_interleave(
                        torch.arange(B, device=keys.device).repeat_interleave(Hkv),
                        offsets.diff().long())
                    valid = key_mask[row, positions.long()]
                cache.layers[idx] = HeadwiseLayer(flat_k, flat_v, offsets, valid, B, Hkv)
                self._stats[idx] = dict(kept=offsets.diff().view(B, Hkv).cpu(),
                                        bytes_before=before,
                                        bytes_after=flat_k.nbytes + flat_v.nbytes, prompt=N)
                return
            kept_k, kept_v, kept_pos = torch.ops.mixkv.compress(*common)
        layer.keys, layer.values = kept_k, kept_v
        if key_mask is not None:  # same for every head: padded slots come first in each row
            if not hasattr(cache, "_mixkv_kept_real"):
                cache._mixkv_kept_real = {}
            cache._mixkv_kept_real[idx] = key_mask.gather(1, kept_pos[:, 0].long())
        self._stats[idx] = dict(kept=torch.full((B, Hkv), kept_k.shape[-2]), bytes_before=before,
                                bytes_after=kept_k.nbytes + kept_v.nbytes, prompt=N)

    def _plain_scores(self, keys, key_mask, W, idx):
        """Scores of the methods that need no queries: higher is kept."""
        m = self.method
        B, Hkv, N, _ = keys.shape
        C = N - W
        if m.name == "knorm":  # low key norm ~ high attention (Devoto et al., 2024)
            return -keys[:, :, :C].float().norm(dim=-1)
        if m.name == "random":
            g = torch.Generator().manual_seed(m.seed * 100003 + idx)
            return torch.rand(B, Hkv, C, generator=g).to(keys.device)
        # streamingllm: the first `sinks` real tokens, then the most recent ones
        pads = torch.zeros(B, 1, device=keys.device) if key_mask is None else \
            (~key_mask[:, :C]).sum(-1, keepdim=True).float()
        relative = torch.arange(C, device=keys.device)[None, :] - pads
        scores = torch.where(relative < m.sinks, 2.0, relative / max(C, 1))
        return scores[:, None, :].expand(B, Hkv, C).contiguous()

    # -- public ------------------------------------------------------------------------------
    def compress_cache(self, cache, window_queries: dict, key_mask=None) -> None:
        """Compress a full prefill ``cache`` in place, as the patched forward would have.

        ``window_queries`` maps each decoder layer index to that layer's post-RoPE queries
        [B, Hq, >= W, D] (their last W are used); ``key_mask`` [B, N] marks real tokens. This
        lets one prefill serve many methods and budgets (the evaluation harness does this):
        compress a copy of the full cache per method. Layers the shim leaves alone
        (sliding-window, already compressed) stay as they are."""
        for module in self.modules:
            idx = module.layer_idx
            if not self.compressible(cache, idx):
                continue
            if idx not in window_queries:
                raise KeyError(f"mixkv: compress_cache got no window queries for layer {idx}")
            layer = cache.layers[idx]
            W = min(self.method.window, layer.keys.shape[-2])
            with torch.no_grad():
                self._compress(module, cache, idx, layer, window_queries[idx][..., -W:, :],
                               key_mask)

    def stats(self) -> dict:
        """The last compression: per layer kept tokens [B, Hkv] and K/V bytes before/after;
        totals under "total"."""
        layers = {i: dict(s) for i, s in sorted(self._stats.items())}
        before = sum(s["bytes_before"] for s in layers.values())
        after = sum(s["bytes_after"] for s in layers.values())
        return dict(layers=layers, total=dict(bytes_before=before, bytes_after=after,
                                              ratio=after / before if before else 1.0))

    def unpatch(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module in self.modules:
            _PATCHED.pop(module, None)
        if self._original_generate is not None:
            del self.model.generate  # the instance attribute; the class method shows again
            self._original_generate = None
        _remove_lookup_wrapper()
        if getattr(self.model, "_mixkv_patch", None) is self:
            del self.model._mixkv_patch

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False


class _KwargsView:
    """generate(**kwargs) options seen as a generation config."""

    def __init__(self, kwargs):
        self.cache_implementation = kwargs.get("cache_implementation")
        self.prefill_chunk_size = kwargs.get("prefill_chunk_size")


def _version_tuple(version: str):
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_transformers_version(version: Optional[str] = None) -> bool:
    """Warn (once per call site) when transformers is older than the oldest the shim supports;
    True when the version is supported."""
    if version is None:
        import transformers

        version = transformers.__version__
    if _version_tuple(version) >= OLDEST_TRANSFORMERS:
        return True
    oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
    warnings.warn(f"mixkv: transformers {version} is older than {oldest}, the oldest the shim "
                  "supports (README 'Supported versions'); with kvpress, whose transformers is "
                  "older, use mixkv.kvpress's presses",
                  stacklevel=_caller_stacklevel())
    return False


def patch(model: nn.Module, method: str = "mixkv", *, budget: Optional[int] = None,
          ratio: Optional[float] = None, window: int = 32, pool_kernel: int = 5,
          pooling: str = "avg", gqa_reduce: str = "mean", base: str = "snapkv",
          redundancy="online", profile=None, floor_alpha: float = 0.2, pyramid_beta: int = 20,
          sinks: int = 4, seed: int = 0) -> MixKVPatch:
    """Compress the KV cache of `model` after every prefill with `method`.

    ``budget`` counts the tokens kept per KV head, window included (or ``ratio``: fraction of the
    prompt removed). ``base`` picks how many tokens each head keeps for mixkv/vnorm/keydiff/mix3:
    "snapkv" (uniform), "pyramidkv", "adakv" or "explicit" (``profile`` [L, Hkv] weights).
    ``redundancy`` is "online" or an [L, Hkv] profile (tensor or torch.save file). Returns a
    handle that is also a context manager; ``mixkv.unpatch(model)`` restores the model exactly.
    """
    check_transformers_version()
    resolved = resolve(method, budget=budget, ratio=ratio, window=window,
                       pool_kernel=pool_kernel, pooling=pooling, gqa_reduce=gqa_reduce,
                       base=base, redundancy=redundancy, profile=profile,
                       floor_alpha=floor_alpha, pyramid_beta=pyramid_beta, sinks=sinks, seed=seed)
    handle = MixKVPatch(model, resolved)
    model._mixkv_patch = handle
    return handle


def unpatch(model: nn.Module) -> None:
    """Remove mixkv's hooks from `model` (no-op if it is not patched)."""
    handle = getattr(model, "_mixkv_patch", None)
    if handle is not None:
        handle.unpatch()
