"""One result of the evaluation: a sample answered by one method at one budget.

The engines (:mod:`mixkv.eval.engine`, :mod:`mixkv.eval.vllm_engine`) build a :class:`Result`
with what they measured; the runner completes it with the run's fields (:meth:`Result.of_run`)
and appends ``result.to_json()`` to results.jsonl. That JSON object is the on-disk format: its
keys, their order and their values are those mixkv has always written, so files of earlier
runs resume and report as before. The report module reads records in this JSON form (what
results.jsonl holds), not as :class:`Result`.

Fields made with ``_optional()`` are left out of the JSON when None (a row without a gold
continuation has no fidelity metrics, a row of the HF engine no ``engine`` key, ...), the others
are always written, None as null. Keys :class:`Result` does not know (a row of a newer or older
mixkv) are kept in :attr:`Result.extra` and written back after the known ones: reading a row
and writing it again never loses data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional


def _optional():
    """A field left out of the JSON when None."""
    return dataclasses.field(default=None, metadata={"optional": True})


@dataclasses.dataclass   # its __eq__ compares the fields (extra included), not Mapping's
class Result(Mapping):
    """One result; the comments give each field's meaning, the module docstring the format."""
    # -- the answer (engine) -------------------------------------------------------------------
    output: str = ""                 # the decoded answer
    output_tokens: int = 0           # its token count
    decoding: str = ""               # why decoding stopped: eos, max_new_tokens, answered,
    #                                  teacher-forced
    score: float = 0.0               # the task's metric of the answer (NaN: no metric)
    target_greedy: Optional[bool] = _optional()   # the gold continuation was the greedy one
    # -- fidelity to the full cache over the teacher-forced gold tokens (HF engine) -----------
    nll: Optional[float] = _optional()            # mean NLL of the gold tokens, nats
    nll_full: Optional[float] = _optional()       # the same under the full cache
    delta_nll: Optional[float] = _optional()      # nll - nll_full
    top1_agree: Optional[float] = _optional()     # share of positions whose argmax agrees
    kl: Optional[float] = _optional()             # mean KL(full || compressed), nats
    # -- compression during generation (--decode-budget) ---------------------------------------
    decode_budget: Optional[int] = _optional()    # tokens kept per head while decoding
    interval: Optional[int] = _optional()         # tokens between two compressions
    decode_compressions: Optional[int] = _optional()  # layer compressions done while decoding
    # -- what was evaluated (engine) -----------------------------------------------------------
    sample_id: str = ""
    task: str = ""
    method: str = ""                 # the method's name as given ("full": the reference)
    budget: Optional[int] = None     # tokens per head (None: full, or a ratio)
    ratio: Optional[float] = None    # fraction of the prompt removed (None: full, or a budget)
    mode: str = ""                   # "agnostic" or "aware"
    window: int = 0                  # observation window
    prompt_tokens: int = 0           # context and question
    context_tokens: int = 0          # what was prefilled and compressed
    kv_ratio: float = 1.0            # share of the compressed layers' KV entries kept
    compress_seconds: Optional[float] = None  # scoring and compression (None: vLLM)
    seconds: float = 0.0             # compression and answer (vLLM: the batch's share)
    answers: List[str] = dataclasses.field(default_factory=list)   # the gold answers
    metric: str = ""                 # the task's metric ("none": fidelity only)
    depth: Optional[float] = None    # the needle's depth in the context (needle tasks)
    engine: Optional[str] = _optional()           # "vllm"; absent for the HF engine
    # -- the run (runner) ----------------------------------------------------------------------
    model: Optional[str] = None      # the model's name
    haystack: Optional[str] = None   # the haystack ("task", "essay", "noise" or a folder)
    prefill_seconds: Optional[float] = None  # the sample's prefill (None: vLLM)
    seed: Optional[int] = None
    length: Optional[int] = None     # the requested prompt length
    settings: Optional[Dict[str, Any]] = None  # what defines the result: its resume key
    document: Optional[str] = _optional()       # natural text: the passage's document
    # -- keys of other mixkv versions, kept as read ---------------------------------------------
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict, metadata={"json": False})

    def of_run(self, *, model: str, haystack: Optional[str], prefill_seconds: Optional[float],
               seed: int, length: Optional[int], settings: Dict[str, Any],
               document: Optional[str] = None) -> "Result":
        """This result completed with the run's fields (the runner's part)."""
        return dataclasses.replace(self, model=model, haystack=haystack,
                                   prefill_seconds=prefill_seconds, seed=seed, length=length,
                                   settings=settings, document=document)

    def to_json(self) -> Dict[str, Any]:
        """The results.jsonl object: the known fields in order (optional ones only when set),
        then the unknown keys read with it."""
        out = {}
        for field in _JSON_FIELDS:
            value = getattr(self, field.name)
            if value is not None or not field.metadata.get("optional"):
                out[field.name] = value
        out.update(self.extra)
        return out

    # Read-only access by key to the JSON form, as the dict records the engines returned
    # before this class: code written against them (``record["kl"]``, ``"nll" in record``,
    # ``{**record}``) keeps working. New code reads the attributes.
    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    @classmethod
    def from_json(cls, row: Dict[str, Any]) -> "Result":
        """A results.jsonl object as a Result; unknown keys go to ``extra``, missing fields take
        their defaults (a very old row is then written back with those defaults)."""
        known = {name: row[name] for name in _NAMES if name in row}
        return cls(**known, extra={k: v for k, v in row.items() if k not in _NAMES})


_JSON_FIELDS = [f for f in dataclasses.fields(Result) if f.metadata.get("json", True)]
_NAMES = {f.name for f in _JSON_FIELDS}
