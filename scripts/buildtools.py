"""The build tools mixkv needs, at the versions it needs, found and run from one place.

    python scripts/buildtools.py find cmake|ctest|ninja|nvcc   print the tool to use (exit 1: why not)
    python scripts/buildtools.py spec cmake|ninja              print the PyPI requirement that provides it
    python scripts/buildtools.py configure BUILD_DIR [-D...]   cmake -S <repo> -B BUILD_DIR ...
    python scripts/buildtools.py build BUILD_DIR [args]        cmake --build BUILD_DIR args
    python scripts/buildtools.py ctest BUILD_DIR               ctest in BUILD_DIR

setup.py imports this file; scripts/setup.sh installs from PyPI a tool that `find` rejects;
scripts/test.sh builds and runs the C++ tests through it. A tool is looked for first beside the
running Python (a venv's pip-installed cmake, even when the venv is not activated), then on the
PATH, and is taken only at or above its minimum version: the presence of a tool proves nothing
(Debian 12's cmake 3.25.1 configures the CPU library and then fails on the CUDA sources).
"""

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Why each minimum: CMake 3.26 is the first that knows nvcc's C++20 flag (CUDA_STANDARD 20;
# torch >= 2.10 headers are C++20); Ninja 1.10 is what CMake's Ninja generator asks for its
# dependency handling; nvcc 12.0 is the first with C++20 device code.
MINIMUM = {"cmake": (3, 26), "ninja": (1, 10), "nvcc": (12, 0)}
PIP_SPEC = {"cmake": "cmake>=3.26", "ninja": "ninja>=1.10"}


class ToolError(RuntimeError):
    pass


def version_of(path: str) -> tuple:
    """(major, minor[, patch]) of a tool from its --version text (nvcc: its 'release X.Y')."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    match = re.search(r"release (\d+\.\d+)", text) or re.search(r"(\d+(?:\.\d+)+)", text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _candidates(tool: str):
    beside_python = Path(sysconfig.get_path("scripts")) / tool
    if beside_python.is_file():
        yield str(beside_python)
    on_path = shutil.which(tool)
    if on_path:
        yield on_path


def find(tool: str) -> str:
    """Path of the first `tool` at or above MINIMUM[tool]; ToolError naming what was found."""
    if tool == "ctest":  # always the one that came with the chosen cmake
        cmake = find("cmake")
        ctest = Path(cmake).with_name("ctest")
        if not ctest.is_file():
            raise ToolError(f"mixkv: no ctest beside {cmake}")
        return str(ctest)
    if tool not in MINIMUM:
        raise ToolError(f"mixkv: unknown build tool {tool!r} (known: ctest, {', '.join(MINIMUM)})")
    minimum = MINIMUM[tool]
    seen = []
    for path in _candidates(tool):
        version = version_of(path)
        if version and version >= minimum:
            return path
        seen.append(f"{path} ({'.'.join(map(str, version)) or 'unknown version'})")
    want = ".".join(map(str, minimum))
    found = "; found " + ", ".join(seen) if seen else "; none found"
    hint = (f": `pip install '{PIP_SPEC[tool]}'` or run scripts/setup.sh" if tool in PIP_SPEC
            else "")
    raise ToolError(f"mixkv: the build needs {tool} >= {want}{found}{hint}")


def configure(build_dir, *definitions: str) -> None:
    """Configure the CMake build of record in `build_dir` with Ninja when a good one exists.

    A cache written by another cmake version or generator is removed first: CMake refuses to
    reuse it (a pip-installed cmake records its real binary, not the wrapper found here, so the
    version is what is compared)."""
    import torch  # here, so that `find` works without torch

    build_dir = Path(build_dir)
    cmake = find("cmake")
    try:
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={find('ninja')}"]
    except ToolError:
        generator = ["-G", "Unix Makefiles"]
    cache = build_dir / "CMakeCache.txt"
    if cache.exists():
        text = cache.read_text(errors="replace")
        written_by = tuple(int(v) for v in re.findall(
            r"^CMAKE_CACHE_(?:MAJOR|MINOR|PATCH)_VERSION:INTERNAL=(\d+)$", text, re.M))
        if written_by != version_of(cmake)[:3] or \
                f"CMAKE_GENERATOR:INTERNAL={generator[1]}\n" not in text:
            shutil.rmtree(build_dir)
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *generator,
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", *definitions],
                   check=True)


def build(build_dir, *args: str) -> None:
    subprocess.run([find("cmake"), "--build", str(build_dir), *args], check=True)


def main(argv) -> int:
    try:
        if len(argv) == 2 and argv[0] == "find":
            print(find(argv[1]))
        elif len(argv) == 2 and argv[0] == "spec":
            print(PIP_SPEC[argv[1]])
        elif len(argv) >= 2 and argv[0] == "configure":
            configure(argv[1], *argv[2:])
        elif len(argv) >= 2 and argv[0] == "build":
            build(argv[1], *argv[2:])
        elif len(argv) == 2 and argv[0] == "ctest":
            subprocess.run([find("ctest"), "--output-on-failure"], cwd=argv[1], check=True)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except ToolError as err:
        print(err, file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
