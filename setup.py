"""Builds mixkv's op library through CMake (CMakeLists.txt is the one build of record).

The library holds only TORCH_LIBRARY registrations (no pybind11, no libpython), is copied to
mixkv/_C.<ext-suffix> and loaded with torch.ops.load_library. CUDA kernels are built when torch
has CUDA and nvcc is found (set MIXKV_WITH_CUDA=0/1 to force); TORCH_CUDA_ARCH_LIST or
CMAKE_CUDA_ARCHITECTURES chooses the architectures (default: 90).

torch is not a build requirement (an isolated build would download a multi-GB CUDA torch): the
build uses the torch already installed, and without one every pip hook stops at once, before
any download, with one line saying what to run. Under pip's build isolation (its PYTHONPATH hides
the target environment) the torch of the environment pip installs into is found by running the
same interpreter without that PYTHONPATH; nothing of that environment enters this process: only
subprocesses of that interpreter import torch (the probe below and the CMake configure).

The package is versioned by the torch it is built against (0.1.0+torch2.13.0.cpu) and requires
exactly that torch (torch==2.13.0+cpu: never PyPI's CUDA build of 2.13.0); mixkv/_build_info.py,
written beside the library, records it for the check at import (mixkv/__init__.py).
Importing this file runs nothing but definitions (tests/test_packaging.py imports its helpers).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "scripts"))
import buildtools  # noqa: E402  (the build tools at the versions the build needs)

MIN_TORCH = (2, 11)
BUILD_INFO = "_build_info.py"
NEEDS_NO_TORCH = {"--help", "-h", "--help-commands"}  # `setup.py --help` works without torch
# Run by the interpreter that has torch; its last line of output is the JSON.
PROBE = ("import json, torch; "
         "print(json.dumps({'version': str(torch.__version__), 'cuda': torch.version.cuda}))")


def base_version() -> str:
    """mixkv's own version, __version__ in mixkv/__init__.py (read: importing mixkv needs the
    library this file builds)."""
    text = (ROOT / "mixkv" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def wheel_version(base: str, torch_version: str) -> str:
    """mixkv's version with the torch it is built against as its local part (PEP 440: lowercase
    alphanumerics joined by dots): ("0.1.0", "2.13.0+cpu") -> "0.1.0+torch2.13.0.cpu"."""
    local = re.sub(r"[^a-z0-9]+", ".", f"torch{torch_version}".lower()).strip(".")
    return f"{base}+{local}"


def torch_requirement(torch_version: str) -> str:
    """The one torch the library loads in, local label included: "torch==2.13.0+cpu" matches
    only that CPU build, so installing the wheel can never pull a CUDA torch in its place
    (a torch without a local label, e.g. "2.13.0", pins "torch==2.13.0")."""
    return f"torch=={torch_version}"


def too_old(torch_version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    return match is None or (int(match[1]), int(match[2])) < MIN_TORCH


def install_hint(python: str, found: str) -> str:
    """The one line printed when the build cannot start: what is missing and what to run."""
    want = ".".join(map(str, MIN_TORCH))
    return (f"mixkv: building needs torch >= {want} already installed ({python}: {found}): "
            f"pip install 'torch>={want}', then pip install --no-build-isolation .")


def find_torch(python: str = sys.executable, environ=None):
    """(info, env): the torch the build uses ({"version", "cuda"}) and the environment in which
    `python` imports it; SystemExit with install_hint when it has none or too old a one.

    Tried first as this process runs (PYTHONPATH included), then without PYTHONPATH: pip's build
    isolation hides the target environment's site-packages through a sitecustomize on
    PYTHONPATH, so the second try finds the torch of the environment pip installs into. Other
    frontends isolate in a separate venv (python -m build, uv): no torch there, the hint says
    --no-build-isolation."""
    environ = dict(os.environ if environ is None else environ)
    tries = [environ]
    if "PYTHONPATH" in environ:
        tries.append({k: v for k, v in environ.items() if k != "PYTHONPATH"})
    for env in tries:
        out = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True,
                             timeout=600)
        if out.returncode == 0:
            info = json.loads(out.stdout.strip().splitlines()[-1])
            if too_old(info["version"]):
                sys.exit(install_hint(python, f"torch {info['version']}"))
            return info, env
    lines = out.stderr.strip().splitlines()
    sys.exit(install_hint(python, lines[-1] if lines else f"exit status {out.returncode}"))


def build_info_text(torch_info: dict, with_cuda: bool, version: str) -> str:
    return ("# Written by setup.py beside the op library it built (not in git): the torch that\n"
            "# library was built against, checked by mixkv/__init__.py before it is loaded.\n"
            f"TORCH_VERSION = {torch_info['version']!r}\n"
            f"TORCH_CUDA = {torch_info['cuda']!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n"
            f"VERSION = {version!r}\n")


def _want_cuda(torch_cuda) -> bool:
    forced = os.environ.get("MIXKV_WITH_CUDA")
    if forced is not None:
        return forced not in ("0", "", "OFF", "off")
    if torch_cuda is None:
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
    """build_ext through CMake, for the torch found by find_torch (set by main)."""

    torch_info: dict = {}
    torch_env: dict = {}  # the environment in which sys.executable imports that torch
    version = ""

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        # Every tool runs where torch was found: under pip's build isolation, without its
        # PYTHONPATH (a pip-installed cmake or ninja is a Python script of that environment).
        if "PYTHONPATH" not in self.torch_env:
            os.environ.pop("PYTHONPATH", None)
        build_dir = ROOT / "build" / "cmake"
        cuda = _want_cuda(self.torch_info["cuda"])
        definitions = ["-DCMAKE_BUILD_TYPE=Release", f"-DMIXKV_WITH_CUDA={'ON' if cuda else 'OFF'}",
                       f"-DMIXKV_OUTPUT={output}"]
        try:
            buildtools.find("cmake")  # its error is one line: say it here, not after a traceback
            if cuda:
                definitions += [f"-DCMAKE_CUDA_ARCHITECTURES={_cuda_architectures()}",
                                f"-DCMAKE_CUDA_COMPILER={buildtools.find('nvcc')}"]
        except buildtools.ToolError as err:
            sys.exit(str(err))
        # Configured by the interpreter that imports torch (buildtools reads its CMake prefix).
        configure = subprocess.run([sys.executable, str(ROOT / "scripts" / "buildtools.py"),
                                    "configure", str(build_dir), *definitions])
        if configure.returncode != 0:
            sys.exit(f"mixkv: configuring {build_dir} failed (exit status {configure.returncode})")
        if not output.exists():
            # CMake copies the library to MIXKV_OUTPUT when it links it: an up-to-date library
            # whose copy was removed (e.g. build/lib deleted) must be linked again.
            for linked in build_dir.glob("libmixkv_ops.*"):
                linked.unlink()
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        buildtools.build(build_dir, "--target", "mixkv_ops", "-j", jobs)
        if not output.exists():
            sys.exit(f"mixkv: the build left no op library at {output}")
        self.build_info = output.parent / BUILD_INFO
        self.build_info.write_text(build_info_text(self.torch_info, cuda, self.version))
        print(f"mixkv: built {'CPU+CUDA' if cuda else 'CPU'} op library for torch "
              f"{self.torch_info['version']} -> {output}", file=sys.stderr)

    def copy_extensions_to_source(self):
        """In place (pip install -e, setup.py build_ext --inplace): the build info goes into the
        tree with the library."""
        super().copy_extensions_to_source()
        package_dir = self.get_finalized_command("build_py").get_package_dir("mixkv")
        self.copy_file(str(self.build_info), os.path.join(package_dir, BUILD_INFO))


def main():
    base = base_version()
    if sys.argv[1:] and set(sys.argv[1:]) <= NEEDS_NO_TORCH:
        version, requires = base, []
    else:
        CMakeBuild.torch_info, CMakeBuild.torch_env = find_torch()
        version = CMakeBuild.version = wheel_version(base, CMakeBuild.torch_info["version"])
        requires = [torch_requirement(CMakeBuild.torch_info["version"])]
    setup(version=version, install_requires=requires,
          ext_modules=[Extension("mixkv._C", sources=[])], cmdclass={"build_ext": CMakeBuild})


if __name__ == "__main__":  # python setup.py ..., and setuptools' PEP 517 backend
    main()
