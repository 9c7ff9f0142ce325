"""``mixkv-calibrate --kvzap``: fit the KVzap surrogate of KVzip (``mixkv/methods/kvzap.py``).

Teacher: KVzip's reconstruction pass with the ``kvzip`` scorer's default setup (the official
code's: repeat prompt, chat header, chat prefix kept), run by ``reconstruct.reconstruction_scores``
on prefills of the texts. Student: per compressed layer, ridge regression from the attention
module's input hidden state (captured during the same prefill) to the log of each KV head's
KVzip score. Tokens the teacher keeps whatever their score (+inf: the chat prefix) are left out.

The texts are the packaged corpus (``mixkv/eval/corpus``, 4 documents) or a folder's ``.txt``
files, each cut into consecutive passages of at most ``length`` tokens, each passage a
query-agnostic prompt as the evaluation builds them (the text as the chat template's user turn).
One document (default: the last) is held out: the fit never sees it, and the Spearman rank
correlation of the surrogate's predictions with KVzip's scores on its tokens is reported per
layer and KV head.

The fit accumulates the normal equations (X^T X, X^T y, a bias column) per layer in float64
and solves them once: ridge on standardised features, i.e. the penalty
``lam * n * var(feature)`` on each weight (none on the bias), so ``lam`` is scale-free (the
hidden states of small models have a few dimensions orders of magnitude larger than the rest).
Everything is a function of the model, the texts, ``length`` and ``lam``: the same command
gives the same weights (torch's CPU kernels with a fixed thread count).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_LAMBDA = 1e-2
MIN_PASSAGE = 64          # a document's last passage shorter than this is dropped


# -- data --------------------------------------------------------------------------------------
def corpus_passages(em, *, length: int, text_dir: Optional[str] = None, chat: bool = True
                    ) -> List[Tuple[str, List[int]]]:
    """(document name, token ids) of consecutive passages of each document, every passage a
    query-agnostic prompt of at most ``length`` tokens: the document's tokens cut into pieces
    that fit beside the chat template's own tokens, each piece's text as the template's user
    turn (``chat=False``: raw text), as the evaluation's prompts. A last piece shorter than
    MIN_PASSAGE tokens is dropped."""
    from .tasks import corpus_files

    head = em.chat_parts("", "")[0] if chat else ""
    step = length - len(em.encode(head, first=True)) if head else length
    if step < MIN_PASSAGE:
        raise ValueError(f"mixkv-calibrate: --length {length} leaves no room for a passage "
                         f"beside the chat template's {length - step} tokens")
    out = []
    for path in corpus_files(text_dir):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        tokens = em.tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(tokens), step):
            piece = em.decode(tokens[start:start + step]).strip()
            prompt = em.chat_parts(piece, "")[0] if chat else piece
            ids = em.encode(prompt, first=True)[:length]   # re-tokenized: cut to length
            if len(ids) >= MIN_PASSAGE:
                out.append((path.name, ids))
    return out


def teacher_plan(em) -> dict:
    """The reconstruction plan of KVzip's default setup with the model's tokenizer."""
    from ..hf import reconstruct
    from ..methods import resolve

    return reconstruct.plan_for(resolve("kvzip", ratio=0.5), em.encode,
                                getattr(em, "tokenizer", None))


def collect(model, ids: Sequence[int], plan: dict, layers: Sequence[int]
            ) -> Dict[int, Tuple[Tensor, Tensor]]:
    """Prefill ``ids`` (one row), run the teacher's pass and return per layer (hidden states
    [n, hidden] float32, log KVzip scores [n, Hkv] float32) of the tokens the pass scores
    (+inf, the kept prefix, left out)."""
    from transformers import DynamicCache

    from ..hf import capture, reconstruct
    from ..hf.model import cache_keyword

    device = next(model.parameters()).device
    batch = torch.tensor([list(ids)], device=device)
    cache = DynamicCache(config=model.config)
    with capture.capture_prefill(model, 1, hidden_states=True) as captured, torch.no_grad():
        model(input_ids=batch, use_cache=True, **{cache_keyword(model): cache})
    scores = reconstruct.reconstruction_scores(model, cache, input_ids=batch, layers=layers,
                                               **plan)
    out = {}
    for layer in layers:
        s = scores[layer][0].float().cpu()                               # [Hkv, n]
        scored = torch.isfinite(s).all(0) & (s > 0).all(0)
        hidden = captured.hidden_states[layer][0].float().cpu()
        out[layer] = hidden[scored], s[:, scored].log().T.contiguous()
    return out


# -- the fit -----------------------------------------------------------------------------------
class NormalEquations:
    """X^T X and X^T Y of one layer in float64, X with a trailing bias column of ones."""

    def __init__(self):
        self.xtx: Optional[Tensor] = None
        self.xty: Optional[Tensor] = None

    def add(self, x: Tensor, y: Tensor) -> None:
        x = torch.cat([x.double(), x.new_ones(x.shape[0], 1, dtype=torch.float64)], 1)
        xtx, xty = x.T @ x, x.T @ y.double()
        self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.xty = xty if self.xty is None else self.xty + xty

    @property
    def count(self) -> int:
        return 0 if self.xtx is None else int(self.xtx[-1, -1])


def ridge(xtx: Tensor, xty: Tensor, lam: float) -> Tuple[Tensor, Tensor]:
    """(weights [d, k], bias [k]) of ridge regression from the normal equations of [X, 1]
    (``xtx`` [d + 1, d + 1], ``xty`` [d + 1, k], float64): the penalty on weight j is
    ``lam * n * var_j`` (ridge on standardised features), none on the bias."""
    if not lam >= 0:
        raise ValueError(f"mixkv-calibrate: --kvzap-lambda must be >= 0, got {lam}")
    d = xtx.shape[0] - 1
    n = xtx[-1, -1]
    mean = xtx[:d, -1] / n
    var = (torch.diagonal(xtx)[:d] / n - mean ** 2).clamp_min(0)
    penalty = torch.zeros_like(xtx)
    penalty.diagonal()[:d] = lam * n * (var + 1e-12 * var.mean().clamp_min(1e-30))
    solution = torch.linalg.lstsq(xtx + penalty, xty, driver="gelsd").solution
    return solution[:d], solution[d]


def _ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of a 1-D tensor, ties given their average rank."""
    order = x.argsort()
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True,
                                                  return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty(x.shape[0], dtype=torch.float64)
    ranks[order] = ((ends - counts + ends - 1) / 2)[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (nan when either is constant)."""
    ra, rb = _ranks(a) - (a.shape[0] - 1) / 2, _ranks(b) - (b.shape[0] - 1) / 2
    denominator = (ra.square().sum() * rb.square().sum()).sqrt()
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def train(model, passages: Sequence[Tuple[str, Sequence[int]]], plan: dict, *,
          holdout: Optional[str] = None, lam: float = DEFAULT_LAMBDA, progress: bool = True,
          meta: Optional[dict] = None) -> dict:
    """Fit the surrogate of ``model`` on ``passages`` ((document, ids), from
    :func:`corpus_passages`) with the teacher pass ``plan``; ``holdout``: the document whose
    passages are only evaluated (default: the last document; None if there is only one).
    Returns the file's dict (``mixkv.methods.kvzap.load_weights`` reads it)."""
    from ..hf.model import compressed_layers
    from ..methods.kvzap import FORMAT, fingerprint

    if getattr(model, "_mixkv_patch", None) is not None:
        raise RuntimeError("mixkv-calibrate: the model is patched by mixkv (its cache would be "
                           "compressed); unpatch it first")
    documents = list(dict.fromkeys(doc for doc, _ in passages))
    if holdout is None and len(documents) > 1:
        holdout = documents[-1]
    if holdout is not None and holdout not in documents:
        raise ValueError(f"mixkv-calibrate: --kvzap-holdout {holdout!r} is not one of the "
                         f"documents {documents}")
    if not any(doc != holdout for doc, _ in passages):
        raise ValueError("mixkv-calibrate: --kvzap needs at least one passage outside the "
                         "held-out document")
    decoder, modules, layers = compressed_layers(model)
    config = decoder.config
    start = time.perf_counter()
    equations = {layer: NormalEquations() for layer in layers}
    held: Dict[int, List[Tuple[Tensor, Tensor]]] = {layer: [] for layer in layers}
    iterator = passages
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(passages, desc="mixkv-calibrate --kvzap", unit="passage",
                        dynamic_ncols=True)
    for doc, ids in iterator:
        for layer, (x, y) in collect(model, ids, plan, layers).items():
            if doc == holdout:
                held[layer].append((x, y))
            else:
                equations[layer].add(x, y)
    teacher_seconds = time.perf_counter() - start
    d = equations[layers[0]].xtx.shape[0] - 1
    Hkv = equations[layers[0]].xty.shape[1]
    weights = torch.zeros(len(modules), d, Hkv)
    bias = torch.zeros(len(modules), Hkv)
    correlation = torch.full((len(modules), Hkv), float("nan"))
    fit_start = time.perf_counter()
    for layer in layers:
        w, b = ridge(equations[layer].xtx, equations[layer].xty, lam)
        weights[layer], bias[layer] = w.float(), b.float()
        if held[layer]:
            x = torch.cat([x for x, _ in held[layer]])
            y = torch.cat([y for _, y in held[layer]])
            predicted = x.double() @ w + b
            for h in range(Hkv):
                correlation[layer, h] = spearman(predicted[:, h], y[:, h].double())
    fit_seconds = time.perf_counter() - fit_start
    fitted = correlation[layers]
    counts = [sum(len(ids) for doc, ids in passages if doc == d_) for d_ in documents]
    return dict(
        format=FORMAT, weights=weights, bias=bias, layers=layers,
        fingerprint=fingerprint(config),
        config=dict(model_type=config.model_type, hidden_size=config.hidden_size,
                    num_hidden_layers=config.num_hidden_layers,
                    num_key_value_heads=Hkv),
        teacher=dict(scorer="kvzip", plan={k: list(v) if isinstance(v, (list, tuple)) else v
                                           for k, v in plan.items()}),
        documents=documents, tokens=counts, holdout=holdout, lam=lam,
        samples=equations[layers[0]].count,
        held_out_tokens=sum(x.shape[0] for x, _ in held[layers[0]]),
        spearman=correlation, spearman_mean=float(fitted.nanmean()) if held[layers[0]]
        else float("nan"),
        seconds=dict(teacher=round(teacher_seconds, 1), fit=round(fit_seconds, 2)),
        **(meta or {}))


# -- command line (mixkv-calibrate --kvzap) ----------------------------------------------------
def run(args, *, em=None) -> Dict:
    """Train, save and summarise a surrogate (``mixkv-calibrate --kvzap``)."""
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if em is None:
        from .models import load_model

        log(f"mixkv-calibrate: loading {args.model or 'the packaged default model'} ...")
        em = load_model(args.model, dtype=getattr(torch, args.dtype))
    passages = corpus_passages(em, length=args.length, text_dir=args.text_dir,
                               chat=args.chat)
    log(f"mixkv-calibrate --kvzap: {len(passages)} passages of <= {args.length} tokens from "
        f"{len({d for d, _ in passages})} documents")
    result = train(em.model, passages, teacher_plan(em), holdout=args.kvzap_holdout,
                   lam=args.kvzap_lambda, progress=args.progress,
                   meta=dict(model=em.name, length=args.length, chat=args.chat,
                             text=f"dir:{args.text_dir}" if args.text_dir else "corpus"))
    out = Path(args.out) if args.out else Path("results", "calibration", f"{em.name}.kvzap.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    log(summary_text(result, out))
    print(f"kvzap weights: {out}")
    return dict(weights=out, result=result)


def summary_text(result: dict, path: Optional[Path] = None) -> str:
    """A few lines: held-out Spearman (mean, per layer), time, size."""
    rho = result["spearman"][result["layers"]]
    per_layer = ", ".join(f"{layer}: {float(r.nanmean()):.2f}"
                          for layer, r in zip(result["layers"], rho))
    size = f", {path.stat().st_size / 1024:.0f} KiB" if path is not None else ""
    return (f"kvzap surrogate for {result['fingerprint']} ({len(result['layers'])} layers, "
            f"{result['samples']} training tokens, held out {result['holdout']!r}: "
            f"{result['held_out_tokens']} tokens)\n"
            f"held-out Spearman with KVzip: mean {result['spearman_mean']:.3f}; per layer "
            f"{per_layer}\n"
            f"time: teacher {result['seconds']['teacher']:.0f} s, fit "
            f"{result['seconds']['fit']:.1f} s{size}")
