"""Builds mixkv's op library through CMake (CMakeLists.txt is the one build of record).

The library holds only TORCH_LIBRARY registrations (no pybind11, no libpython), is copied to
mixkv/_C.<ext-suffix> and loaded with torch.ops.load_library. CUDA kernels are built when torch
has CUDA and nvcc is found (set MIXKV_WITH_CUDA=0/1 to force); TORCH_CUDA_ARCH_LIST or
CMAKE_CUDA_ARCHITECTURES chooses the architectures (default: 90).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _want_cuda(torch) -> bool:
    forced = os.environ.get("MIXKV_WITH_CUDA")
    if forced is not None:
        return forced not in ("0", "", "OFF", "off")
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def _cuda_architectures() -> str:
    if "CMAKE_CUDA_ARCHITECTURES" in os.environ:
        return os.environ["CMAKE_CUDA_ARCHITECTURES"]
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    return ";".join(a.replace(".", "").replace("+PTX", "") for a in arch_list.replace(";", " ").split())


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch  # imported here so that `setup.py --help` works without torch

        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        build_dir = ROOT / "build" / "cmake"
        cuda = _want_cuda(torch)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DMIXKV_WITH_CUDA={'ON' if cuda else 'OFF'}",
            f"-DMIXKV_OUTPUT={output}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        if cuda:
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_architectures()}")
        cache = build_dir / "CMakeCache.txt"
        if cache.exists() and ("Ninja" in cache.read_text()) != shutil.which("ninja") is not None:
            shutil.rmtree(build_dir)  # generator changed
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "mixkv_ops", "-j", jobs],
                       check=True)
        print(f"mixkv: built {'CPU+CUDA' if cuda else 'CPU'} op library -> {output}", file=sys.stderr)


setup(ext_modules=[Extension("mixkv._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
