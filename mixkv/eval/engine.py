"""One prefill per sample, every method and budget evaluated from a copy of its full cache.

Why copies and not one patched prefill per method: prefill is the expensive step (a 2K-token
prompt costs seconds on a CPU, an answer a few hundred milliseconds) and it is unaffected by
compression (the shim compresses each layer only after that layer's prefill attention has run
over the full cache, so every later layer and the prompt's logits are those of the full model).
So the engine prefills once with the model unpatched, recording each layer's last ``W`` queries
exactly where the shim records them (the attention function's ``query`` argument, post-RoPE and
post-norm), then for every (method, budget):

1. deep-copies the full ``DynamicCache`` (the copy is what gets compressed and extended);
2. patches the model with ``mixkv.patch(model, method, budget=..., ...)`` and has the shim
   compress the copy, layer by layer, with those window queries (the shim's own compression
   routine, so the kept tokens are exactly those of a patched prefill: tests/eval/test_eval_engine.py
   checks this against ``model.generate`` under the patch); a method whose scorer re-reads
   the context (kvzip) first runs its reconstruction pass on the copy (``hf/reconstruct.py``;
   once per sample and plan, shared by budgets and mixes, its time counted in every record's
   ``compress_seconds``);
3. keeps the patch while the answer is produced (head-wise caches and padded rows need the
   shim's attention), feeding new tokens at their true positions (``position_ids``).

With ``decode_budget=`` (and ``interval=``) among a method's options the shim also compresses
during generation (``mixkv/hf/decode.py``): the teacher-forced continuation is then fed in
pieces of ``interval`` tokens, so its fidelity metrics measure a long generation under
decode-time compression (``--corpus --continuation 512 --decode-budget N``).

Answering: the question (query-agnostic mode) is fed after the compressed context; the gold
continuation is then teacher-forced on a copy of that cache: its logits over the answer tokens
are what the fidelity metrics compare with the full cache's (NLL, top-1 agreement, KL). Then
the answer is decoded greedily. With ``shortcut=True`` (the default) the teacher-forced logits
also give the start of the greedy answer for free: greedy decoding would emit the gold tokens as
long as they are the argmax, then the first argmax that differs. If that settles the answer
(the whole gold continuation is the argmax and a string-match metric is satisfied, or EOS or
the token limit is reached) nothing is decoded; otherwise those tokens are fed in one step and
greedy decoding goes on, stopping at EOS, ``max_new_tokens`` or, for the string-match metrics,
as soon as the score reaches 1 (it can only grow). This equals plain greedy decoding up to float
rounding (tokens fed together vs one at a time). ``shortcut=False`` decodes the plain way, one
token at a time to EOS or ``max_new_tokens``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from typing import Dict, List, Optional

import torch

from ..constants import DEFAULT_WINDOW, FULL
from . import metrics
from .models import EvalModel
from .records import Result
from .tasks import Sample

MONOTONE_METRICS = ("contains_all", "contains_any")


@contextlib.contextmanager
def capture_window_queries(model, window: int):
    """Record ``query[..., -window:, :]`` of each decoder layer's prefill attention call: a dict
    ``{layer_idx: [B, Hq, W, D]}`` filled during the ``with`` block, captured exactly where the
    shim captures them (:func:`mixkv.hf.capture.capture_prefill`)."""
    from ..hf.capture import capture_prefill

    with capture_prefill(model, window) as captured:
        yield captured.queries


def layers_left_alone(model) -> Dict:
    """The decoder layers the shim does not compress, by reason (``hf.model.sliding_layers``,
    the shim's own decision), and the layer count:
    ``dict(layers=18, compressed=[5, 11, 17], sliding_window=[0, 1, ...])``."""
    from ..hf.model import find_attention_modules, sliding_layers

    decoder, modules = find_attention_modules(model)
    count = len(modules)
    sliding = sliding_layers(decoder.config, count)
    return dict(layers=count, compressed=[i for i in range(count) if i not in sliding],
                sliding_window=sliding)


def method_options(label: str) -> Dict:
    """The ``mixkv.patch`` arguments of a method name: the name carries its base
    ("mixkv+adakv", "tova+pyramidkv", "mixkv(tova)"), parsed by :mod:`mixkv.methods`."""
    return dict(method=label)


@dataclasses.dataclass
class Prepared:
    sample: Sample
    prefill_ids: List[int]
    question_ids: List[int]
    target_ids: List[int]


def prepare(em: EvalModel, sample: Sample, mode: str) -> Prepared:
    """A sample's token ids: the context (what is prefilled and compressed) and the question
    fed after it (query-agnostic), or both prefilled together (query-aware)."""
    head, question = sample.user_parts()
    if sample.meta.get("raw"):     # natural text: the document itself, no chat template
        prefix, suffix = head, question
    else:
        prefix, suffix = em.chat_parts(head, question)
    suffix = suffix + em.answer_join(sample.answer_prefix) + sample.answer_prefix
    prefix_ids = em.encode(prefix, first=True)
    suffix_ids = em.encode(suffix)
    target_ids = em.encode(sample.target) if sample.target else []
    if mode == "agnostic":
        return Prepared(sample, prefix_ids, suffix_ids, target_ids)
    return Prepared(sample, prefix_ids + suffix_ids, [], target_ids)


@dataclasses.dataclass
class Prefilled:
    prepared: Prepared
    cache: object
    q_windows: Dict[int, torch.Tensor]
    hidden_states: Dict[int, torch.Tensor]   # layer -> attention input (when methods need it)
    last_logits: torch.Tensor        # [V] logits after the prefill's last token
    seconds: float
    full_tf_logits: Optional[torch.Tensor] = None   # [k, V] the full cache's teacher forcing
    # reconstruction passes (kvzip) already run on this prefill: plan -> (scores, seconds)
    reconstructions: Dict = dataclasses.field(default_factory=dict)


class Engine:
    """Evaluate samples on one model: ``prefill(sample)`` once, then ``run(prefilled, ...)``
    per method and budget (``method="full"`` first: the fidelity reference)."""

    def __init__(self, em: EvalModel, *, window: int = DEFAULT_WINDOW, mode: str = "agnostic",
                 shortcut: bool = True, hidden_states: bool = False):
        if mode not in ("agnostic", "aware"):
            raise ValueError(f"mixkv.eval: mode must be 'agnostic' or 'aware', got {mode!r}")
        self.em, self.model, self.window, self.mode = em, em.model, window, mode
        self.shortcut = shortcut
        self.hidden_states = hidden_states   # capture them at prefill (methods that read them)
        from ..hf.model import cache_keyword

        self._cache_kw = cache_keyword(self.model)

    # -- model calls -----------------------------------------------------------------------------
    def _forward(self, ids: List[int], cache, start: int, *, last_only: bool = False):
        device = self.em.device
        input_ids = torch.tensor([ids], device=device)
        positions = torch.arange(start, start + len(ids), device=device)[None]
        kwargs = {self._cache_kw: cache}
        if last_only:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True,
                             **kwargs)
        return out.logits[0].float()

    def _forward_chunks(self, ids: List[int], cache, start: int, chunk: Optional[int]):
        """``_forward`` in pieces of ``chunk`` tokens (compression during generation: each
        piece ends where a token-by-token decode would re-compress, so the logits are those of
        decoding one token at a time, up to float rounding); one call when ``chunk`` is None."""
        if not chunk or len(ids) <= chunk:
            return self._forward(ids, cache, start)
        return torch.cat([self._forward(ids[i:i + chunk], cache, start + i)
                          for i in range(0, len(ids), chunk)])

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    # -- public ----------------------------------------------------------------------------------
    def prepare(self, sample: Sample) -> Prepared:
        return prepare(self.em, sample, self.mode)

    def prefill(self, prepared: Prepared) -> Prefilled:
        from ..hf.capture import capture_prefill

        start = time.perf_counter()
        cache = self._new_cache()
        with capture_prefill(self.model, self.window,
                             hidden_states=self.hidden_states) as captured:
            logits = self._forward(prepared.prefill_ids, cache, 0, last_only=True)
        return Prefilled(prepared, cache, captured.queries, captured.hidden_states, logits[-1],
                         time.perf_counter() - start)

    def run(self, prefilled: Prefilled, method: str = FULL, budget: Optional[int] = None,
            ratio: Optional[float] = None, **options) -> Result:
        """Evaluate one method at one budget on a prefilled sample; returns its result, the
        run's fields (model, seed, settings...) left for the runner."""
        prepared, sample = prefilled.prepared, prefilled.prepared.sample
        start = time.perf_counter()
        name = method
        if name != FULL and prefilled.full_tf_logits is None and prepared.target_ids:
            self.run(prefilled, FULL)  # the fidelity reference comes first
            start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            handle = None
            if name != FULL:
                import mixkv

                handle = mixkv.patch(self.model, name, budget=budget, ratio=ratio,
                                     window=self.window, **options)
                stack.callback(handle.unpatch)
                if handle.method.needs_hidden_states and not prefilled.hidden_states:
                    raise ValueError(f"mixkv.eval: method {name!r} reads the layers' hidden "
                                     "states: build the Engine with hidden_states=True")

            cache = copy.deepcopy(prefilled.cache)
            reused = 0.0
            if handle is not None:
                scores = None
                if handle.method.needs_reconstruction:
                    scores, reused = self._reconstruction(prefilled, handle, cache)
                handle.compress_cache(cache, prefilled.q_windows,
                                      hidden_states=prefilled.hidden_states,
                                      reconstruction=scores)
            # a reused reconstruction pass still counts: every method pays its own scoring
            compress_seconds = time.perf_counter() - start + reused
            stats = handle.stats()["total"] if handle is not None else {}
            decoding = handle.decoding if handle is not None else None
            result = self._answer(prefilled, cache, decoding)
            if decoding is not None:
                result = dataclasses.replace(
                    result, decode_budget=decoding.decode_budget, interval=decoding.interval,
                    decode_compressions=decoding.compressions)
        return dataclasses.replace(
            result, sample_id=sample.id, task=sample.task, method=method,
            budget=budget if name != FULL else None, ratio=ratio if name != FULL else None,
            mode=self.mode, window=self.window, prompt_tokens=len(prepared.prefill_ids) +
            len(prepared.question_ids), context_tokens=len(prepared.prefill_ids),
            kv_ratio=stats.get("ratio", 1.0), compress_seconds=compress_seconds,
            seconds=time.perf_counter() - start, answers=sample.answers, metric=sample.metric,
            depth=sample.meta.get("depth"))

    def _reconstruction(self, prefilled: Prefilled, handle, cache):
        """The reconstruction pass's scores for a method that re-reads the context (kvzip),
        run once per plan and sample (budgets and mixes share it): (scores, seconds it took
        when reused, else 0)."""
        from ..hf import reconstruct

        prepared = prefilled.prepared
        plan = reconstruct.plan_for(handle.method, self.em.encode,
                                    getattr(self.em, "tokenizer", None))
        key = reconstruct.plan_key(plan)
        if key in prefilled.reconstructions:
            scores, seconds = prefilled.reconstructions[key]
            return scores, seconds
        start = time.perf_counter()
        ids = torch.tensor([prepared.prefill_ids], device=self.em.device)
        scores = reconstruct.reconstruction_scores(
            self.model, cache, input_ids=ids,
            layers=[m.layer_idx for m in handle.modules
                    if handle.compressible(cache, m.layer_idx)], **plan)
        prefilled.reconstructions[key] = (scores, time.perf_counter() - start)
        return scores, 0.0

    def _answer(self, prefilled: Prefilled, cache, decoding=None) -> Result:
        """The answer and its fidelity; ``decoding``: the patch's compression during
        generation (its interval sets the pieces every forward is cut into), or None."""
        prepared, sample = prefilled.prepared, prefilled.prepared.sample
        chunk = decoding.interval if decoding is not None else None
        question, target = prepared.question_ids, prepared.target_ids
        position = len(prepared.prefill_ids)
        monotone = sample.metric in MONOTONE_METRICS
        if question:
            last = self._forward(question, cache, position)[-1]
            position += len(question)
        else:
            last = prefilled.last_logits
        if not target:
            generated, how = self._greedy(last, cache, position, sample, monotone)
            return self._result(sample, generated, how, {}, False)
        # Teacher forcing on a copy: the predictions for the k gold tokens.
        parts = [last[None]]
        if len(target) > 1:
            # The copy's decoding must not move the real cache's compression schedule.
            forced = copy.deepcopy(cache)
            with decoding.side_branch() if decoding is not None else contextlib.nullcontext():
                parts.append(self._forward_chunks(target[:-1], forced, position, chunk))
            del forced
        tf_logits = torch.cat(parts)
        target_t = torch.tensor(target)
        predicted = tf_logits.argmax(-1).cpu()
        if prefilled.full_tf_logits is None:     # this is the full cache: the reference
            prefilled.full_tf_logits = tf_logits
        fid = metrics.fidelity(prefilled.full_tf_logits, tf_logits, target_t)
        matched = int((predicted == target_t).long().cumprod(0).sum())
        strict = matched == len(target)
        if not self.shortcut:
            generated, how = self._greedy(last, cache, position, sample, monotone)
            return self._result(sample, generated, how, fid, strict)
        # Greedy decoding would emit target[:matched], then predicted[matched]: take them as
        # decoded (exact up to float rounding), then decode on after them.
        generated = list(target[:matched]) + ([int(predicted[matched])] if not strict else [])
        stop = set(self.em.stop_ids)
        # Greedy decoding ends at the first stop id, wherever it is, gold prefix included.
        first_stop = next((i for i, token in enumerate(generated) if token in stop), None)
        if first_stop is not None and first_stop < sample.max_new_tokens:
            return self._result(sample, generated[:first_stop], "eos", fid, strict)
        if len(generated) >= sample.max_new_tokens:
            return self._result(sample, generated[:sample.max_new_tokens], "max_new_tokens",
                                fid, strict)
        if monotone and self._answered(sample, generated):
            return self._result(sample, generated, "teacher-forced" if strict else "answered",
                                fid, strict)
        last = self._forward_chunks(generated, cache, position, chunk)[-1]
        more, how = self._greedy(last, cache, position + len(generated), sample, monotone,
                                 generated)
        return self._result(sample, more, how, fid, strict)

    def _answered(self, sample: Sample, generated: List[int]) -> bool:
        return metrics.score(sample.metric, self.em.decode(generated), sample.answers) == 1.0

    def _result(self, sample, generated, how, fid, strict) -> Result:
        """The answer's part of a result (``fid``: :func:`metrics.fidelity`'s fields, or {}
        without a gold continuation)."""
        text = self.em.decode(generated)
        return Result(output=text, output_tokens=len(generated), decoding=how,
                      score=metrics.score(sample.metric, text, sample.answers, sample.meta),
                      target_greedy=strict, **fid)

    def _greedy(self, logits: torch.Tensor, cache, position: int, sample: Sample,
                monotone: bool, generated: Optional[List[int]] = None):
        """Greedy decoding from ``logits`` (the prediction after the last fed token) until a
        stop id, ``max_new_tokens``, or (shortcut, string-match metrics) the answer is found."""
        generated = list(generated or [])
        stop = set(self.em.stop_ids)
        while True:
            token = int(logits.argmax())
            if token in stop:
                return generated, "eos"
            generated.append(token)
            if len(generated) >= sample.max_new_tokens:
                return generated, "max_new_tokens"
            if self.shortcut and monotone and self._answered(sample, generated):
                return generated, "answered"
            logits = self._forward([token], cache, position)[-1]
            position += 1
