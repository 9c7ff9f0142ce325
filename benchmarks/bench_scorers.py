"""Cost of each scorer next to SnapKV's, and the extra prefill cost of KVzip's reconstruction pass.

Two parts, each side by side in one run on the same inputs, implementations interleaved round by
round, medians over the repeats after one warm-up round (docs/design.md section 10):

1. Per layer (one middle decoder layer of the model, captured from a real prefill of N tokens):
   ``Method.compress`` of snapkv (the fused op), tova, knorm, streamingllm, expected_attention,
   kvzip (its pass's scores given: random, the selection's cost does not depend on them) and
   kvzap (its surrogate applied to the layer's hidden states: the shipped one, random with
   --tiny), each at budget N/2; plus "kvzip pass scoring", the attention scores the
   reconstruction pass adds to that layer's calls (every chunk, prompt included; random
   queries and re-read keys: the cost does not depend on their values). The rest of the pass is the model's own forward
   over the prompt and the context, measured in part 2.
2. End to end: a prefill of N tokens alone, and under ``mixkv.patch`` with each method at
   budget N/2 (the prefill, then for kvzip the reconstruction pass, then the compression of
   every layer; kvzap scores each layer from its hidden states, captured by the patch). The
   ratio to the prefill alone is the compression's share.

    python benchmarks/bench_scorers.py                          # default model, 1K and 4K
    python benchmarks/bench_scorers.py --lengths 1024 --repeats 5
    python benchmarks/bench_scorers.py --tiny --lengths 96 --repeats 1   # smoke (tests)

The script prints the CPU-seconds other processes used while it ran (a shared machine slows
any single figure; ratios of interleaved rounds suffer less).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))   # the checkout this script belongs to, installed or not
sys.path.insert(1, str(HERE))
import mixkv  # noqa: E402
from bench_ops import ForeignLoad, _cpu_model  # noqa: E402

from mixkv import methods as M  # noqa: E402
from mixkv.hf import reconstruct  # noqa: E402
from mixkv.hf.capture import capture_prefill  # noqa: E402

LAYER_SCORERS = ("snapkv", "tova", "knorm", "streamingllm", "expected_attention", "kvzip",
                 "kvzap")
WINDOW = 32


TINY = "tiny random Llama (4 layers, 8/2 heads, D 32)"


def tiny_llama():
    """The smoke runs' model (this script's and bench_kvzip_pass.py's): a seeded tiny Llama
    and a text -> ids stand-in for a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=8192)
    return LlamaForCausalLM(config).eval(), lambda text: [3 + ord(c) % 500 for c in text]


def _load(args):
    if args.tiny:
        model, encode = tiny_llama()
        return model, TINY, encode
    from mixkv.eval.models import load_model

    em = load_model(args.model)
    return em.model, em.name, em.encode


def _options(model, name: str, tiny: bool) -> dict:
    """A method's options here: a random kvzap surrogate for the tiny model (none ships)."""
    return dict(weights=M.kvzap.random_weights(model)) if tiny and "kvzap" in name else {}


def _cache_kw(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def _prompt(model, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(10, min(model.config.vocab_size, 20000), (1, n), generator=g)


def _forward(model, ids, cache) -> None:
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_kw(model): cache})


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _interleaved(fns: Dict[str, Callable], repeats: int, warmup: int) -> Dict[str, float]:
    """Median milliseconds of each function, rounds interleaved, after `warmup` rounds."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(repeats + warmup):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def per_layer(model, encode, n: int, repeats: int, warmup: int, tiny: bool = False
              ) -> Dict[str, float]:
    """Milliseconds of each scorer's compression of one middle layer (budget n/2)."""
    decoder, modules = mixkv.hf.find_attention_modules(model)
    layer = len(modules) // 2
    ids = _prompt(model, n)
    cache = _new_cache(model)
    with capture_prefill(model, WINDOW, hidden_states=True) as captured:
        _forward(model, ids, cache)
    budget = n // 2
    plan = M.KVzip().reconstruction_plan(encode)
    module = modules[layer]
    keys = cache.layers[layer].keys
    B, Hkv, _, D = keys.shape
    prefill = M.Prefill(queries=captured.queries[layer], keys=cache.layers[layer].keys,
                        values=cache.layers[layer].values, key_mask=None, window=WINDOW,
                        layer=layer, num_layers=len(modules), scaling=module.scaling,
                        module=module, decoder=decoder,
                        hidden_states=captured.hidden_states[layer],
                        reconstruction=torch.rand(B, Hkv, n, generator=torch.Generator()
                                                  .manual_seed(1)))
    fns = {}
    for name in LAYER_SCORERS:
        method = M.resolve(name, budget=budget, window=WINDOW, **_options(model, name, tiny))
        fns[name] = lambda m=method: m.compress(prefill, budget)
    # what the reconstruction pass adds to this layer's attention calls: the softmax scores
    Hq = captured.queries[layer].shape[1]
    R, m = len(plan["prompt_ids"]), plan["chunk_size"]
    g = torch.Generator().manual_seed(0)
    chunks = []
    for start in range(0, n, m):
        fed = R + min(m, n - start)
        q = torch.randn(B, Hq, fed, D, generator=g).to(keys.dtype)
        k = torch.cat([keys, torch.randn(B, Hkv, fed, D, generator=g).to(keys.dtype)], 2)
        chunks.append((q, k, torch.ones(B, n + fed, dtype=torch.bool),
                       torch.ones(B, fed, dtype=torch.bool)))

    def pass_scoring():
        out = torch.zeros(B, Hkv, n)
        for q, k, key_real, query_real in chunks:
            reconstruct.max_attention(q, k, n, key_real, query_real, module.scaling, None, out)

    fns["kvzip pass scoring"] = pass_scoring
    return _interleaved(fns, repeats, warmup)


