"""Fixtures of the op tests (tests/ops): the shared ones (inputs, shape cases, comparisons) are
in tests/conftest.py."""

import pytest


@pytest.fixture(params=["auto", "generic"])
def cpu_kernels(request, monkeypatch):
    """The CPU ops' inner loops: the run-time choice (AVX2+FMA where the CPU has it) and the
    portable ones (csrc/cpu/row_kernels.h); modules opt in with usefixtures."""
    monkeypatch.setenv("MIXKV_CPU_KERNELS", request.param)
    return request.param
