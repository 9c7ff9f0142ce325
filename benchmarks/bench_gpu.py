"""GPU benchmarks (docs/design.md section 10): every figure a ratio measured side by side in one
run.

(a) ops: one Llama-3-8B layer's prefill cache (Hq 32, Hkv 8, D 128, bf16, B=1) compressed by
    ``torch.ops.mixkv.compress`` (MixKV, uniform capacity, budget 2048 with W=32) at N = 32768
    and 131072. Median of many calls timed with CUDA events after warm-up; achieved GB/s against
    a measured device-to-device copy of the same K+V (the floor: one read of Q, K and V plus the
    kept rows and indices written, at the copy's bandwidth, read + written bytes counted); and
    the ratio to ``mixkv.reference.compress`` and to the official-code-style baseline of
    benchmarks/bench_ops.py (same inputs, fewer repeats).
(b) end to end: a Llama-3-8B-sized model with random weights (32 layers, hidden 4096, GQA 32/8,
    vocab 128256, bf16, sdpa), built on the GPU. For each context (32K and 128K tokens) and each
    cache: full (no patch), uniform budget 2048 (``mixkv.patch(model, "mixkv", budget=2048)``,
    SnapKV base) and head-wise budgets (``base="adakv"``): prefill time (logits of the last
    token only), the time spent compressing inside that prefill (CUDA events around the shim's
    per-layer compression) as a share of it, decode tokens/s of a hand-written greedy loop
    (B=1) and peak memory of prefill and decode.

The targets of the GPU issue are evaluated at the end (a table, and under "targets" in the JSON).

    python benchmarks/bench_gpu.py --out results/gpu          # the full run (about 3 min, H200)
    python benchmarks/bench_gpu.py --quick --out results/gpu  # 8K/32K contexts, fewer repeats
    python benchmarks/bench_gpu.py --device cpu --tiny --out /tmp/bench   # smoke run (tests)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ops  # noqa: E402  (also puts the checkout on sys.path if mixkv is not installed)
from bench_ops import LayerShape, official_style_compress  # noqa: E402

import mixkv  # noqa: E402
import mixkv.reference  # noqa: E402

LLAMA3_8B_LAYER = LayerShape("Llama-3-8B", 32, 8, 128)
TINY_LAYER = LayerShape("tiny", 4, 2, 64)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
CACHES = ("full", "uniform", "headwise")
PATCH_OPTIONS = {"full": None, "uniform": dict(method="mixkv"),
                 "headwise": dict(method="mixkv", base="adakv")}


# -- timing -------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, device: torch.device, repeats: int, warmup: int) -> List[float]:
    """Milliseconds of `repeats` calls after `warmup` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [bench_ops._time_once(fn, (), device) for _ in range(repeats)]


def summary(times: List[float]) -> dict:
    return dict(ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                repeats=len(times))


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- (a) the op ---------------------------------------------------------------------------------

