# The README's two commands. Both install what they need first (scripts/setup.sh).
PYTHON ?= python3
export PYTHON

.PHONY: demo test setup
demo:
	bash scripts/setup.sh
	$(PYTHON) -m mixkv.demo

test:
	bash scripts/setup.sh --test
	bash scripts/test.sh

setup:
	bash scripts/setup.sh
