"""Cost of KVzip's reconstruction pass next to a plain prefill, fused against unfused (CPU).

Per round, on the same prompt (a chat-formatted document of N tokens, as the evaluation's
query-agnostic prompts): a prefill alone; the reconstruction pass of ``kvzip`` (its default
setup: the official code's) over a fresh prefill's cache, fused (``attend_and_score``: the
re-read's attention output and the scores from one set of fused attention calls, the forward
stopped after the last scored layer) and unfused (``fused=False``: the model's attention, then
``max_attention``'s second attention for the log-sum-exp). Rounds interleaved, medians after a
short warm-up at 256 tokens. Also checks that both give the same scores and keep the same
tokens at a quarter of the prompt.

    python benchmarks/bench_kvzip_pass.py                      # SmolLM2, 4,096 tokens, 3 rounds
    python benchmarks/bench_kvzip_pass.py --lengths 1024,4096 --repeats 5
    python benchmarks/bench_kvzip_pass.py --model gemma3-270m
    python benchmarks/bench_kvzip_pass.py --tiny --lengths 96 --repeats 1   # smoke (tests)

The script prints the CPU-seconds other processes used while it ran: the figures are only
meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # the checkout this script belongs to, installed or not
sys.path.insert(1, str(HERE))
from bench_ops import ForeignLoad, _cpu_model  # noqa: E402
from bench_scorers import TINY, tiny_llama  # noqa: E402

from mixkv.eval.calibrate import calibration_texts, encode_texts  # noqa: E402
from mixkv.eval.models import load_model  # noqa: E402
from mixkv.hf import reconstruct  # noqa: E402
from mixkv.hf.model import cache_keyword, compressed_layers  # noqa: E402
from mixkv.methods.kvzip import KVzip  # noqa: E402


def _prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model.model)
    with torch.no_grad():
        model.model(input_ids=ids, use_cache=True, **{keyword: cache})
    return cache


def _load(args):
    """(model, its name, N -> prompt ids [1, N], kvzip's default plan for it)."""
    if args.tiny:
        model, encode = tiny_llama()
        prompt = lambda n: torch.randint(3, 512, (1, n), generator=torch.Generator()  # noqa
                                         .manual_seed(n))
        return model, TINY, prompt, KVzip(chunk_size=40).reconstruction_plan(encode)
    em = load_model(args.model)
    em.model.eval()
    prompt = lambda n: torch.tensor(  # noqa: E731
        [encode_texts(em, calibration_texts(1, length=n), length=n)[0]])
    return em.model, em.name, prompt, KVzip().reconstruction_plan(tokenizer=em.tokenizer)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result


def run_length(model, ids: torch.Tensor, repeats: int, plan: dict, layers) -> dict:
    n = ids.shape[1]
    times = {"prefill": [], "pass fused": [], "pass unfused": []}
    scores = {}
    for _ in range(repeats):
        times["prefill"].append(_timed(lambda: _prefill(model, ids))[0])
        for fused in (True, False):
            cache = _prefill(model, ids)
            ms, scores[fused] = _timed(lambda: reconstruct.reconstruction_scores(
                model, cache, input_ids=ids, layers=layers, fused=fused, **plan))
            times["pass fused" if fused else "pass unfused"].append(ms)
    worst, same = 0.0, []
    for i in layers:
        a, b = scores[True][i], scores[False][i]
        finite = torch.isfinite(b)
        worst = max(worst, float(((a - b).abs()[finite]
                                  / b[finite].abs().clamp_min(1e-30)).max()))
        kept = [torch.zeros_like(x, dtype=torch.bool).scatter_(
            -1, x.nan_to_num(posinf=2.0).topk(n // 4, -1).indices, True) for x in (a, b)]
        same.append(float((kept[0] & kept[1]).sum() / kept[1].sum()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(tokens=int(ids.shape[1]), ms=med, rounds=times,
                pass_over_prefill={k: med[k] / med["prefill"] for k in ("pass fused",
                                                                         "pass unfused")},
                max_relative_score_difference=worst,
                same_kept_positions_at_quarter=statistics.mean(same))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="packaged model name or local path "
                    "(default: the evaluation's default, SmolLM2-135M-Instruct)")
    ap.add_argument("--lengths", default="4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and random "
                    "token ids (a smoke run of every code path; no packaged model needed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, name, prompt, plan = _load(args)
    layers = compressed_layers(model)[2]
    load = ForeignLoad()
    run_length(model, prompt(min(256, min(int(n) for n in args.lengths.split(",")))), 1, plan,
               layers)                                                   # warm-up
    results = [run_length(model, prompt(int(n)), args.repeats, plan, layers)
               for n in args.lengths.split(",")]
    other = load.report()
    print(f"# {name}; {_cpu_model()}; torch {torch.__version__}; {args.threads} thread(s); "
          f"medians of {args.repeats} interleaved rounds; kvzip's default setup")
    if other is not None:
        print(f"# other processes used {other[0]:.1f} CPU-s over {other[1]:.0f} s "
              f"({other[0] / max(other[1], 1e-9):.2f} cores on average)")
    print("| N | prefill ms | pass fused ms | pass unfused ms | fused / prefill | "
          "unfused / prefill | prefill + fused pass | max rel. score diff | same kept (N/4) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ms, ratio = r["ms"], r["pass_over_prefill"]
        print(f"| {r['tokens']} | {ms['prefill']:.0f} | {ms['pass fused']:.0f} | "
              f"{ms['pass unfused']:.0f} | {ratio['pass fused']:.2f}x | "
              f"{ratio['pass unfused']:.2f}x | {1 + ratio['pass fused']:.2f}x | "
              f"{r['max_relative_score_difference']:.1e} | "
              f"{100 * r['same_kept_positions_at_quarter']:.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            model=name, machine=_cpu_model(), python=platform.python_version(),
            torch=torch.__version__, threads=args.threads, other_load=other,
            results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
