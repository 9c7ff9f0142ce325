"""Per-layer compression benchmark: the fused op against the reference and an official-style baseline.

For each configuration (model layer shape x prompt length N x dtype) three implementations of the
same MixKV compression (mode "mixkv", uniform capacities, online redundancy, avg pooling k=5, GQA
mean) run side by side in one process, on the same inputs, interleaved round by round:

  op        torch.ops.mixkv.compress(q_window, keys, values, None, budget, W)  (the fused kernel)
  reference mixkv.reference.compress(...)                                       (pure PyTorch spec)
  baseline  official_style_compress(...) below: written the way the official MixKV code works
            (per-KV-head Python loop, full sort of the scores, fp32 attention through repeat_kv +
            matmul + softmax + mean + avg_pool1d, statistics per head, gather + torch.cat)

Each figure is the median over the repeats, after one warm-up call. Before timing, the kept
indices of all three are compared (as sets per head) on a small input; a mismatch aborts the run.

    python benchmarks/bench_ops.py                      # full CPU run (docs/design.md section 10)
    python benchmarks/bench_ops.py --quick              # tiny smoke run (tests)
    python benchmarks/bench_ops.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

try:
    import mixkv
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mixkv
import mixkv.reference  # noqa: E402

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is optional
    tqdm = None


@dataclass(frozen=True)
class LayerShape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = (
    LayerShape("Llama-3-8B", 32, 8, 128),
    LayerShape("SmolLM2-135M", 9, 3, 64),
)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
IMPLS = ("op", "reference", "baseline")


# --------------------------------------------------------------------------------------------
# The official-style baseline. Written after the structure of SnapKVCluster.update_kv in the
# official MixKV repository (mixkv/mixkv_utils.py), with the semantics of docs/design.md section 4:
# guarded normalisation instead of +1e-8, online redundancy instead of the Qwen2-VL JSON, the
# "mixkv" mix r*D + (1-r)*(A + V), and a stable sort so ties go to the lower position.
# --------------------------------------------------------------------------------------------

def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * n_rep, N, D], as in transformers' Llama code."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep,
                                                            slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def _normalise_head(score: torch.Tensor, att_mean: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the head's candidates, then rescaled to the mean of the attention."""
    s_min = score.amin(dim=-1, keepdim=True)
    s_max = score.amax(dim=-1, keepdim=True)
    spread = s_max - s_min
    score = torch.where(spread > 0, (score - s_min) / torch.where(spread > 0, spread, 1.0), 0.0)
    s_mean = score.mean(dim=-1, keepdim=True)
    scale = torch.where(s_mean > 0, att_mean / torch.where(s_mean > 0, s_mean, 1.0), 0.0)
    return score * scale


