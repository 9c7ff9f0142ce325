"""The README's "Use with kvpress" example runs as written (on the packaged SmolLM2, loaded
once for the session), and kvpress's pipeline really compresses with mixkv's presses."""

import contextlib
import io
import re
from pathlib import Path

from transformers import DynamicCache, pipeline

import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)
from kvpress import AdaKVPress

from mixkv.eval import models
from mixkv.kvpress import MixKVPress

README = Path(__file__).resolve().parents[2] / "README.md"


def _example():
    text = README.read_text()
    return re.search(r"<!-- readme-example: kvpress -->\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_kvpress_example_runs(smollm2, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: smollm2)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_example(), "README.md:kvpress", "exec"), {"__name__": "__readme__"})
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 2, out.getvalue()


def test_pipeline_compresses_the_context(smollm2):
    pipe = pipeline("kv-press-text-generation", model=smollm2.model, tokenizer=smollm2.tokenizer)
    context = "The access code for the archive is 4817. " + "Nothing else happened. " * 30
    lengths = {}
    # (PerLayerCompressionPress needs flash attention in kvpress's pipeline, whose decoding mask
    # is sized by one layer; test_kvpress_presses runs it on a plain forward.)
    for name, press in [("none", None), ("mixkv", MixKVPress(compression_ratio=0.5))]:
        cache = DynamicCache()
        pipe(context, question="What is the access code?", press=press, cache=cache,
             max_new_tokens=2)
        lengths[name] = [cache.get_seq_length(i) for i in range(len(cache))]
    n = lengths["none"][0]
    assert all(length == n for length in lengths["none"]) and n > 150
    assert all(length == int(n * 0.5) for length in lengths["mixkv"])
    # AdaKVPress masks instead of removing: the cache keeps its length.
    cache = DynamicCache()
    pipe(context, question="What is the access code?", press=AdaKVPress(
        MixKVPress(compression_ratio=0.5)), cache=cache, max_new_tokens=2)
    assert cache.get_seq_length(0) == n
