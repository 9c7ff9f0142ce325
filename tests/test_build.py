"""Properties of the built op library that no op result shows."""

import shutil
import subprocess
import sys

import pytest

import mixkv


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="reads the ELF dynamic section with readelf")
def test_op_library_links_an_openmp_runtime():
    """at::parallel_for is a header template: a build without OpenMP compiles every CPU loop to
    run on one thread, silently (the ops stay correct, only ~2x slower on 2 cores)."""
    dynamic = subprocess.run(["readelf", "-d", str(mixkv.LIBRARY_PATH)], capture_output=True,
                             text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert any("omp" in lib for lib in needed), needed  # libgomp, libiomp5, libomp
