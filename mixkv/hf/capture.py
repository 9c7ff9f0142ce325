"""Query capture: the one wrapper around transformers' attention-function lookup.

Every supported model asks ``ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_fn)`` for its
attention function at each call, then calls it with the final queries (post-RoPE, post-q_norm,
post-mrope) and the cache's K/V. While any module is *intercepted*, the lookup is replaced
(an instance attribute, removed when the last interception ends) by one that wraps whatever
it returns: a call from an intercepted module goes to that module's interceptor
``interceptor(attention_fn, module, query, key, value, attention_mask, *args, **kwargs)``,
every other call to the plain function. The shim (``hf/patch.py``) and the evaluation
engine's :func:`capture_prefill` are its two users; :func:`intercepting` lets a pass over a
patched model (the reconstruction pass, ``hf/reconstruct.py``) see the calls first for a while.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Callable, Dict, Optional

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .model import find_attention_modules, hidden_states_of  # noqa: F401 (re-exported)

_INTERCEPTORS: "weakref.WeakKeyDictionary[nn.Module, Callable]" = weakref.WeakKeyDictionary()
_WRAPPED: dict = {}


def _wrap(attention_fn):
    """The attention function handed to every module (cached per function)."""
    if attention_fn in _WRAPPED:
        return _WRAPPED[attention_fn]

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        interceptor = _INTERCEPTORS.get(module)
        if interceptor is None:
            return attention_fn(module, query, key, value, attention_mask, *args, **kwargs)
        return interceptor(attention_fn, module, query, key, value, attention_mask, *args,
                           **kwargs)

    _WRAPPED[attention_fn] = attention
    return attention


def intercept(module: nn.Module, interceptor: Callable) -> None:
    """Route `module`'s attention calls to `interceptor` (installs the lookup wrapper)."""
    if module in _INTERCEPTORS:
        raise RuntimeError("mixkv: this model is already patched (or its queries are being "
                           "captured); unpatch it first")
    if "get_interface" not in vars(ALL_ATTENTION_FUNCTIONS):
        original = ALL_ATTENTION_FUNCTIONS.get_interface

        def get_interface(attn_implementation, default):
            return _wrap(original(attn_implementation, default))

        ALL_ATTENTION_FUNCTIONS.get_interface = get_interface
    _INTERCEPTORS[module] = interceptor


def release(module: nn.Module) -> None:
    """Stop intercepting `module`; the lookup is restored once nothing is intercepted."""
    _INTERCEPTORS.pop(module, None)
    if len(_INTERCEPTORS) == 0 and "get_interface" in vars(ALL_ATTENTION_FUNCTIONS):
        del ALL_ATTENTION_FUNCTIONS.get_interface
        _WRAPPED.clear()


@contextlib.contextmanager
def intercepting(modules, interceptor: Callable):
    """Route the `modules`' attention calls to `interceptor` during the ``with`` block, in front
    of the interceptor each already has (the shim's): it is called as
    ``interceptor(next_fn, module, query, key, value, attention_mask, *args, **kwargs)`` where
    ``next_fn`` is the previous interceptor bound to the attention function (or the plain
    function), so the call still goes where it would have gone. Restored afterwards."""
    saved = {module: _INTERCEPTORS.get(module) for module in modules}

    def chained(previous):
        def call(function, module, *args, **kwargs):
            if previous is None:
                return interceptor(function, module, *args, **kwargs)
            return interceptor(lambda *a, **k: previous(function, *a, **k), module, *args,
                               **kwargs)
        return call

    try:
        for module, previous in saved.items():
            if previous is None:
                intercept(module, chained(None))
            else:
                _INTERCEPTORS[module] = chained(previous)
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                release(module)
            else:
                _INTERCEPTORS[module] = previous


def is_prefill(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Prefill: this call's keys are the whole cache (query length = key length)."""
    return query.shape[-2] == key.shape[-2]


@dataclasses.dataclass
class Captured:
    """What :func:`capture_prefill` records per layer."""

    queries: Dict[int, torch.Tensor]          # layer -> [B, Hq, W, D] last window queries
    hidden_states: Dict[int, torch.Tensor]    # layer -> [B, N, hidden] (when asked for)


@contextlib.contextmanager
def capture_prefill(model: nn.Module, window: int, *, hidden_states: bool = False):
    """Record each decoder layer's last `window` prefill queries (and, if asked, the attention
    module's input hidden states) during the ``with`` block; yields a :class:`Captured`."""
    _, modules = find_attention_modules(model)
    captured = Captured({}, {})
    hooks = []

    def record(function, module, query, key, value, attention_mask, *args, **kwargs):
        if is_prefill(query, key):
            W = min(window, query.shape[-2])
            captured.queries[module.layer_idx] = query[..., -W:, :].detach().clone()
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    def record_hidden(module, args, kwargs):
        hidden = hidden_states_of(args, kwargs)
        if hidden is not None:
            captured.hidden_states[module.layer_idx] = hidden.detach().clone()

    try:
        for module in modules:
            intercept(module, record)
            if hidden_states:
                hooks.append(module.register_forward_pre_hook(record_hidden, with_kwargs=True))
        yield captured
    finally:
        for hook in hooks:
            hook.remove()
        for module in modules:
            if _INTERCEPTORS.get(module) is record:
                release(module)


def real_keys(attention_mask, batch: int, length: int) -> Optional[torch.Tensor]:
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
