"""Builds mixkv's op library through CMake (CMakeLists.txt is the one build of record).

The library holds only TORCH_LIBRARY registrations (no pybind11, no libpython), is copied to
mixkv/_C.<ext-suffix> and loaded with torch.ops.load_library. CUDA kernels are built when torch
has CUDA and nvcc is found (set MIXKV_WITH_CUDA=0/1 to force); TORCH_CUDA_ARCH_LIST or
CMAKE_CUDA_ARCHITECTURES chooses the architectures (default: 90).
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
import buildtools  # noqa: E402  (the build tools at the versions the build needs)


def _want_cuda(torch) -> bool:
    forced = os.environ.get("MIXKV_WITH_CUDA")
    if forced is not None:
        return forced not in ("0", "", "OFF", "off")
    if torch.version.cuda is None:
        return False
    try:
        buildtools.find("nvcc")
    except buildtools.ToolError as err:
        print(f"{err}: building the CPU op library only", file=sys.stderr)
        return False
    return True


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
        definitions = ["-DCMAKE_BUILD_TYPE=Release", f"-DMIXKV_WITH_CUDA={'ON' if cuda else 'OFF'}",
                       f"-DMIXKV_OUTPUT={output}"]
        try:
            if cuda:
                definitions += [f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_architectures()}",
                                f"-DCMAKE_CUDA_COMPILER={buildtools.find('nvcc')}"]
            buildtools.configure(build_dir, *definitions)
        except buildtools.ToolError as err:
            sys.exit(str(err))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        buildtools.build(build_dir, "--target", "mixkv_ops", "-j", jobs)
        print(f"mixkv: built {'CPU+CUDA' if cuda else 'CPU'} op library -> {output}", file=sys.stderr)


setup(ext_modules=[Extension("mixkv._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
