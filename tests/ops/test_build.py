"""The built op library: the OpenMP runtime it links and the run-time choice of its CPU kernels."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mixkv
from mixkv import ops

from helpers import close, make_inputs


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


# --- The build tools (scripts/buildtools.py): chosen by version, never by mere presence. -------

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import buildtools  # noqa: E402


def fake_tool(folder, name, version_text):
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{version_text}'\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("text, taken", [("cmake version 3.25.1", False),  # Debian 12's
                                         ("cmake version 3.26.0", True),
                                         ("cmake version 4.1.2", True),
                                         ("garbage", False)])
def test_cmake_is_taken_only_at_its_minimum_version(tmp_path, monkeypatch, text, taken):
    empty = tmp_path / "venv-bin"
    empty.mkdir()
    monkeypatch.setattr(buildtools.sysconfig, "get_path", lambda name: str(empty))
    monkeypatch.setenv("PATH", str(tmp_path))
    cmake = fake_tool(tmp_path, "cmake", text)
    if taken:
        assert buildtools.find("cmake") == str(cmake)
    else:
        with pytest.raises(buildtools.ToolError, match=r"cmake >= 3\.26; found .*cmake \("):
            buildtools.find("cmake")


def test_the_environments_cmake_comes_before_the_paths(tmp_path, monkeypatch):
    venv_bin, path_bin = tmp_path / "venv-bin", tmp_path / "path-bin"
    venv_bin.mkdir(), path_bin.mkdir()
    monkeypatch.setattr(buildtools.sysconfig, "get_path", lambda name: str(venv_bin))
    monkeypatch.setenv("PATH", str(path_bin))
    fake_tool(path_bin, "cmake", "cmake version 3.25.1")
    assert "cmake>=3.26" in str(pytest.raises(buildtools.ToolError, buildtools.find, "cmake").value)
    pip_cmake = fake_tool(venv_bin, "cmake", "cmake version 4.1.2")  # what setup.sh installs
    fake_tool(venv_bin, "ctest", "ctest version 4.1.2")
    assert buildtools.find("cmake") == str(pip_cmake)
    assert buildtools.find("ctest") == str(venv_bin / "ctest")  # always the cmake's own


def test_nvcc_release_is_read_from_its_banner(tmp_path, monkeypatch):
    monkeypatch.setattr(buildtools.sysconfig, "get_path", lambda name: str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_tool(tmp_path, "nvcc", "nvcc: NVIDIA (R) Cuda compiler driver\\nCuda compilation tools, "
              "release 11.8, V11.8.89")
    with pytest.raises(buildtools.ToolError, match=r"nvcc >= 12\.0; found .*\(11\.8\)"):
        buildtools.find("nvcc")


@pytest.mark.skipif(not Path("/usr/bin/cmake").exists(), reason="no system cmake")
def test_debian_cmake_never_configures_the_cuda_check(tmp_path):
    """The failure a brand-new Debian 12 machine hit: its cmake 3.25.1 configured the CPU
    library, then stopped at the CUDA sources ("CUDA20 ... does not support this"). The build
    now states the CMake it needs; the cmake this environment builds with (setup.sh installs one
    when the PATH's is older) configures the CUDA compile check."""
    system = buildtools.version_of("/usr/bin/cmake")
    prefix = f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"
    cuda = ["-DMIXKV_CUDA_COMPILE_CHECK=ON"] if shutil.which("nvcc") else []
    if system < buildtools.MINIMUM["cmake"]:
        old = subprocess.run(["/usr/bin/cmake", "-S", str(ROOT), "-B", str(tmp_path / "old"),
                              prefix, *cuda], capture_output=True, text=True)
        assert old.returncode != 0
        assert "CMake 3.26 or higher is required" in old.stderr, old.stderr
    chosen = buildtools.find("cmake")
    assert buildtools.version_of(chosen) >= buildtools.MINIMUM["cmake"]
    new = subprocess.run([chosen, "-S", str(ROOT), "-B", str(tmp_path / "new"), prefix, *cuda],
                         capture_output=True, text=True)
    assert new.returncode == 0, new.stderr[-3000:]


def test_a_build_folder_is_reused_by_the_same_cmake(tmp_path):
    """setup.py and scripts/test.sh share build/cmake: configuring it again with the same cmake
    keeps what was built (a pip-installed cmake records its real binary in the cache, not the
    wrapper script buildtools finds, so paths must not be compared)."""
    build = tmp_path / "build"
    buildtools.configure(build)
    (build / "kept.marker").write_text("built objects live here")
    buildtools.configure(build)
    assert (build / "kept.marker").exists()
