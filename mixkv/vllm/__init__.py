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

import os

__all__ = ["register", "offline_environment"]


def offline_environment(kv_cache_gib: int = 1) -> None:
    """Defaults, set before vLLM is imported, for one offline process on the CPU: the engine
    core and its worker in this process, a KV pool of ``kv_cache_gib`` GiB (an engine may still
    override it), no hub access, quiet logs. Under ``ATEN_CPU_CAPABILITY=default`` also
    ``TORCH_COMPILE_DISABLE=1``: asking for logprobs makes vLLM's sampler torch.compile a helper
    (v1/sample/ops/logprobs.py) whose inductor C++ does not build there ("'at::vec' has not been
    declared"). Variables already set are left alone."""
    defaults = dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib),
                    HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_LOGGING_LEVEL="WARNING")
    if os.environ.get("ATEN_CPU_CAPABILITY") == "default":
        defaults["TORCH_COMPILE_DISABLE"] = "1"
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def register() -> None:
    """vLLM calls this in each of its processes before any engine config exists: installs the
    backend, KV-cache manager and hooks, all inert unless additional_config["mixkv"] is set.
    Idempotent."""
    from . import engine  # checks vLLM's version first

    engine.install()
