"""KVzip-style scores (Kim et al., 2025, "KVzip: query-agnostic KV cache compression with context
reconstruction"): a cached token matters as much as the model attends to it while it re-reads
the context.

After the prefill (full cache), the shim feeds a short "repeat" prompt followed by the context
tokens again, chunk by chunk, with the prefilled cache as past; every cached context token's
score per KV head is the largest softmax attention it receives from the fed queries (prompt and
re-read tokens, every query head of the KV head's group, every chunk). The pass is run by
``mixkv/hf/reconstruct.py``; this scorer only says how (``reconstruction_plan``) and reads the
result (``Prefill.reconstruction``), so it runs plain, under every budget policy and inside every
mixer like any other scorer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .base import Prefill, Scorer, options_dataclass, register_scorer

REPEAT_PROMPT = "\n\nRepeat the previous context exactly."
CHUNK_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
# mixkv's setup before issue 30 (every option that differs from the official code's).
FORMER = dict(repeat_prompt="\n\nRepeat the previous context exactly.\n", chunk_prompt=None,
              header=False, reread="all", sinks=0, softmax="all", chunk_size=2048)
# kvpress 0.5.5's KVzipPress (its defaults: 4 sinks, chunks of 2048, no space after "with").
KVPRESS = dict(chunk_prompt=CHUNK_PROMPT.rstrip(" "), sinks=4, chunk_size=2048)

Prompt = Union[str, Sequence[int], None]


def _check_prompt(name: str, prompt) -> None:
    if prompt is None or isinstance(prompt, str):
        return
    try:
        ids = list(prompt)
    except TypeError:
        ids = None
    if ids is None or not all(isinstance(t, int) or (isinstance(t, Tensor) and t.numel() == 1)
                              for t in ids):
        raise TypeError(f"mixkv: kvzip {name} must be text, a sequence of token ids or None, "
                        f"got {prompt!r}")


def chat_template_parts(tokenizer) -> Tuple[str, str]:
    """(prefix, header) text of the tokenizer's chat template around one user message: what
    comes before the message's content (system prompt, user header) and what follows it up to
    the assistant's answer (end of turn, assistant header; kvpress's "suffix", the official
    code's "postfix"). Without a chat template: ("", "\n"), as kvpress."""
    if not getattr(tokenizer, "chat_template", None):   # also without a tokenizer
        return "", "\n"
    content = "\x00MIXKV-CONTENT\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False,
                                         enable_thinking=False)
    if content not in text:
        raise ValueError("mixkv: kvzip could not find the user message in the tokenizer's chat "
                         "template; pass header=False and reread='all'")
    prefix, header = text.split(content, 1)
    return prefix, header


