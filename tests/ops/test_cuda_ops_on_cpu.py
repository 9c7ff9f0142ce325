"""tests/ops/test_cuda_ops.py in its CPU self-test mode (MIXKV_TEST_DEVICE=cpu), so that the CUDA
test bodies run, and cannot rot, on machines without a GPU. A separate process: the file reads
its device once, at import."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
CUDA_ONLY = 2  # tests that need a CUDA device (kernel registration, allocator poisoning)


@pytest.mark.skipif(os.environ.get("MIXKV_TEST_DEVICE") == "cpu",
                    reason="this run already is the CPU self-test")
def test_cuda_test_bodies_pass_with_the_cpu_as_the_device():
    env = dict(os.environ, MIXKV_TEST_DEVICE="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         str(TESTS / "test_cuda_ops.py")],
        cwd=TESTS.parents[1], env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    skipped = re.search(r"(\d+) skipped", summary)
    assert passed > 100 and (int(skipped.group(1)) if skipped else 0) == CUDA_ONLY, summary
