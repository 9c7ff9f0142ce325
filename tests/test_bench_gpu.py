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


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """benchmarks/gpu_check.sh, the one prepared GPU run, end to end on the CPU: every stage
    runs and succeeds (the CUDA tests are collected, the benchmarks run tiny on the CPU), and
    the summary table comes last, so the script cannot rot between GPU sessions."""
    import os
    import subprocess

    bench = ("--device cpu --tiny --op-n 256 --op-repeats 1 --slow-repeats 1 --contexts 160 "
             "--decode-steps 2 --decode-warmup 1 --warmup-context 0 --skip-check")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SKIP_BUILD="1",
               GPU_CHECK_BENCH_ARGS=bench, GPU_CHECK_PYTEST_ARGS="--collect-only",
               GPU_CHECK_TIME_SCALE="10")  # stage limits are sized for the H200 machine
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    stages = [line.split("\t") for line in (tmp_path / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == ["env", "build", "test_cuda_ops", "test_ragged_attention",
                                      "test_hf_multidevice", "bench_ops", "bench_e2e"]
    assert all(s[1] == "0" for s in stages), stages
    summary = done.stdout[done.stdout.rindex("SUMMARY"):]
    assert "CUDA kernels: 0/10 ops" in summary  # the CPU build has none, and says so
    tests = summary[summary.index("\ntests:"):]
    for name in ("test_cuda_ops", "test_ragged_attention", "test_hf_multidevice"):
        line = next(l for l in tests.splitlines() if l.strip().startswith(name))
        assert "collected" in line and int(line.split()[1]) > 0, line
    assert "N=   256: op" in summary and "160 headwise" in summary
    assert "ERROR" not in summary, summary  # a benchmark configuration raised (see its log)
    assert summary.count("MET]") == 5, summary  # all five targets measured and judged
    assert done.stdout.rstrip().endswith(str(tmp_path))