def official_style_compress(query_states: torch.Tensor, key_states: torch.Tensor,
                            value_states: torch.Tensor, key_mask: Optional[torch.Tensor],
                            budget: int, window_size: int, kernel_size: int = 5):
    """MixKV (mode "mixkv", uniform capacity) the way the official code computes it.

    Returns (keys [B, Hkv, budget, D], values, kept indices [B, Hkv, budget]); within a head the
    selected candidates come in descending score order (as the official code leaves them), then
    the window.
    """
    if key_mask is not None:
        raise NotImplementedError("the official-style baseline has no padding support")
    bsz, num_kv_heads, q_len, head_dim = key_states.shape
    num_heads = query_states.shape[1]
    num_key_value_groups = num_heads // num_kv_heads
    capacity = budget - window_size
    valid_len = q_len - window_size
    if q_len <= budget:
        idx = torch.arange(q_len, device=key_states.device).expand(bsz, num_kv_heads, q_len)
        return key_states, value_states, idx

    # attention of the window queries: the matmul in the model's dtype and the softmax in fp32,
    # as the official code does (it then casts back to the model dtype; we stay in fp32)
    key_states_rep = repeat_kv(key_states, num_key_value_groups)
    attn_weights = torch.matmul(query_states[..., -window_size:, :],
                                key_states_rep.transpose(2, 3)).float() / math.sqrt(head_dim)
    mask = torch.full((window_size, window_size), float("-inf"), device=attn_weights.device)
    mask_cond = torch.arange(mask.size(-1), device=attn_weights.device)
    mask.masked_fill_(mask_cond < (mask_cond + 1).view(mask.size(-1), 1), 0)
    attention_mask = mask[None, None, :, :]
    attn_weights[:, :, -window_size:, -window_size:] += attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32)
    attn_weights_mean = attn_weights[:, :, -window_size:, :-window_size].mean(dim=-2)
    attn_weights_mean = attn_weights_mean.view(attn_weights_mean.shape[0], -1,
                                               num_key_value_groups, attn_weights_mean.shape[-1])
    attn_weights_mean = attn_weights_mean.mean(dim=-2)
    attn_cache = F.avg_pool1d(attn_weights_mean, kernel_size=kernel_size,
                              padding=kernel_size // 2, stride=1)

    origin_heads_key_states = torch.split(key_states, 1, dim=1)
    origin_heads_value_states = torch.split(value_states, 1, dim=1)
    head_attn_score = torch.split(attn_cache, 1, dim=1)

    heads_key_states, heads_value_states, heads_indices = [], [], []
    for head_idx in range(num_kv_heads):
        head_keys = origin_heads_key_states[head_idx]                     # [B, 1, N, D]
        head_values = origin_heads_value_states[head_idx]
        attn_score = head_attn_score[head_idx]                            # [B, 1, C]
        att_mean = attn_score.mean(dim=-1, keepdim=True)

        # value norm of the candidates
        vnorm_score = torch.norm(head_values[:, :, :valid_len, :].float(), p=2, dim=-1)
        vnorm_score = _normalise_head(vnorm_score, att_mean)

        # key diversity and the head's redundancy (mean pairwise cosine similarity)
        key_norm = F.normalize(head_keys.float(), dim=-1)
        key_mean = key_norm.sum(dim=2, keepdim=True) / q_len              # [B, 1, 1, D]
        key_sim = torch.matmul(key_norm[:, :, :valid_len, :],
                               key_mean.transpose(-2, -1)).squeeze(-1)   # [B, 1, C]
        key_mean_norm_sq = torch.sum(key_mean ** 2, dim=-1)              # [B, 1, 1]
        redundancy = ((q_len * key_mean_norm_sq - 1) / (q_len - 1)).clamp(0.0, 1.0)
        sim_score = _normalise_head(-key_sim, att_mean)

        importance_score = attn_score + vnorm_score
        combined_score_head = redundancy * sim_score + (1 - redundancy) * importance_score

        _, indices_head = combined_score_head.sort(dim=-1, descending=True, stable=True)
        cache_index = indices_head[..., :capacity]                        # [B, 1, capacity]
        gather_index = cache_index.unsqueeze(-1).expand(-1, -1, -1, head_dim)
        k_past_compress = head_keys[:, :, :-window_size, :].gather(dim=2, index=gather_index)
        v_past_compress = head_values[:, :, :-window_size, :].gather(dim=2, index=gather_index)
        k_cur = head_keys[:, :, -window_size:, :]
        v_cur = head_values[:, :, -window_size:, :]
        heads_key_states.append(torch.cat([k_past_compress, k_cur], dim=2))
        heads_value_states.append(torch.cat([v_past_compress, v_cur], dim=2))
        window_index = torch.arange(valid_len, q_len, device=cache_index.device)
        heads_indices.append(torch.cat([cache_index, window_index.expand(bsz, 1, -1)], dim=2))

    return (torch.cat(heads_key_states, dim=1), torch.cat(heads_value_states, dim=1),
            torch.cat(heads_indices, dim=1))


# --------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------

def make_inputs(shape: LayerShape, n: int, window: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, shape.q_heads, window, shape.head_dim, generator=gen)
    k = torch.randn(1, shape.kv_heads, n, shape.head_dim, generator=gen)
    v = torch.randn(1, shape.kv_heads, n, shape.head_dim, generator=gen)
    # a shared offset makes the keys of a head partly redundant (r > 0), as in real models
    k = k + 0.5 * torch.randn(1, shape.kv_heads, 1, shape.head_dim, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def implementations(budget: int, window: int) -> Dict[str, Callable]:
    return {
        "op": lambda q, k, v: torch.ops.mixkv.compress(q, k, v, None, budget, window),
        "reference": lambda q, k, v: mixkv.reference.compress(q, k, v, None, budget, window),
        "baseline": lambda q, k, v: official_style_compress(q, k, v, None, budget, window),
    }


def _kept_sets(indices: torch.Tensor) -> List[List[frozenset]]:
    idx = indices.detach().to("cpu", torch.int64)
    return [[frozenset(idx[b, h].tolist()) for h in range(idx.shape[1])]
            for b in range(idx.shape[0])]


def check_agreement(device, window: int) -> None:
    """Kept indices of op, reference and baseline must agree (as sets per head) on small inputs."""
    n, budget = 640, 160
    for shape in SHAPES:
        for dname in ("fp32", "bf16"):
            q, k, v = make_inputs(shape, n, window, DTYPES[dname], device, seed=1234)
            results = {name: fn(q, k, v) for name, fn in implementations(budget, window).items()}
            expected = _kept_sets(results["reference"][2])
            # The baseline's logits are rounded to the model dtype (as in the official code), so
            # in bf16 its selection may legitimately differ: it is checked in fp32.
            for name in ("op", "baseline") if dname == "fp32" else ("op",):
                kept = results[name][2]
                if tuple(kept.shape) != (1, shape.kv_heads, budget):
                    raise SystemExit(f"FAIL: {name} kept indices have shape {tuple(kept.shape)}, "
                                     f"expected {(1, shape.kv_heads, budget)} ({shape.name} {dname})")
                got = _kept_sets(kept)
                if got != expected:
                    bad = [h for h in range(shape.kv_heads) if got[0][h] != expected[0][h]]
                    diff = len(got[0][bad[0]] ^ expected[0][bad[0]])
                    raise SystemExit(
                        f"FAIL: {name} kept a different set of tokens than the reference "
                        f"({shape.name}, N={n}, {dname}, budget={budget}): heads {bad}, "
                        f"{diff} positions differ in head {bad[0]}")
                # the kept rows must be the rows at the kept positions
                gather = kept.to(torch.int64)[..., None].expand(-1, -1, -1, shape.head_dim)
                if not (torch.equal(results[name][0], k.gather(2, gather))
                        and torch.equal(results[name][1], v.gather(2, gather))):
                    raise SystemExit(f"FAIL: {name} returned K/V rows that are not the rows at "
                                     f"its kept indices ({shape.name} {dname})")


class ForeignLoad:
    """CPU seconds that other processes used while the benchmark ran (Linux; None elsewhere).

    Timings on a shared machine are only meaningful when this stays near zero."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        if resource is None:
            return None
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - fields[4]  # everything but idle and iowait
        hz = os.sysconf("SC_CLK_TCK")
        own = resource.getrusage(resource.RUSAGE_SELF)
        return busy / hz, own.ru_utime + own.ru_stime, time.perf_counter()

    def report(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(other, 0.0), end[2] - self.start[2]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, args, device) -> float:
    """Milliseconds of one call (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sync(device)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def bench_config(shape: LayerShape, n: int, dname: str, args, device) -> dict:
    q, k, v = make_inputs(shape, n, args.window, DTYPES[dname], device)
    fns = implementations(args.budget, args.window)
    inputs = (q, k, v)
    # warm-up: one call each; its time decides whether a slow implementation gets fewer repeats
    repeats = {}
    for name in IMPLS:
        warm_ms = _time_once(fns[name], inputs, device)
        fit = int(args.max_seconds * 1e3 // max(warm_ms, 1e-3))
        repeats[name] = max(args.min_repeats, min(args.repeats, fit))
    times: Dict[str, List[float]] = {name: [] for name in IMPLS}
    for r in range(max(repeats.values())):
        for name in IMPLS:  # interleaved, so drift affects every implementation alike
            if r < repeats[name]:
                times[name].append(_time_once(fns[name], inputs, device))
    row = {"model": shape.name, "Hq": shape.q_heads, "Hkv": shape.kv_heads, "D": shape.head_dim,
           "N": n, "dtype": dname, "budget": args.budget, "window": args.window}
    for name in IMPLS:
        row[f"{name}_ms"] = statistics.median(times[name])
        row[f"{name}_repeats"] = len(times[name])
    row["reference_over_op"] = row["reference_ms"] / row["op_ms"]
    row["baseline_over_op"] = row["baseline_ms"] / row["op_ms"]
    return row


def format_table(rows: List[dict], repeats: int) -> str:
    head = ("| model | N | dtype | op ms | reference ms | baseline ms | reference/op | "
            "baseline/op |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        def cell(name):
            text = f"{r[name + '_ms']:.2f}"
            return text if r[name + "_repeats"] == repeats else f"{text} ({r[name + '_repeats']}x)"
        lines.append(f"| {r['model']} | {r['N']} | {r['dtype']} | {cell('op')} | "
                     f"{cell('reference')} | {cell('baseline')} | {r['reference_over_op']:.2f}x | "
                     f"{r['baseline_over_op']:.2f}x |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--budget", type=int, default=None,
                   help="tokens kept per head, window included (default 1024; 96 with --quick)")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--n", type=int, nargs="+", default=None, metavar="N",
                   help="prompt lengths (default 4096 16384 32768; 256 512 with --quick)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--models", nargs="+", default=[s.name for s in SHAPES],
                   choices=[s.name for s in SHAPES])
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per implementation, after one warm-up (default 7; 2 with "
                        "--quick)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="an implementation whose warm-up call says its repeats would take longer "
                        "than this gets fewer repeats (reported in the table)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (used by the tests)")
    p.add_argument("--skip-check", action="store_true",
                   help="skip the kept-indices agreement check")
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = 96 if args.quick else 1024
    if args.n is None:
        args.n = [256, 512] if args.quick else [4096, 16384, 32768]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    args.min_repeats = min(args.min_repeats, args.repeats)
    if args.budget <= args.window:
        p.error(f"--budget ({args.budget}) must exceed --window ({args.window})")
    too_short = [n for n in args.n if n <= args.budget]
    if too_short:
        p.error(f"every N must exceed the budget {args.budget} (nothing to compress): {too_short}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu_name = _cpu_model()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name}, {torch.get_num_threads()} threads")
    print(f"mixkv bench_ops: torch {torch.__version__}, {device.type} ({where}); "
          f"B=1, budget={args.budget}, W={args.window}, median of {args.repeats} after 1 warm-up")

    if not args.skip_check:
        check_agreement(device, args.window)
        print("check: op and reference keep the same token sets (N=640, fp32 and bf16), "
              "and so does the baseline (fp32)")

    load = ForeignLoad()
    configs = [(s, n, d) for s in SHAPES if s.name in args.models for n in args.n
               for d in args.dtypes]
    rows = []
    bar = tqdm(total=len(configs), unit="config", file=sys.stderr) if tqdm else None
    for i, (shape, n, dname) in enumerate(configs):
        label = f"{shape.name} N={n} {dname}"
        if bar is not None:
            bar.set_description(label)
        else:
            print(f"[{i + 1}/{len(configs)}] {label} ...", file=sys.stderr, flush=True)
        row = bench_config(shape, n, dname, args, device)
        rows.append(row)
        if bar is not None:
            bar.update(1)
        else:
            print(f"    op {row['op_ms']:.2f} ms, reference {row['reference_ms']:.2f} ms, "
                  f"baseline {row['baseline_ms']:.2f} ms", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()

    foreign = load.report()
    print()
    print(format_table(rows, args.repeats))
    reduced = [(r, name) for r in rows for name in IMPLS if r[f"{name}_repeats"] != args.repeats]
    if reduced:
        print(f"\n(kx) = median of k repeats instead of {args.repeats}: that implementation's "
              f"repeats would have taken more than --max-seconds={args.max_seconds:g} s")
    if foreign is not None:
        other_s, wall_s = foreign
        print(f"\nother processes used {other_s:.1f} CPU-s during the {wall_s:.0f} s of timing "
              f"({other_s / wall_s:.2f} cores on average)"
              + ("" if other_s < 0.5 or other_s / wall_s < 0.1 else
                 ": WARNING, the machine was not quiet, the timings are disturbed"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "device": where, "command": " ".join(sys.argv),
                "repeats": args.repeats, "budget": args.budget, "window": args.window,
                "foreign_cpu_s": foreign[0] if foreign else None,
                "wall_s": foreign[1] if foreign else None}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"\nrows written to {args.json}")
    return rows


if __name__ == "__main__":
    main()
