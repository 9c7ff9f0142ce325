"""The README's demo and the benchmarks run end to end (small sizes)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_demo_prints_every_method():
    text = run("-m", "mixkv.demo", "--tokens", "300", "--budget", "64", "--layers", "2")
    for method in ["attn (uniform)", "vnorm (uniform)", "keydiff (uniform)", "mix3 (uniform)",
                   "mixkv (uniform)", "mixkv + adakv"]:
        assert method in text
    assert "64" in text.split("mixkv (uniform)")[1].splitlines()[0]  # 64 kept per head


def test_op_benchmark_quick_run():
    text = run("benchmarks/bench_ops.py", "--quick", "--skip-check")
    assert "| model | N | dtype | op ms | reference ms | baseline ms |" in text
    assert text.count("| SmolLM2-135M |") >= 2 and text.count("| Llama-3-8B |") >= 2


def test_scorer_benchmark_quick_run():
    text = run("benchmarks/bench_scorers.py", "--tiny", "--lengths", "96", "--repeats", "1")
    assert "| 96 | kvzip pass scoring |" in text and "| 96 | expected_attention |" in text
    assert "| 96 | kvzip |" in text and "| 96 | prefill |" in text
    assert "| 96 | kvzap |" in text


def test_kvzip_pass_benchmark_quick_run(tmp_path):
    """Fused and unfused passes side by side; both give the same scores and keep the same
    tokens (the tiny prompt is re-read in 3 chunks)."""
    out = tmp_path / "pass.json"
    text = run("benchmarks/bench_kvzip_pass.py", "--tiny", "--lengths", "96", "--repeats", "1",
               "--json", str(out))
    assert "| N | prefill ms | pass fused ms | pass unfused ms |" in text
    row = next(line for line in text.splitlines() if line.startswith("| 96 |"))
    assert row.rstrip().endswith("| 100.00% |")
    import json

    result = json.loads(out.read_text())["results"][0]
    assert result["max_relative_score_difference"] < 1e-4 and result["tokens"] == 96
