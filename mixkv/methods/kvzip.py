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

from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import Prefill, Scorer, register_scorer

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"


@register_scorer("kvzip")
class KVzip(Scorer):
    """Query-agnostic importance from a reconstruction pass over the context.

    Options:
    - ``chunk_size`` (2048): context tokens re-read per forward pass; the pass's attention
      scores take O(chunk_size x N) memory per layer at a time.
    - ``repeat_prompt``: the text fed before the re-read context (tokenized with ``tokenizer``
      or the tokenizer the caller has, e.g. the evaluation's), a list of token ids, or None
      (no prompt). Text without any tokenizer is an error that says so.
    - ``tokenizer``: a Hugging Face tokenizer for a text prompt (``mixkv.patch`` has none).
    - ``crop_chunks`` (True): the cache is cropped back to the context after every chunk and
      every chunk re-reads after the prompt (KVzip's way: extra KV memory bounded by
      prompt + chunk). False: the re-read continues across chunks (the scores then equal one
      pass over [context, prompt, context] whatever the chunk size; the cache holds up to
      2N + prompt tokens during the pass) and is cropped back at the end.
    """

    needs_reconstruction = True

    def __init__(self, chunk_size: int = 2048,
                 repeat_prompt: Union[str, Sequence[int], None] = REPEAT_PROMPT,
                 tokenizer=None, crop_chunks: bool = True):
        if int(chunk_size) < 1:
            raise ValueError(f"mixkv: kvzip chunk_size must be >= 1, got {chunk_size}")
        if not (repeat_prompt is None or isinstance(repeat_prompt, str) or
                all(isinstance(t, int) or (isinstance(t, Tensor) and t.numel() == 1)
                    for t in repeat_prompt)):
            raise TypeError("mixkv: kvzip repeat_prompt must be text, a sequence of token ids "
                            f"or None, got {repeat_prompt!r}")
        self.chunk_size, self.repeat_prompt = int(chunk_size), repeat_prompt
        self.tokenizer, self.crop_chunks = tokenizer, bool(crop_chunks)

    def prompt_ids(self, encode: Optional[Callable[[str], List[int]]] = None) -> List[int]:
        """The repeat prompt as token ids (``encode``: text -> ids, used without a tokenizer)."""
        prompt = self.repeat_prompt
        if prompt is None:
            return []
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is not None:
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if encode is not None:
            return list(encode(prompt))
        raise ValueError("mixkv: kvzip's repeat prompt is text but no tokenizer is at hand: "
                         "pass tokenizer=..., repeat_prompt=[token ids] or repeat_prompt=None")

    def reconstruction_plan(self, encode=None) -> dict:
        return dict(prompt_ids=self.prompt_ids(encode), chunk_size=self.chunk_size,
                    crop_chunks=self.crop_chunks)

    def score(self, p: Prefill) -> Tensor:
        if p.reconstruction is None:
            raise ValueError(f"mixkv: scorer {self.label!r} needs the reconstruction pass's "
                             "scores (Prefill.reconstruction); mixkv.patch and "
                             "compress_cache(..., context_ids=...) run it")
        scores = p.reconstruction[..., :p.candidates].float()
        return torch.where(p.real_candidates()[:, None, :], scores, 0.0).contiguous()

    def __repr__(self):
        return (f"KVzip(chunk_size={self.chunk_size}, repeat_prompt={self.repeat_prompt!r}, "
                f"crop_chunks={self.crop_chunks})")
