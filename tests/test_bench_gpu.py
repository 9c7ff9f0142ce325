"""benchmarks/bench_gpu.py: its smoke mode runs every code path on the CPU (tiny layer and
model), and the issue's targets are judged in the right direction."""

import json
import sys

import pytest

from test_scripts import ROOT, run

pytest.importorskip("transformers")
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402


def test_tiny_cpu_run_writes_tables_and_json(tmp_path):
    text = run("benchmarks/bench_gpu.py", "--device", "cpu", "--tiny", "--out", str(tmp_path),
               "--op-n", "256", "--op-repeats", "1", "--slow-repeats", "1", "--contexts", "160",
               "--decode-steps", "2", "--decode-warmup", "1", "--warmup-context", "0",
               "--skip-check")
    assert "| model | N | op ms (again) |" in text and "| tiny | 256 |" in text
    assert "| context | cache | prefill ms |" in text
    assert "## targets" in text and "results written to" in text.rstrip().splitlines()[-1]
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    op = [r for r in result["ops"] if r.get("N") == 256]
    assert op and "error" not in op[0], result["ops"]
    for key in ("op_ms", "copy_ms", "op_over_floor", "reference_over_op", "baseline_over_op"):
        assert op[0][key] > 0, key
    assert op[0]["kept_agreement_with_reference"] == 1.0
    e2e = {r["cache"]: r for r in result["e2e"]}
    assert set(e2e) == {"full", "uniform", "headwise"}
    assert all("error" not in r for r in e2e.values()), result["e2e"]
    assert e2e["uniform"]["kv_cache_MB"] < e2e["full"]["kv_cache_MB"]
    assert e2e["uniform"]["compress_ms"] > 0 and "compress_ms" not in e2e["full"]
    assert len(result["targets"]) == 5
    assert all(t["met"] is not None for t in result["targets"])


def test_targets_are_judged_in_the_right_direction():
    ops = [dict(N=32768, op_ms=1.0, op_over_floor=1.5, baseline_over_op=25.0),
           dict(N=131072, op_ms=4.0, op_over_floor=3.0, baseline_over_op=5.0)]
    e2e = [dict(cache="full", context=131072, decode_tokens_per_s=10.0, prefill_ms=1000),
           dict(cache="uniform", context=131072, decode_tokens_per_s=40.0, prefill_ms=1000,
                compress_share=0.01),
           dict(cache="headwise", context=131072, decode_tokens_per_s=20.0, prefill_ms=1000,
                compress_share=0.05),
           dict(cache="full", context=32768, error="boom")]
    met = [t["met"] for t in bench_gpu.evaluate_targets(ops, e2e)]
    assert met == [True, True, False, True, False]
    assert [t["met"] for t in bench_gpu.evaluate_targets([], [])] == [None] * 5
    table = bench_gpu.format_targets(bench_gpu.evaluate_targets(ops, e2e))
    assert "| 1.50x | <= 2.0x | yes |" in table and "5.00%" in table