def kept_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of kept positions two selections [B, Hkv, K] have in common (1.0 = same sets)."""
    a, b = a.to("cpu", torch.int64), b.to("cpu", torch.int64)
    same = total = 0
    for x, y in zip(a.flatten(0, 1), b.flatten(0, 1)):
        same += len(set(x.tolist()) & set(y.tolist()))
        total += y.numel()
    return same / max(total, 1)


def bench_op(shape: LayerShape, n: int, args, device) -> dict:
    W, budget = args.window, args.op_budget
    q, k, v = bench_ops.make_inputs(shape, n, W, torch.bfloat16, device, seed=n)
    row = dict(model=shape.name, N=n, dtype="bf16", budget=budget, window=W,
               Hq=shape.q_heads, Hkv=shape.kv_heads, D=shape.head_dim)

    # The copy floor: K and V copied device to device (read + write counted).
    dst_k, dst_v = torch.empty_like(k), torch.empty_like(v)

    def copy():
        dst_k.copy_(k)
        dst_v.copy_(v)

    copy_t = summary(time_calls(copy, device, args.op_repeats, args.warmup))
    kv_bytes = k.nbytes + v.nbytes
    copy_bytes_per_ms = 2 * kv_bytes / copy_t["ms"]
    del dst_k, dst_v

    op = lambda: torch.ops.mixkv.compress(q, k, v, None, budget, W)  # noqa: E731
    op_t = summary(time_calls(op, device, args.op_repeats, args.warmup))
    op_t2 = summary(time_calls(op, device, args.op_repeats, 0))  # the same again: the spread
    kept = min(budget, n)
    op_bytes = (q.nbytes + kv_bytes + 2 * shape.kv_heads * kept * shape.head_dim * k.element_size()
                + shape.kv_heads * kept * 4)
    floor_ms = op_bytes / copy_bytes_per_ms
    row.update(op_ms=op_t["ms"], op_min_ms=op_t["min_ms"], op_max_ms=op_t["max_ms"],
               op_ms_again=op_t2["ms"], op_repeats=op_t["repeats"],
               copy_ms=copy_t["ms"], copy_GBps=copy_bytes_per_ms / 1e6,
               op_bytes=op_bytes, op_GBps=op_bytes / op_t["ms"] / 1e6, floor_ms=floor_ms,
               op_over_floor=op_t["ms"] / floor_ms, op_over_copy=op_t["ms"] / copy_t["ms"])

    results = {"op": op()}
    for name, fn in (("reference", lambda: mixkv.reference.compress(q, k, v, None, budget, W)),
                     ("baseline", lambda: official_style_compress(q, k, v, None, budget, W))):
        if name in args.skip_impls:
            continue
        try:
            t = summary(time_calls(fn, device, args.slow_repeats, 1))
            row[f"{name}_ms"] = t["ms"]
            row[f"{name}_over_op"] = t["ms"] / op_t["ms"]
            if name == "reference":
                results[name] = fn()
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
            row[f"{name}_error"] = f"out of memory: {e}".splitlines()[0]
        release(device)
    if "reference" in results:
        row["kept_agreement_with_reference"] = kept_agreement(results["op"][2],
                                                              results["reference"][2])
    return row


class _Skipped(Exception):
    pass


def run_ops(args, device, rows: List[dict], save: Callable[[], None]) -> None:
    """Appends one row per N to `rows`, calling `save` after each."""
    shape = TINY_LAYER if args.tiny else LLAMA3_8B_LAYER
    try:
        if args.skip_check:
            raise _Skipped
        bench_ops.check_agreement(device, args.window)
        print("check: op, reference and official-style baseline keep the same token sets "
              "(N=640, bench_ops.check_agreement)", flush=True)
    except _Skipped:
        pass
    except SystemExit as e:  # check_agreement exits with a message on a mismatch
        print(f"check: FAILED: {e}", flush=True)
        rows.append(dict(N=0, error=f"agreement check: {e}"))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"check: ERROR: {type(e).__name__}: {e}", flush=True)
        rows.append(dict(N=0, error=f"agreement check: {type(e).__name__}: {e}"))
    for n in args.op_n:
        print(f"[ops] {shape.name} N={n} ...", file=sys.stderr, flush=True)
        try:
            row = bench_op(shape, n, args, device)
        except Exception as e:  # noqa: BLE001 - one failing size must not stop the others
            traceback.print_exc()
            row = dict(model=shape.name, N=n, error=f"{type(e).__name__}: {e}".splitlines()[0])
        rows.append(row)
        save()
        release(device)


def format_ops(rows: List[dict]) -> str:
    lines = ["| model | N | op ms (again) | copy K+V ms | copy GB/s | op GB/s | floor ms | "
             "op/floor | reference ms | ref/op | baseline ms | baseline/op | kept = ref |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('model', '')} | {r['N']} | ERROR: {r['error']} |")
            continue

        def f(key, fmt="{:.3f}"):
            return fmt.format(r[key]) if key in r else r.get(key.replace("_ms", "_error"), "-")

        lines.append(
            f"| {r['model']} | {r['N']} | {r['op_ms']:.3f} ({r['op_ms_again']:.3f}) | "
            f"{r['copy_ms']:.3f} | {r['copy_GBps']:.0f} | {r['op_GBps']:.0f} | "
            f"{r['floor_ms']:.3f} | {r['op_over_floor']:.2f}x | {f('reference_ms', '{:.2f}')} | "
            f"{f('reference_over_op', '{:.1f}x')} | {f('baseline_ms', '{:.2f}')} | "
            f"{f('baseline_over_op', '{:.1f}x')} | "
            f"{f('kept_agreement_with_reference', '{:.4f}')} |")
    return "\n".join(lines)


# -- (b) end to end -----------------------------------------------------------------------------

def build_model(args, device):
    """Random weights, created and initialised directly on `device` in the benchmark dtype."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    dims = TINY_MODEL if args.tiny else LLAMA3_8B
    config = LlamaConfig(**dims, max_position_embeddings=max(args.contexts) + 1024,
                         attn_implementation="sdpa")
    dtype = torch.float32 if device.type == "cpu" and args.tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Never time on uninitialised (possibly zero or NaN) weights: re-draw any such matrix.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not (torch.isfinite(p).all() and p.abs().amax() > 0):
                p.normal_(0.0, config.initializer_range)
            elif p.dim() < 2 and not torch.isfinite(p).all():
                p.fill_(1.0)
    model.eval()
    model.generation_config.eos_token_id = None
    return model


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the cache argument `cache`, earlier 5.x `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters \
        else "past_key_values"


def cache_bytes(cache) -> int:
    from mixkv.hf import HeadwiseLayer

    total = 0
    for layer in cache.layers:
        if isinstance(layer, HeadwiseLayer):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total


class CompressTimer:
    """Times the shim's per-layer compression inside a prefill (CUDA events: no extra syncs)."""

    def __init__(self, handle, device):
        self.device, self.spans = device, []
        compressor = handle.compressor
        original = compressor.compress

        def timed(*a, **kw):
            if device.type == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                result = original(*a, **kw)
                end.record()
                self.spans.append((start, end))
            else:
                t0 = time.perf_counter()
                result = original(*a, **kw)
                self.spans.append((t0, time.perf_counter()))
            return result

        compressor.compress = timed  # instance attribute: shadows the method for this handle only

    def total_ms(self) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            return sum(s.elapsed_time(e) for s, e in self.spans)
        return sum((e - s) * 1e3 for s, e in self.spans)


def run_cache(model, ids, cache_name: str, args, device, steps: int) -> dict:
    from transformers import DynamicCache

    kw = _cache_kwarg(model)
    options = PATCH_OPTIONS[cache_name]
    handle = timer = None
    if options is not None:
        handle = mixkv.patch(model, budget=args.e2e_budget, window=args.window, **options)
        timer = CompressTimer(handle, device)
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            token = out.logits[:, -1:].argmax(-1)
            sync(device)
            prefill_ms = (time.perf_counter() - t0) * 1e3
            row = dict(cache=cache_name, context=ids.shape[1], prefill_ms=prefill_ms,
                       kv_cache_MB=cache_bytes(cache) / 2**20)
            if timer is not None:
                row["compress_ms"] = timer.total_ms()
                row["compress_share"] = row["compress_ms"] / prefill_ms
            if device.type == "cuda":
                row["prefill_peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
            del out
            # True positions (the compressed cache is shorter than the prompt), kept on the
            # device and advanced there: the loop itself never waits for the GPU.
            position = torch.full((1, 1), ids.shape[1], dtype=torch.long, device=device)

            def step():
                nonlocal token
                out = model(input_ids=token, position_ids=position, use_cache=True,
                            logits_to_keep=1, **{kw: cache})
                token = out.logits[:, -1:].argmax(-1)
                position.add_(1)

            for _ in range(args.decode_warmup):
                step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            decode_s = time.perf_counter() - t0
            row.update(decode_steps=steps, decode_ms_per_token=decode_s * 1e3 / max(steps, 1),
                       decode_tokens_per_s=steps / decode_s)
            if device.type == "cuda":
                row["decode_peak_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
            del cache
    finally:
        if handle is not None:
            handle.unpatch()
        release(device)
    return row


def run_e2e(args, device, rows: List[dict], save: Callable[[], None]) -> None:
    """Appends one row per (context, cache) to `rows`, calling `save` after each."""
    t0 = time.perf_counter()
    model = build_model(args, device)
    sync(device)
    print(f"[e2e] model built in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)",
          file=sys.stderr, flush=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    warm = torch.randint(3, vocab, (1, args.warmup_context), generator=g).to(device)
    for name in args.caches if args.warmup_context else ():  # warm-up: kernels, handles
        try:
            run_cache(model, warm, name, args, device, steps=1)
        except Exception:  # noqa: BLE001 - the timed run reports it
            traceback.print_exc()
    for context in args.contexts:
        ids = torch.randint(3, vocab, (1, context), generator=g).to(device)
        for name in args.caches:
            print(f"[e2e] context {context}, cache {name} ...", file=sys.stderr, flush=True)
            try:
                row = run_cache(model, ids, name, args, device, steps=args.decode_steps)
            except Exception as e:  # noqa: BLE001 - one failing config must not stop the others
                traceback.print_exc()
                row = dict(cache=name, context=context,
                           error=f"{type(e).__name__}: {e}".splitlines()[0])
                release(device)
            rows.append(row)
            save()
            print(f"    {json.dumps(row)}", file=sys.stderr, flush=True)
    del model
    release(device)


def format_e2e(rows: List[dict]) -> str:
    full = {r["context"]: r for r in rows if r.get("cache") == "full" and "error" not in r}
    lines = ["| context | cache | prefill ms | compress ms | compress share | decode tok/s | "
             "vs full | KV cache MB | prefill peak MB | decode peak MB |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['context']} | {r['cache']} | ERROR: {r['error']} |")
            continue
        base = full.get(r["context"])
        speedup = (f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x"
                   if base else "-")
        lines.append(
            f"| {r['context']} | {r['cache']} | {r['prefill_ms']:.0f} | "
            f"{r.get('compress_ms', 0):.1f} | {100 * r.get('compress_share', 0):.2f}% | "
            f"{r['decode_tokens_per_s']:.1f} | {speedup} | {r['kv_cache_MB']:.0f} | "
            f"{r.get('prefill_peak_MB', 0):.0f} | {r.get('decode_peak_MB', 0):.0f} |")
    return "\n".join(lines)


# -- targets ------------------------------------------------------------------------------------

def evaluate_targets(op_rows: List[dict], e2e_rows: List[dict]) -> List[dict]:
    """The GPU issue's targets, each at the size it names (or the nearest one measured)."""
    targets = []

    def add(name, value, limit, met):
        targets.append(dict(target=name, value=value, limit=limit,
                            met=None if value is None else bool(met)))

    ops_ok = [r for r in op_rows if "op_ms" in r]
    op32 = min(ops_ok, key=lambda r: abs(r["N"] - 32768)) if ops_ok else None
    value = op32["op_over_floor"] if op32 else None
    add(f"compress within 2x of the copy floor (N={op32['N'] if op32 else 32768})", value,
        "<= 2.0x", value is not None and value <= 2.0)
    value = op32.get("baseline_over_op") if op32 else None
    add(f"compress >= 20x faster than the official-style baseline "
        f"(N={op32['N'] if op32 else 32768})", value, ">= 20x",
        value is not None and value >= 20)

    ok = [r for r in e2e_rows if "error" not in r]
    if ok:
        largest = max(r["context"] for r in ok)
        at = {r["cache"]: r for r in ok if r["context"] == largest}
    else:
        largest, at = 131072, {}
    shares = [r["compress_share"] for r in ok if "compress_share" in r]
    value = max(shares) if shares else None
    add("compression < 3% of prefill (worst measured context and cache)", value, "< 3%",
        value is not None and value < 0.03)
    full, uniform, headwise = at.get("full"), at.get("uniform"), at.get("headwise")
    value = (uniform["decode_tokens_per_s"] / full["decode_tokens_per_s"]
             if full and uniform else None)
    add(f"decode at {largest} tokens, budget uniform >= 3x full-cache tokens/s", value, ">= 3x",
        value is not None and value >= 3)
    value = (uniform["decode_tokens_per_s"] / headwise["decode_tokens_per_s"]
             if uniform and headwise else None)
    add(f"head-wise decode within 1.5x of uniform sdpa decode ({largest} tokens; "
        "uniform tok/s / head-wise tok/s)", value, "<= 1.5x", value is not None and value <= 1.5)
    return targets


def format_targets(targets: List[dict]) -> str:
    lines = ["| target | measured | limit | met |", "|---|---:|---:|---|"]
    for t in targets:
        v = t["value"]
        text = "-" if v is None else (f"{100 * v:.2f}%" if "%" in t["limit"] else f"{v:.2f}x")
        met = {None: "not measured", True: "yes", False: "**NO**"}[t["met"]]
        lines.append(f"| {t['target']} | {text} | {t['limit']} | {met} |")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--out", type=Path, default=Path("results/bench_gpu"),
                   help="folder for bench_gpu.json")
    p.add_argument("--quick", action="store_true",
                   help="contexts 8K and 32K, op at N=32768 only, fewer repeats and steps")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes and model (the CPU smoke run of every code path)")
    p.add_argument("--skip-ops", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-check", action="store_true",
                   help="skip bench_ops' kept-token agreement check (op vs reference vs baseline "
                        "at N=640) before the op timings")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--op-n", type=int, nargs="+", default=None, metavar="N")
    p.add_argument("--op-budget", type=int, default=None, help="default 2048 (tiny: 64)")
    p.add_argument("--op-repeats", type=int, default=None, help="default 30 (quick 15, tiny 2)")
    p.add_argument("--slow-repeats", type=int, default=None,
                   help="repeats of the reference and the baseline (default 3, tiny 1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-impls", nargs="*", default=[], choices=("reference", "baseline"))
    p.add_argument("--contexts", type=int, nargs="+", default=None, metavar="TOKENS")
    p.add_argument("--caches", nargs="+", default=list(CACHES), choices=CACHES)
    p.add_argument("--e2e-budget", type=int, default=None, help="default 2048 (tiny: 64)")
    p.add_argument("--decode-steps", type=int, default=None, help="default 32 (quick 16, tiny 3)")
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--warmup-context", type=int, default=None,
                   help="prompt length of the untimed warm-up run of each cache (default 4096; "
                        "tiny 160; 0: none)")
    args = p.parse_args(argv)
    tiny, quick = args.tiny, args.quick
    if args.op_n is None:
        args.op_n = [256, 512] if tiny else [32768] if quick else [32768, 131072]
    if args.op_budget is None:
        args.op_budget = 64 if tiny else 2048
    if args.op_repeats is None:
        args.op_repeats = 2 if tiny else 15 if quick else 30
    if args.slow_repeats is None:
        args.slow_repeats = 1 if tiny else 3
    if args.contexts is None:
        args.contexts = [192, 320] if tiny else [8192, 32768] if quick else [32768, 131072]
    if args.e2e_budget is None:
        args.e2e_budget = 64 if tiny else 2048
    if args.decode_steps is None:
        args.decode_steps = 3 if tiny else 16 if quick else 32
    if args.warmup_context is None:
        args.warmup_context = 160 if tiny else 4096
    if tiny:
        args.warmup = min(args.warmup, 1)
    for name, budget in (("--op-budget", args.op_budget), ("--e2e-budget", args.e2e_budget)):
        if budget <= args.window:
            p.error(f"{name} ({budget}) must exceed --window ({args.window})")
    return args


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parents[1], timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()} CPU")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(sys.argv), torch=torch.__version__, cuda=torch.version.cuda,
                device=where, python=platform.python_version(), commit=_git_commit(),
                library=str(mixkv.LIBRARY_PATH), args={k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in vars(args).items()})
    print(f"mixkv bench_gpu: torch {torch.__version__} (CUDA {torch.version.cuda}), {where}",
          flush=True)
    started = time.perf_counter()
    op_rows: List[dict] = []
    e2e_rows: List[dict] = []
    result = dict(meta=meta, ops=op_rows, e2e=e2e_rows, targets=[])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_gpu.json"

    def save():  # after every row: a run cut short by a timeout still leaves its numbers
        result["targets"] = evaluate_targets(op_rows, e2e_rows)
        meta["wall_s"] = time.perf_counter() - started
        path.write_text(json.dumps(result, indent=2))

    save()
    if not args.skip_ops:
        run_ops(args, device, op_rows, save)
    if not args.skip_e2e:
        run_e2e(args, device, e2e_rows, save)
    save()
    targets = result["targets"]

    if op_rows:
        print(f"\n## (a) per-layer compress, B=1, budget {args.op_budget}, W={args.window}, "
              f"median of {args.op_repeats} "
              f"({'CUDA events' if device.type == 'cuda' else 'perf_counter'})\n")
        print(format_ops(op_rows))
    if e2e_rows:
        print(f"\n## (b) end to end, budget {args.e2e_budget}, {args.decode_steps} decode steps "
              "(B=1, greedy, hand-written loop)\n")
        print(format_e2e(e2e_rows))
    print("\n## targets\n")
    print(format_targets(targets))
    print(f"\n{meta['wall_s']:.0f} s; results written to {path}")
    return result


if __name__ == "__main__":
    main()
