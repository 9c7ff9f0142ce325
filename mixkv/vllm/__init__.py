"""mixkv in vLLM: compress each request's KV cache once, after its prefill (issue 27).

A vLLM general plugin (entry point ``vllm.general_plugins``: ``mixkv = "mixkv.vllm:register"``,
installed with mixkv). It does nothing unless the engine asks for it::

    LLM(model, additional_config={"mixkv": {"method": "mixkv", "budget": 256, "window": 32}},
        enable_prefix_caching=False, enable_chunked_prefill=False)

``method`` is any name ``mixkv.patch`` takes with uniform budgets (snapkv, mixkv, tova, knorm,
streamingllm, keydiff, mixkv(tova), a scorer registered with mixkv.methods.register_scorer,
...); ``budget`` (tokens kept per KV head, window included) or ``ratio``, ``window`` and the
method's options follow mixkv.patch's meaning, and the kept tokens are the ones mixkv.patch
keeps. Every prompt longer than the budget is compressed in every layer right after its
prefill, and the leading KV blocks it no longer needs go back to vLLM's pool. The settings and
features it refuses, and the layout, are in docs/vllm-plugin.md; vLLM 0.32.* with its CPU
backend only, for now.

Importing this package imports neither vLLM nor anything mixkv itself does not import;
``register()`` imports vLLM.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """vLLM calls this in each of its processes before any engine config exists: installs the
    backend, KV-cache manager and hooks, all inert unless additional_config["mixkv"] is set.
    Idempotent."""
    from . import engine  # checks vLLM's version first

    engine.install()
