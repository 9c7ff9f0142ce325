# The README's two commands (`make eval`, `make test`); each installs what it needs first
# (scripts/setup.sh). The other targets are conveniences.
PYTHON ?= python3
export PYTHON
# Where `make eval` writes table.md, summary.json, results.csv, plot.png and the resumable
# results.jsonl (rerunning the command resumes; a finished run only rebuilds the reports).
EVAL_OUT ?= results/default
# The default report (README "Results"): both regimes side by side, the sanity baselines
# (StreamingLLM, KNorm) beside SnapKV/AdaKV and their "+MixKV", 1,024-token prompts. About 18
# minutes on a busy 2-core machine with one torch thread (benchmarks/eval-default/README.md).
EVAL_DEFAULT = --mode both --methods snapkv,mixkv,adakv,mixkv+adakv,streamingllm,knorm \
	--budgets 128,256,512 --samples 8
# Extra mixkv-eval options, after the defaults so they win (CI's smoke: EVAL_ARGS="--samples 1
# --budgets 256").
EVAL_ARGS ?=
# `make eval-large`: 2,048- and 4,096-token prompts, budgets as ratios, every base, more samples
# (hours on 2 cores; resumable: rerun to continue). Committed outputs: benchmarks/eval-large/.
EVAL_LARGE_OUT ?= results/large
EVAL_LARGE = --mode both --lengths 2048,4096 --budgets "" --ratios 0.5,0.75 --samples 10 \
	--methods "snapkv,mixkv,pyramidkv,mixkv+pyramidkv,adakv,mixkv+adakv,streamingllm,knorm,expected_attention,mixkv(expected_attention),kvzip,mixkv(kvzip),kvzip+adakv,mixkv(kvzip)+adakv"
# `make eval-gemma3`: the second packaged model, Gemma-3-270M (base), on the same prompts and
# ratios, both regimes (its 3 global layers of 18 are compressed; one KV head per layer, so
# AdaKV equals SnapKV and is left out; KVzip too, for time). Installs the model's wheels first.
# Committed outputs: benchmarks/eval-gemma3/.
EVAL_GEMMA3_OUT ?= results/gemma3
EVAL_GEMMA3 = --model gemma3-270m --mode both --lengths 2048,4096 --budgets "" --ratios 0.5,0.75 \
	--samples 10 --methods "snapkv,mixkv,pyramidkv,mixkv+pyramidkv,streamingllm,knorm,expected_attention,mixkv(expected_attention)"

.PHONY: eval eval-large eval-gemma3 test demo notebook setup
eval:
	bash scripts/setup.sh --eval
	$(PYTHON) -m mixkv.eval --out $(EVAL_OUT) $(EVAL_DEFAULT) $(EVAL_ARGS)

eval-large:
	bash scripts/setup.sh --eval
	$(PYTHON) -m mixkv.eval --out $(EVAL_LARGE_OUT) $(EVAL_LARGE) $(EVAL_ARGS)

eval-gemma3:
	bash scripts/setup.sh --eval --gemma3
	$(PYTHON) -m mixkv.eval --out $(EVAL_GEMMA3_OUT) $(EVAL_GEMMA3) $(EVAL_ARGS)

test:
	bash scripts/setup.sh --test
	bash scripts/test.sh

# Compress a random SmolLM2-sized KV cache and show what each mix mode kept (no model needed).
demo:
	bash scripts/setup.sh
	$(PYTHON) -m mixkv.demo

# Re-execute notebooks/quickstart.ipynb and save it with its outputs.
notebook:
	bash scripts/setup.sh --test
	$(PYTHON) notebooks/execute.py notebooks/quickstart.ipynb

setup:
	bash scripts/setup.sh
