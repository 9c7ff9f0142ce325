"""The built op library: the OpenMP runtime it links and the run-time choice of its CPU kernels."""

import shutil
import subprocess
import sys

import pytest
import torch

import mixkv
from mixkv import ops

from conftest import close, make_inputs


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf")
def test_op_library_links_an_openmp_runtime():
    """at::parallel_for is a header template: a build without OpenMP compiles every CPU loop to
    run on one thread, silently (the ops stay correct, only ~2x slower on 2 cores)."""
    dynamic = subprocess.run(["readelf", "-d", str(mixkv.LIBRARY_PATH)], capture_output=True,
                             text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("omp" in lib for lib in needed), needed  # libgomp, libiomp5, libomp


def test_fast_and_portable_kernels_agree(monkeypatch):
    """AVX2+FMA against the portable row kernels on one Llama-like layer (skips where the CPU or
    the build lacks AVX2+FMA: asking for it then is an error naming the variable)."""
    q, k, v, mask = make_inputs(2, 12, 3, 2100, 128, torch.float32, True, window=16)

    def scores():
        return (ops.window_importance(q, k, mask, 5, "avg", "mean"), ops.value_norm(v, 16, mask),
                *ops.key_diversity(k, 16, mask))

    monkeypatch.setenv("MIXKV_CPU_KERNELS", "generic")
    portable = scores()
    monkeypatch.setenv("MIXKV_CPU_KERNELS", "avx2")
    try:
        fast = scores()
    except RuntimeError as err:
        assert "MIXKV_CPU_KERNELS=avx2" in str(err)
        pytest.skip("no AVX2+FMA here")
    for got, want in zip(fast, portable):
        close(got, want, rel=2e-6)


def test_unknown_cpu_kernels_setting_is_refused(monkeypatch):
    q, k, _, _ = make_inputs(1, 2, 1, 40, 16, torch.float32, False)
    monkeypatch.setenv("MIXKV_CPU_KERNELS", "sse9")
    with pytest.raises(RuntimeError, match="MIXKV_CPU_KERNELS must be 'auto', 'generic' or 'avx2'"):
        ops.window_importance(q, k, None, 5, "avg", "mean")