def end_to_end(model, encode, n: int, repeats: int, warmup: int, methods, tiny: bool = False
               ) -> Dict[str, float]:
    """Milliseconds of a prefill alone and under the patch with each method (budget n/2)."""
    ids = _prompt(model, n)
    fns = {"prefill": lambda: _forward(model, ids, _new_cache(model))}
    for name in methods:
        options = _options(model, name, tiny)
        if M.needs_reconstruction(name):
            options["repeat_prompt"] = M.KVzip().prompt_ids(encode)
            options["chunk_prompt"] = list(encode(M.kvzip.CHUNK_PROMPT))

        def run(name=name, options=options):
            with mixkv.patch(model, name, budget=n // 2, window=WINDOW, **options):
                _forward(model, ids, _new_cache(model))
        fns[name] = run
    return _interleaved(fns, repeats, warmup)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a packaged model or a local folder "
                        "(default: the evaluation's default model)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama instead")
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (per length)")
    parser.add_argument("--long-repeats", type=int, default=1,
                        help="timed end-to-end rounds at lengths above 2048 (no warm-up "
                        "round there: the first length warmed everything up)")
    parser.add_argument("--methods", default="snapkv,tova,expected_attention,kvzip,kvzap")
    parser.add_argument("--long-methods", default="snapkv,kvzip,kvzap",
                        help="end-to-end methods at lengths above 2048")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, name, encode = _load(args)
    load = ForeignLoad()
    started = time.perf_counter()
    rows = []
    for i, n in enumerate(int(x) for x in args.lengths.split(",")):
        layer_ms = per_layer(model, encode, n, args.repeats, warmup=1, tiny=args.tiny)
        long = n > 2048
        methods = (args.long_methods if long else args.methods).split(",")
        rounds = args.long_repeats if long else args.repeats
        e2e_ms = end_to_end(model, encode, n, rounds, 0 if long and i else 1, methods,
                            tiny=args.tiny)
        rows.append(dict(N=n, per_layer_ms=layer_ms, end_to_end_ms=e2e_ms,
                         end_to_end_rounds=rounds, per_layer_rounds=args.repeats))
        print(f"N={n}: per layer {json.dumps({k: round(v, 2) for k, v in layer_ms.items()})}; "
              f"end to end {json.dumps({k: round(v) for k, v in e2e_ms.items()})}", flush=True)
    other = load.report()
    layers = len(mixkv.hf.find_attention_modules(model)[1])
    print(f"\nmodel: {name} ({layers} layers); {_cpu_model()}; torch {torch.__version__}, "
          f"{args.threads} thread(s); {time.perf_counter() - started:.0f} s; python "
          f"{platform.python_version()}")
    if other is not None:
        print(f"other processes used {other[0] / other[1]:.2f} cores on average during the run")
    print("\n| N | scorer (one layer, budget N/2) | ms | / snapkv | rounds |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        base = row["per_layer_ms"]["snapkv"]
        for scorer, ms in row["per_layer_ms"].items():
            print(f"| {row['N']} | {scorer} | {ms:.2f} | {ms / base:.2f}x | "
                  f"{row['per_layer_rounds']} |")
    print("\n| N | end to end (budget N/2) | ms | / prefill | extra over the prefill | "
          "rounds |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        base = row["end_to_end_ms"]["prefill"]
        for method, ms in row["end_to_end_ms"].items():
            share = "" if method == "prefill" else f"{(ms - base) / base:+.0%}"
            print(f"| {row['N']} | {method} | {ms:.0f} | {ms / base:.2f}x | {share} | "
                  f"{row['end_to_end_rounds']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=name, threads=args.threads,
                                                   rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