@register_scorer("kvzip")
@options_dataclass
class KVzip(Scorer):
    """Query-agnostic importance from a reconstruction pass over the context.

    The defaults follow the official code (snu-mllab/KVzip); ``KVzip(**kvzip.FORMER)`` is
    mixkv's setup before issue 30, ``KVzip(**kvzip.KVPRESS)`` kvpress's KVzipPress. Options
    after ``chunk_size`` and ``repeat_prompt`` are keyword-only.

    Options:
    - ``chunk_size`` (2000, the official code's; kvpress: 2048): context tokens re-read per
      forward pass; the pass's attention scores take O(chunk_size x N) memory per layer.
    - ``repeat_prompt`` ("\n\nRepeat the previous context exactly."): the text fed before
      the first re-read chunk (tokenized with ``tokenizer`` or the tokenizer the caller has,
      e.g. the evaluation's), a list of token ids, or None (no prompt). Text without any
      tokenizer is an error that says so.
    - ``chunk_prompt`` ("\n\nRepeat the part of the previous context exactly, starting with
      "): fed before every later chunk, followed by the previous chunk's last ``overlap`` (8)
      tokens; None: every chunk gets ``repeat_prompt``.
    - ``header`` (True): the chat template's end of the user turn and assistant header follow
      the prompt (a tokenizer without a chat template: "\n", as kvpress); False: nothing.
    - ``reread`` ("context"): a context that starts with the chat template's prefix (system
      prompt, user header) is re-read without it; "all": every prompt token is re-read.
    - ``sinks`` ("prefix"): that prefix is always kept (the official code never evicts the
      system prompt); an int n: the first n tokens are always kept (kvpress: 4); 0: none.
      Kept tokens count in the budget.
    - ``softmax`` ("span"): a re-read query's softmax runs over the kept tokens, its chunk's
      own span of the context and the fed tokens (the official code's and kvpress's), so each
      chunk scores its own span; "all": the model's own softmax over every key.
    - ``tokenizer``: a Hugging Face tokenizer for text prompts and the chat template
      (``mixkv.patch`` has none; the evaluation passes its model's).
    - ``crop_chunks`` (True): the cache is cropped back to the context after every chunk and
      every chunk re-reads after its prompt (KVzip's way: extra KV memory bounded by
      prompt + chunk). False: the re-read continues across chunks after one prompt (the
      scores then equal one pass over [context, prompt, context] whatever the chunk size with
      ``softmax="all"``; the cache holds up to 2N + prompt tokens during the pass) and is
      cropped back at the end.
    """

    needs_reconstruction: ClassVar[bool] = True

    # Fields in the order of the repr, which is the evaluation's resume key of a method's
    # reconstruction setup (mixkv.eval.runner.reconstruction_setup): keep it.
    chunk_size: int = 2000
    repeat_prompt: Prompt = REPEAT_PROMPT
    _: dataclasses.KW_ONLY
    chunk_prompt: Prompt = CHUNK_PROMPT
    overlap: int = 8
    header: bool = True
    reread: str = "context"
    sinks: Union[str, int] = "prefix"
    softmax: str = "span"
    crop_chunks: bool = True
    tokenizer: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if int(self.chunk_size) < 1:
            raise ValueError(f"mixkv: kvzip chunk_size must be >= 1, got {self.chunk_size}")
        _check_prompt("repeat_prompt", self.repeat_prompt)
        _check_prompt("chunk_prompt", self.chunk_prompt)
        overlap, reread, softmax, sinks = self.overlap, self.reread, self.softmax, self.sinks
        if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise ValueError(f"mixkv: kvzip overlap must be an int >= 0, got {overlap!r}")
        if reread not in ("context", "all"):
            raise ValueError(f"mixkv: kvzip reread must be 'context' or 'all', got {reread!r}")
        if softmax not in ("span", "all"):
            raise ValueError(f"mixkv: kvzip softmax must be 'span' or 'all', got {softmax!r}")
        if not (sinks == "prefix" or (isinstance(sinks, int) and not isinstance(sinks, bool)
                                      and sinks >= 0)):
            raise ValueError(f"mixkv: kvzip sinks must be 'prefix' or an int >= 0, got "
                             f"{sinks!r}")
        self.chunk_size, self.crop_chunks = int(self.chunk_size), bool(self.crop_chunks)
        self.header = bool(self.header)

    def _ids(self, prompt: Prompt, encode, what: str) -> Optional[List[int]]:
        if prompt is None:
            return None
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is not None:
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if encode is not None:
            return list(encode(prompt))
        raise ValueError(f"mixkv: kvzip's {what} is text but no tokenizer is at hand: "
                         f"pass tokenizer=..., {what}=[token ids] or {what}=None")

    def prompt_ids(self, encode: Optional[Callable[[str], List[int]]] = None) -> List[int]:
        """The repeat prompt as token ids (``encode``: text -> ids, used without a tokenizer)."""
        return self._ids(self.repeat_prompt, encode, "repeat_prompt") or []

    def reconstruction_plan(self, encode=None, tokenizer=None) -> dict:
        """How the pass re-reads (``reconstruct.reconstruction_scores``'s arguments).
        ``tokenizer``: the caller's Hugging Face tokenizer (for the chat template), used when
        the scorer has none."""
        tokenizer = self.tokenizer if self.tokenizer is not None else tokenizer
        if encode is None and tokenizer is not None:
            encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa
        needs_template = self.header or self.reread == "context" or self.sinks == "prefix"
        prefix, header = chat_template_parts(tokenizer) if needs_template else ("", "")
        ids = lambda text: list(encode(text)) if text and encode is not None else []  # noqa
        return dict(prompt_ids=self.prompt_ids(encode), chunk_size=self.chunk_size,
                    crop_chunks=self.crop_chunks,
                    chunk_prompt_ids=self._ids(self.chunk_prompt, encode, "chunk_prompt"),
                    overlap=self.overlap, header_ids=ids(header) if self.header else [],
                    prefix_ids=ids(prefix), reread=self.reread, sinks=self.sinks,
                    softmax=self.softmax)

    def score(self, p: Prefill) -> Tensor:
        if p.reconstruction is None:
            raise ValueError(f"mixkv: scorer {self.label!r} needs the reconstruction pass's "
                             "scores (Prefill.reconstruction); mixkv.patch and "
                             "compress_cache(..., context_ids=...) run it")
        scores = p.reconstruction[..., :p.candidates].float()
        # the pass marks the tokens it keeps +inf (always_kept): the top probability, 1
        scores = torch.where(torch.isinf(scores), 1.0, scores)
        return torch.where(p.real_candidates()[:, None, :], scores, 0.0).contiguous()

    def always_kept(self, p: Prefill) -> Optional[Tensor]:
        if p.reconstruction is None:
            return None
        return torch.isposinf(p.reconstruction[:, 0, :p.candidates])
