"""mixkv-eval's answers served by vLLM with the mixkv.vllm plugin (``--engine vllm``).

The HF engine (:mod:`mixkv.eval.engine`) prefills each sample once and evaluates every method
from copies of that cache. A serving engine works the other way round: the method is a setting
of the whole engine (``additional_config["mixkv"]``), so this engine starts one vLLM engine per
(method, budget) and sends it every pending sample as one batch of requests, as a server would
receive them. ``full`` runs vLLM without the setting (the plugin is then inert: vanilla vLLM).

What it measures is what a deployment gets: each prompt is compressed right after its prefill
(the first answer token still sees the whole prompt, as in ``mixkv.patch``) and the answer is
decoded greedily from the compressed cache, to a stop id or the task's token limit; the answer
is scored by the task's metric exactly as the HF engine scores its own. So the query-aware
regime only (``--mode aware``): vLLM compresses a request's whole prompt, question included,
and nothing can be fed after a compressed context before the answer. No fidelity metrics
either (they need teacher forcing on the compressed cache), and no decode-time compression
(the plugin refuses it).

Results (:class:`mixkv.eval.records.Result`) carry the HF engine's fields (score, output,
output_tokens, decoding, kv_ratio, ...) but the fidelity ones, plus ``engine="vllm"``;
``seconds`` is the batch's wall time shared equally by its samples.
"""

from __future__ import annotations

import gc
import time
from typing import Dict, List, Optional, Sequence

from ..constants import DEFAULT_WINDOW, FULL
from . import metrics
from .engine import Prepared, prepare
from .models import EvalModel, serving_folder
from .records import Result

BLOCK_SIZE = 32                  # the CPU attention backend takes multiples of 32


def check(mode: str, decode_budget: Optional[int], interval: Optional[int]) -> None:
    """The settings --engine vllm cannot honour, refused before any model loads."""
    if mode != "aware":
        raise ValueError(
            f"mixkv.eval: --engine vllm runs the query-aware regime only (--mode aware), got "
            f"--mode {mode}: vLLM compresses a request's whole prompt right after its prefill, "
            "so a question cannot follow a compressed context")
    if decode_budget is not None or interval is not None:
        raise ValueError("mixkv.eval: --engine vllm does not compress during generation "
                         "(--decode-budget/--interval): the vLLM plugin compresses prompts only")


class VLLMEngine:
    """Evaluate prepared samples through vLLM: ``run(prepared, method, budget, ratio)`` returns
    one :class:`Result` per sample, in order."""

    def __init__(self, em: EvalModel, *, window: int = DEFAULT_WINDOW, mode: str = "aware",
                 dtype: str = "float32", block_size: int = BLOCK_SIZE):
        check(mode, None, None)
        import mixkv.vllm

        mixkv.vllm.offline_environment(kv_cache_gib=2)   # read when vLLM loads
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise ImportError("mixkv.eval: --engine vllm needs vLLM 0.32 (the CPU build: "
                              "scripts/setup.sh --vllm makes .venv-vllm; run mixkv.eval "
                              "there)") from error
        mixkv.vllm.register()   # inert for engines without the setting (method "full")
        self.em, self.window, self.mode = em, window, mode
        self.dtype, self.block_size = dtype, block_size
        self.folder = str(serving_folder(em))

    def prepare(self, sample) -> Prepared:
        return prepare(self.em, sample, self.mode)   # the HF engine's prompt, token for token

    def _llm(self, prepared: Sequence[Prepared], setting: Optional[Dict]):
        from vllm import LLM

        longest = max(len(p.prefill_ids) + p.sample.max_new_tokens for p in prepared)
        extra = {"additional_config": {"mixkv": setting}} if setting else {}
        return LLM(model=self.folder, skip_tokenizer_init=True, enforce_eager=True,
                   dtype=self.dtype, block_size=self.block_size, max_model_len=longest,
                   max_num_batched_tokens=longest, enable_prefix_caching=False,
                   enable_chunked_prefill=False, seed=0, disable_log_stats=True, **extra)

    def run(self, prepared: Sequence[Prepared], method: str = FULL,
            budget: Optional[int] = None, ratio: Optional[float] = None,
            **options) -> List[Result]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from ..vllm.config import kept_tokens

        setting = None
        if method != FULL:
            setting = dict(method=method, window=self.window, **options)
            setting.update({"budget": budget} if budget is not None else {"ratio": ratio})
        start = time.perf_counter()
        llm = self._llm(prepared, setting)
        try:
            stop = sorted(set(self.em.stop_ids))
            params = [SamplingParams(max_tokens=p.sample.max_new_tokens, temperature=0.0,
                                     stop_token_ids=stop, detokenize=False) for p in prepared]
            outs = llm.generate([TokensPrompt(prompt_token_ids=p.prefill_ids) for p in prepared],
                                params, use_tqdm=False)
        finally:
            del llm
            gc.collect()
        seconds = (time.perf_counter() - start) / max(1, len(prepared))
        records = []
        for p, out in zip(prepared, outs):
            tokens = list(out.outputs[0].token_ids)
            ended = next((i for i, t in enumerate(tokens) if t in stop), None)
            generated = tokens if ended is None else tokens[:ended]
            n = len(p.prefill_ids)
            kept = n if setting is None else min(n, kept_tokens(n, budget, ratio, self.window))
            sample, text = p.sample, self.em.decode(generated)
            records.append(Result(
                output=text, output_tokens=len(generated),
                decoding="eos" if ended is not None else "max_new_tokens",
                score=metrics.score(sample.metric, text, sample.answers, sample.meta),
                sample_id=sample.id, task=sample.task, method=method,
                budget=budget if setting else None, ratio=ratio if setting else None,
                mode=self.mode, window=self.window, prompt_tokens=n, context_tokens=n,
                kv_ratio=kept / n, compress_seconds=None, seconds=seconds,
                answers=sample.answers, metric=sample.metric, depth=sample.meta.get("depth"),
                engine="vllm"))
        return records
