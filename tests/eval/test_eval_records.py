"""The typed result record (mixkv/eval/records.py) and results.jsonl: the rows written by
earlier mixkv versions (the committed benchmarks/*/results.jsonl) read and written back key for
key, unknown keys kept, optional fields absent when unset, and a run writing exactly the keys,
in the order, main's engine and runner wrote."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from mixkv.eval.records import Result  # noqa: E402
from mixkv.eval.runner import RunConfig, load_records, load_results, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "benchmarks").rglob("results.jsonl"))
# The keys main's HF engine and runner wrote, in order (a needle row).
MAIN_KEYS = [
    "output", "output_tokens", "decoding", "score", "target_greedy", "nll", "nll_full",
    "delta_nll", "top1_agree", "kl", "sample_id", "task", "method", "budget", "ratio", "mode",
    "window", "prompt_tokens", "context_tokens", "kv_ratio", "compress_seconds", "seconds",
    "answers", "metric", "depth", "model", "haystack", "prefill_seconds", "seed", "length",
    "settings"]


def same(a, b):
    """Equal, NaN equal to NaN (a corpus row's score)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_rows_read_and_write_back_key_for_key(path):
    rows = load_records(path)
    assert rows
    for row in rows:
        result = Result.from_json(row)
        assert not result.extra, sorted(result.extra)     # every key is a known field
        back = result.to_json()
        assert list(back) == list(row)
        assert all(same(back[k], row[k]) for k in row)
        assert json.dumps(back) == json.dumps(row)


def test_unknown_keys_are_kept_after_the_known_ones_and_optional_ones_stay_absent():
    row = dict(output="x", score=1.0, future_field=[1, 2], sample_id="s", task="t",
               method="full", settings=dict(a=1))
    result = Result.from_json(row)
    assert result.extra == {"future_field": [1, 2]} and result.settings == {"a": 1}
    back = result.to_json()
    assert list(back)[-1] == "future_field" and back["future_field"] == [1, 2]
    for name in ("target_greedy", "kl", "decode_budget", "engine", "document"):
        assert name not in back          # optional: absent when unset
    assert back["budget"] is None and back["compress_seconds"] is None   # always written
    # Read access by key, as the dict records had.
    assert result["output"] == "x" and {**result}["future_field"] == [1, 2]
    with pytest.raises(KeyError):
        result["kl"]


def test_a_vllm_result_writes_main_s_keys():
    """The vLLM engine's records had no fidelity keys and ``engine`` after ``depth``."""
    result = Result(output="a", output_tokens=1, decoding="eos", score=1.0, sample_id="s",
                    task="t", method="snapkv", budget=64, mode="aware", window=32,
                    prompt_tokens=10, context_tokens=10, kv_ratio=0.5, seconds=1.0,
                    answers=["a"], metric="contains_all", engine="vllm")
    keys = list(result.of_run(model="m", haystack="task", prefill_seconds=None, seed=0,
                              length=None, settings={}).to_json())
    main = [k for k in MAIN_KEYS if k not in (
        "target_greedy", "nll", "nll_full", "delta_nll", "top1_agree", "kl")]
    after_depth = main.index("depth") + 1
    assert keys == main[:after_depth] + ["engine"] + main[after_depth:]


def test_a_run_writes_main_s_keys_and_resumes_from_its_rows(tmp_path):
    from test_eval_engine import W, tiny_eval_model

    config = RunConfig(tasks=["niah_single"], lengths=[160], samples=1, methods=["snapkv"],
                       budgets=[24], window=W, out=str(tmp_path), progress=False, quiet=True)
    em = tiny_eval_model()
    run(config, em=em)
    rows = load_records(tmp_path / "results.jsonl")
    assert [list(row) for row in rows] == [MAIN_KEYS] * 2
    results = load_results(tmp_path / "results.jsonl")
    assert [r.to_json() for r in results] == rows and results[1].method == "snapkv"
    assert dataclasses.replace(results[1], extra={}) == results[1]
    run(config, em=em)                   # everything recorded: nothing appended
    assert load_records(tmp_path / "results.jsonl") == rows
