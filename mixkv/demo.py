"""Compress a random KV cache shaped like SmolLM2-135M and show what was kept and how long it took.

    python -m mixkv.demo [--tokens 4096] [--budget 512] [--layers 30]

No model needed (``make demo``): it runs every mix mode with uniform budgets and MixKV with
head-wise (AdaKV) budgets through ``torch.ops.mixkv``.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import ops
from .constants import DEFAULT_WINDOW
from .methods import MODES, AdaKV

# SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, head dim 64.
HQ, HKV, HEAD_DIM = 9, 3, 64


def random_layer(tokens: int, window: int, generator: torch.Generator):
    """Keys with a shared direction per head (real keys are redundant) and a few outlier tokens
    that the window queries attend to, so importance has something to find."""
    shared = torch.randn(1, HKV, 1, HEAD_DIM, generator=generator)
    keys = torch.randn(1, HKV, tokens, HEAD_DIM, generator=generator) + 1.5 * shared
    values = torch.randn(1, HKV, tokens, HEAD_DIM, generator=generator)
    q = torch.randn(1, HQ, window, HEAD_DIM, generator=generator)
    hot = torch.randint(0, tokens - window, (8,), generator=generator)
    keys[:, :, hot] += 3.0 * q.view(1, HKV, -1, HEAD_DIM).mean(2, keepdim=True)
    return q.bfloat16(), keys.bfloat16(), values.bfloat16(), hot


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(args.seed)
    layers = [random_layer(args.tokens, args.window, g) for _ in range(args.layers)]
    full_bytes = sum(k.nbytes + v.nbytes for _, k, v, _ in layers)
    print(f"random bf16 KV cache: {args.layers} layers x {HKV} KV heads x {args.tokens} tokens x "
          f"{HEAD_DIM} dims = {full_bytes / 2**20:.1f} MiB; budget {args.budget} tokens per head "
          f"(window {args.window})\n")
    print(f"{'method':<22}{'ms / layer':>11}{'kept / head':>13}{'MiB after':>11}"
          f"{'hot tokens kept':>17}   layer 0, head 0 kept positions")
    runs = [(f"{mode} (uniform)", dict(mode=mode)) for mode in MODES]
    runs.append(("mixkv + adakv", dict(mode="mixkv", policy=AdaKV.op_policy)))
    for name, options in runs:
        start = time.perf_counter()
        outputs = [ops.compress(q, k, v, budget=args.budget, window=args.window, **options)
                   for q, k, v, _ in layers]
        ms = (time.perf_counter() - start) * 1e3 / args.layers
        kept_bytes = sum(out[0].nbytes + out[1].nbytes for out in outputs)
        hot_kept, hot_total = 0, 0
        for (_, _, _, hot), out in zip(layers, outputs):
            hot_kept += sum(int((out[2].flatten() == h).any()) for h in hot.unique())
            hot_total += len(hot.unique())
        first = outputs[0][2]
        head0 = (first[0, 0] if first.dim() > 1 else first[: outputs[0][3][1]]).tolist()
        per_head = (first.shape[-1] if first.dim() > 1
                    else f"{outputs[0][3].diff().min().item()}-{outputs[0][3].diff().max().item()}")
        shown = ", ".join(map(str, head0[:6])) + f", ... {head0[-1]}"
        print(f"{name:<22}{ms:>11.2f}{per_head!s:>13}{kept_bytes / 2**20:>11.2f}"
              f"{hot_kept:>10}/{hot_total:<6}   [{shown}]")
    print("\nhot tokens: keys planted to match the window queries (kept by any head of their "
          "layer);\nimportance-based modes find them, keydiff keeps the keys furthest from each "
          "head's mean direction instead.")


if __name__ == "__main__":
    main()
