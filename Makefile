# The README's two commands (`make eval`, `make test`); each installs what it needs first
# (scripts/setup.sh). The other targets are conveniences.
PYTHON ?= python3
export PYTHON
# Where `make eval` writes table.md, summary.json, results.csv, plot.png and the resumable
# results.jsonl (rerunning the command resumes; a finished run only rebuilds the reports).
EVAL_OUT ?= results/default
# Extra mixkv-eval options for `make eval` (CI's smoke: EVAL_ARGS="--samples 1 --budgets 256").
EVAL_ARGS ?=

.PHONY: eval test demo notebook setup
eval:
	bash scripts/setup.sh --eval
	$(PYTHON) -m mixkv.eval --out $(EVAL_OUT) $(EVAL_ARGS)

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
