"""Patch a Hugging Face decoder model so that each layer's KV cache is compressed after prefill.

Integration by hooks only (no model code is copied), three per patched attention module:
- the attention call, through the query-capture wrapper (``capture.py``): at prefill it stashes
  the window queries and which keys are padding; on a padded compressed layer it passes the
  layer's own decode mask; on a head-wise layer it runs ``torch.ops.mixkv.ragged_attention``;
- a forward pre-hook notes the cache of this call (and the module's input hidden states, for
  scorers that need them);
- a forward hook compresses ``cache.layers[i]`` once the prefill attention has run, through
  the shim's one layer compressor (``compressor.py``): the method (``mixkv.methods``) turns the
  captured :class:`~mixkv.methods.Prefill` into kept K/V, installed as a
  :class:`CompressedLayer` or a :class:`HeadwiseLayer` (``layers.py``).
Prefill is "the layer holds exactly this call's tokens"; ``cache_position`` is never read.
This file also holds the refusals (caches and generate options that cannot be compressed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..methods import Method, resolve
from . import capture, reconstruct
from .compressor import LayerCompressor, LayerInput
from .layers import CompressedLayer, HeadwiseLayer
from .model import (OLDEST_TRANSFORMERS, attention_scaling, cache_of,  # noqa: F401 (re-exported)
                    check_transformers_version, find_attention_modules, hidden_states_of,
                    layer_of, sliding_layers, warn_from_caller)

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
        self.hidden = None        # [B, N, hidden] the module's input, if the method needs it

    def attend(self, function, module, query, key, value, attention_mask, *args, **kwargs):
        """The attention call of this module (the capture wrapper's interceptor)."""
        if self.handle.decoding is not None:  # compression during generation (decode.py)
            self.handle.decoding.observe(self, query, key, attention_mask)
        layer = layer_of(self.cache, self.layer_idx)
        if isinstance(layer, HeadwiseLayer):
            if kwargs.get("softcap") is not None:
                raise NotImplementedError("mixkv: head-wise budgets do not support attention "
                                          "logit soft-capping; use base='snapkv'")
            return layer.attend(query, attention_scaling(module, kwargs))
        if capture.is_prefill(query, key):
            W = min(self.handle.method.window, query.shape[-2])
            self.q_window = query[..., -W:, :]
            self.key_mask = capture.real_keys(attention_mask, key.shape[0], key.shape[-2])
        elif isinstance(layer, CompressedLayer) and layer.kept_real is not None:
            eager = getattr(module.config, "_attn_implementation", None) == "eager"
            attention_mask = layer.decode_mask(query, key, query.dtype if eager else None)
        return function(module, query, key, value, attention_mask, *args, **kwargs)


class MixKVPatch:
    """Handle returned by :func:`patch`: a context manager; ``unpatch()``; ``stats()``."""

    def __init__(self, model: nn.Module, method: Method):
        self.model, self.method = model, method
        self.decoding = None  # a DecodeCompression (decode.py) when decode_budget is set
        self.decoder, self.modules = find_attention_modules(model)
        config = self.decoder.config
        self.num_layers = len(self.modules)
        self.sliding_layers = sliding_layers(config, self.num_layers)
        if self.sliding_layers:
            warn_from_caller(f"mixkv: {len(self.sliding_layers)} of {self.num_layers} layers "
                              "use sliding-window attention and stay uncompressed")
        if method.headwise and getattr(config, "attn_logit_softcapping", None):
            raise NotImplementedError(
                f"mixkv: {type(model).__name__} soft-caps attention logits, which the head-wise "
                "cache's attention does not do; use a uniform budget (base='snapkv')")
        self._check_generation_config(getattr(model, "generation_config", None))
        self.compressor = LayerCompressor(method, self.decoder, self.num_layers)
        self._hooks = []
        self._states = {}
        self._original_generate = None
        # Scores from a reconstruction pass (KVzip), or one budget over every layer (global):
        # compress after the whole prefill forward.
        self._deferred = reconstruct.DeferredCompression(self) if method.deferred else None
        try:
            for module in self.modules:
                state = _LayerState(self, module.layer_idx)
                capture.intercept(module, state.attend)
                self._states[module] = state
        except RuntimeError:
            self.unpatch()
            raise
        for module in self.modules:
            self._hooks.append(module.register_forward_pre_hook(self._before_attention,
                                                                with_kwargs=True))
            self._hooks.append(module.register_forward_hook(self._after_attention,
                                                            with_kwargs=True))
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
        if self.decoding is not None:
            self.decoding.check_generate(self.model, kwargs)
        return self._original_generate(*args, **kwargs)

    # -- hooks -------------------------------------------------------------------------------
    def _before_attention(self, module, args, kwargs):
        state = self._states[module]
        state.cache = cache_of(kwargs)
        state.q_window = state.key_mask = None
        if self.method.needs_hidden_states:
            state.hidden = hidden_states_of(args, kwargs)
        if state.cache is not None and getattr(state.cache, "offloading", False):
            raise NotImplementedError("mixkv: offloaded caches cannot be compressed")

    def _after_attention(self, module, args, kwargs, output):
        state = self._states[module]
        q_window, key_mask, cache, hidden = state.q_window, state.key_mask, state.cache, \
            state.hidden
        state.q_window = state.key_mask = state.cache = state.hidden = None
        if cache is None or self.method.scorer is None:
            return
        if self.decoding is not None and self.decoding.after_attention(module, cache,
                                                                       state.layer_idx, hidden):
            return
        if not self.compressible(cache, state.layer_idx):
            return
        tokens = hidden_states_of(args, kwargs).shape[1]
        if q_window is None or layer_of(cache, state.layer_idx).keys.shape[-2] != tokens:
            return  # not a prefill: the layer held tokens before this call
        item = LayerInput(module, cache, q_window, key_mask, hidden)
        if self._deferred is not None:
            self._deferred.hold(item)
            return
        with torch.no_grad():
            self.compressor.compress([item])

    def compressible(self, cache, idx: int) -> bool:
        """Whether layer `idx` of `cache` is one the shim compresses: False for sliding-window
        and already compressed layers; a clear error for caches it cannot shrink."""
        layer = layer_of(cache, idx)
        if isinstance(layer, (DynamicSlidingWindowLayer, HeadwiseLayer, CompressedLayer)) or \
                getattr(layer, "is_sliding", False):
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

    # -- public ------------------------------------------------------------------------------
    def compress_cache(self, cache, window_queries: dict, key_mask=None,
                       hidden_states: Optional[dict] = None, *, context_ids=None,
                       positions=None, encode=None, reconstruction: Optional[dict] = None,
                       tokenizer=None) -> None:
        """Compress a full prefill ``cache`` in place, as the patched forward would have.

        ``window_queries`` maps each decoder layer index to that layer's post-RoPE queries
        [B, Hq, >= W, D] (their last W are used); ``key_mask`` [B, N] marks real tokens;
        ``hidden_states`` maps each layer to its attention module's input [B, N, hidden]
        (needed by methods whose scorers read them, see ``capture.capture_prefill``). This
        lets one prefill serve many methods and budgets (the evaluation harness does this):
        compress a copy of the full cache per method. Layers the shim leaves alone
        (sliding-window, already compressed) stay as they are. Methods with a reconstruction
        pass (kvzip) need the context's ``context_ids`` [B, N] (``positions``: the prefill's
        position ids; ``encode``: text -> ids for a text repeat prompt; ``tokenizer``: a
        Hugging Face tokenizer for the chat template, when the scorer has none), or its
        per-layer scores as ``reconstruction`` (``reconstruct.scores_for``). Under a policy
        that splits one budget over every layer (global) the layers are compressed
        together."""
        if self.method.needs_reconstruction and reconstruction is None:
            if context_ids is None:
                raise ValueError(f"mixkv: method {self.method.label!r} re-reads the context: "
                                 "pass context_ids= (or reconstruction=) to compress_cache")
            reconstruction = reconstruct.scores_for(self, cache, input_ids=context_ids,
                                                    key_mask=key_mask, positions=positions,
                                                    encode=encode, tokenizer=tokenizer)
        items = []
        for module in self.modules:
            idx = module.layer_idx
            if not self.compressible(cache, idx):
                continue
            if idx not in window_queries:
                raise KeyError(f"mixkv: compress_cache got no window queries for layer {idx}")
            items.append(LayerInput(module, cache, window_queries[idx], key_mask,
                                    (hidden_states or {}).get(idx),
                                    (reconstruction or {}).get(idx)))
        with torch.no_grad():
            self.compressor.compress(items)
        if self.decoding is not None:  # decoding goes on from these queries (decode.py)
            self.decoding.start(window_queries)

    def stats(self) -> dict:
        """The last compression: per layer kept tokens [B, Hkv] and K/V bytes before/after;
        totals under "total"."""
        return self.compressor.stats()

    def unpatch(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._deferred is not None:
            self._deferred.remove()
        for module in self._states:
            capture.release(module)
        self._states.clear()
        if self._original_generate is not None:
            del self.model.generate  # the instance attribute; the class method shows again
            self._original_generate = None
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


def patch(model: nn.Module, method="mixkv", *, decode_budget: Optional[int] = None,
          interval: Optional[int] = None, **options) -> MixKVPatch:
    """Compress the KV cache of `model` after every prefill with `method`.

    `method` is a name ("mixkv", "mixkv+adakv", "tova+pyramidkv", "mixkv(tova)", ...) or an
    object (``MixKV(AdaKV(SnapKV()))``), see :mod:`mixkv.methods`; a :class:`Method` that
    ``mixkv.methods.resolve`` returned is taken as is and takes no options. ``budget`` counts
    the tokens kept per KV head, window included (or ``ratio``: fraction of the prompt removed);
    ``window`` (32); ``base`` picks how many tokens each head keeps: "snapkv" (uniform),
    "pyramidkv", "adakv" or "explicit" (``profile`` [L, Hkv] weights); the other options go to
    the method's parts (``redundancy``: "online" or an [L, Hkv] profile for MixKV; ``sinks``,
    ``seed``, ``pool_kernel``, ``floor_alpha``, ...). Returns a handle that is also a context
    manager; ``mixkv.unpatch(model)`` restores the model exactly.

    ``decode_budget`` (tokens per KV head, window included) also compresses during generation:
    every ``interval`` decoded tokens (64) each layer is cut back to ``decode_budget``, scored
    with the latest ``window`` queries (``hf/decode.py``); without ``budget`` / ``ratio`` the
    prefill keeps ``decode_budget`` as well.
    """
    check_transformers_version()
    if isinstance(method, Method) and options:
        # A resolved Method is taken as is (budget, window and parts fixed by resolve): its
        # options would silently not apply. decode_budget / interval do apply to it.
        given = ", ".join(f"{key}={value!r}" for key, value in options.items())
        raise ValueError(f"mixkv.patch: method is an already resolved Method (label "
                         f"{method.label!r}); the options {given} would be ignored: give them "
                         "to mixkv.methods.resolve() or pass the method by name or as a "
                         "Scorer/BudgetPolicy object")
    decoding = None
    if decode_budget is None and interval is None:
        resolved = method if isinstance(method, Method) else resolve(method, **options)
    else:  # compression during generation
        from .decode import DecodeCompression

        resolved, decoding = DecodeCompression.resolve(method, decode_budget, interval, options)
    handle = MixKVPatch(model, resolved)
    if decoding is not None:
        decoding.handle, handle.decoding = handle, decoding
        handle.compressor.listener = decoding
    model._mixkv_patch = handle
    return handle


def unpatch(model: nn.Module) -> None:
    """Remove mixkv's hooks from `model` (no-op if it is not patched)."""
    handle = getattr(model, "_mixkv_patch", None)
    if handle is not None:
        handle.unpatch()
