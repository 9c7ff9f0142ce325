"""Packaging: the torch check at import (mixkv/__init__.py) and setup.py's version, pin and
fail-fast logic. scripts/wheel_check.sh builds and installs the real wheel (CI)."""

import ctypes
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import mixkv

from helpers import exactly

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
RUNNING = str(torch.__version__)
INSTALLED_HINT = ("rebuild it against this torch: pip install --no-build-isolation . in a mixkv "
                  "checkout, or install the mixkv wheel built for this torch")


def load_setup():
    """setup.py as a module: its helpers, without running setup()."""
    spec = importlib.util.spec_from_file_location("mixkv_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup_py():
    return load_setup()


def broken_library(folder: Path) -> Path:
    """A file named like the op library that the loader rejects (it is no ELF file)."""
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"_C{SUFFIX}"
    library.write_bytes(b"not a shared library\n" * 8)
    return library


# --- mixkv/__init__.py: the torch the library was built for --------------------------------


def test_another_torch_release_is_refused_before_the_library_is_loaded(tmp_path):
    library = broken_library(tmp_path / "site-packages" / "mixkv")  # loading it would fail
    with pytest.raises(ImportError, match=exactly(
            f"mixkv: the op library {library} was built for torch 2.11.0+cu130, but torch "
            f"{RUNNING} is imported; {INSTALLED_HINT}")):
        mixkv._load_library(library.parent, built_for="2.11.0+cu130")


def test_in_a_checkout_the_rebuild_command_names_it(tmp_path):
    (tmp_path / "setup.py").write_text("")
    (tmp_path / "CMakeLists.txt").write_text("")
    library = broken_library(tmp_path / "mixkv")
    with pytest.raises(ImportError, match=exactly(
            f"mixkv: the op library {library} was built for torch 1.0.0, but torch {RUNNING} is "
            f"imported; rebuild it against this torch: pip install --no-build-isolation -e "
            f"{tmp_path}")):
        mixkv._load_library(library.parent, built_for="1.0.0")


@pytest.mark.parametrize("local", ["", "+cpu", "+cu130", "+rocm7.0"])
def test_only_the_public_version_is_compared(local):
    """A CPU-built library loads in a CUDA torch of the same release: +cpu/+cu130 never refuse."""
    public = RUNNING.split("+")[0]
    assert mixkv._load_library(mixkv.LIBRARY_PATH.parent, built_for=public + local) \
        == mixkv.LIBRARY_PATH


def test_without_build_info_the_library_loads_unchecked():
    """A library built by CMake directly records no torch: it is loaded as it is."""
    assert mixkv._load_library(mixkv.LIBRARY_PATH.parent, built_for=None) == mixkv.LIBRARY_PATH


def test_a_library_that_does_not_load_is_explained(tmp_path):
    library = broken_library(tmp_path / "mixkv")
    with pytest.raises(OSError) as loader:
        ctypes.CDLL(str(library))
    with pytest.raises(ImportError, match=exactly(
            f"mixkv: the op library {library} (built for a torch it did not record) does not "
            f"load in torch {RUNNING}: {loader.value}; {INSTALLED_HINT}")) as raised:
        mixkv._load_library(library.parent, built_for=None)
    assert isinstance(raised.value.__cause__, OSError)


@pytest.mark.parametrize("wrapped", [True, False], ids=["torch-wraps-it", "bare"])
def test_an_undefined_symbol_is_explained(tmp_path, monkeypatch, wrapped):
    """What a library built for another torch fails with when no build info stops it first:
    the loader's own error, which torch.ops.load_library wraps in an OSError of its own."""
    library = broken_library(tmp_path / "mixkv")
    cause = OSError(f"{library}: undefined symbol: _ZN3c106detail14torchCheckFailEPKcS2_jRKSs")
    error = OSError(f"Could not load this library: {library}") if wrapped else cause
    error.__cause__ = cause if wrapped else None

    def load_library(path):
        raise error

    monkeypatch.setattr(torch.ops, "load_library", load_library)
    with pytest.raises(ImportError, match=exactly(
            f"mixkv: the op library {library} (built for torch {RUNNING}) does not load in torch "
            f"{RUNNING}: {cause}; {INSTALLED_HINT}")) as raised:
        mixkv._load_library(library.parent, built_for=RUNNING)
    assert raised.value.__cause__ is error


def test_import_with_a_recorded_other_torch_fails_with_one_clear_line(tmp_path):
    """`import mixkv` itself, from a copy of the package whose build info names another torch."""
    package = tmp_path / "mixkv"
    shutil.copytree(ROOT / "mixkv", package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_build_info.py").write_text("TORCH_VERSION = '2.11.0+cu130'\n")
    out = subprocess.run([sys.executable, "-c", "import mixkv"], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"ImportError: mixkv: the op library {package / mixkv.LIBRARY_PATH.name} was built for "
        f"torch 2.11.0+cu130, but torch {RUNNING} is imported; {INSTALLED_HINT}")


def test_the_build_info_of_this_tree_names_the_torch_in_use():
    """setup.py writes it beside the library it builds (absent: built by CMake directly)."""
    info = mixkv.LIBRARY_PATH.parent / "_build_info.py"
    if not info.exists():
        pytest.skip("this op library was not built by setup.py")
    from mixkv import _build_info
    assert _build_info.TORCH_VERSION.split("+")[0] == RUNNING.split("+")[0]


# --- setup.py: the wheel's version and pin -------------------------------------------------


@pytest.mark.parametrize("torch_version, version", [
    ("2.13.0+cpu", "0.1.0+torch2.13.0.cpu"),
    ("2.11.0+cu130", "0.1.0+torch2.11.0.cu130"),
    ("2.13.0", "0.1.0+torch2.13.0"),
    ("2.14.0.dev20260101+cpu", "0.1.0+torch2.14.0.dev20260101.cpu"),
    ("2.12.0a0+git1A2b3c", "0.1.0+torch2.12.0a0.git1a2b3c")])
def test_the_version_carries_the_torch(setup_py, torch_version, version):
    assert setup_py.wheel_version("0.1.0", torch_version) == version
    assert str(Version(version)) == version  # already in PEP 440's normal form


def test_the_version_of_this_build(setup_py):
    assert setup_py.base_version() == mixkv.__version__
    assert setup_py.wheel_version(mixkv.__version__, RUNNING) == \
        f"{mixkv.__version__}+torch{RUNNING.replace('+', '.')}"


def test_the_pin_admits_only_the_torch_built_against(setup_py):
    """torch==2.13.0+cpu: pip can never take PyPI's CUDA 2.13.0 (or a +cu130 build) for it."""
    assert setup_py.torch_requirement("2.13.0+cpu") == "torch==2.13.0+cpu"
    pin = SpecifierSet(setup_py.torch_requirement("2.13.0+cpu").removeprefix("torch"))
    assert [v for v in ["2.13.0+cpu", "2.13.0", "2.13.0+cu130", "2.13.1+cpu"] if v in pin] == \
        ["2.13.0+cpu"]


@pytest.mark.parametrize("torch_version, old", [("2.10.1+cpu", True), ("2.11.0+cu130", False),
                                                ("2.13.0", False), ("3.0.0", False),
                                                ("1.13.1", True), ("nightly", True)])
def test_the_oldest_torch_built_against(setup_py, torch_version, old):
    assert setup_py.too_old(torch_version) is old


def test_the_build_info_records_the_torch(setup_py):
    text = setup_py.build_info_text({"version": "2.11.0+cu130", "cuda": "13.0"}, True,
                                    "0.1.0+torch2.11.0.cu130")
    values = {}
    exec(text, values)
    assert {k: values[k] for k in ("TORCH_VERSION", "TORCH_CUDA", "WITH_CUDA", "VERSION")} == \
        {"TORCH_VERSION": "2.11.0+cu130", "TORCH_CUDA": "13.0", "WITH_CUDA": True,
         "VERSION": "0.1.0+torch2.11.0.cu130"}


# --- setup.py: without torch, pip stops at its first hook ----------------------------------


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A new venv's interpreter: no torch, no setuptools."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def isolated_build_env(tmp_path_factory):
    """A PYTHONPATH as pip's build isolation sets it: a sitecustomize that drops the
    environment's site-packages (torch with them) and adds a site folder of setuptools alone."""
    import setuptools

    folder = tmp_path_factory.mktemp("isolated")
    lib = folder / "lib"
    lib.mkdir()
    site_packages = Path(setuptools.__file__).resolve().parents[1]
    for name in ("setuptools", "setuptools-*.dist-info", "_distutils_hack", "pkg_resources",
                 "distutils-precedence.pth"):  # the dist-info: setuptools' commands' entry points
        for path in site_packages.glob(name):
            (lib / path.name).symlink_to(path)
    (folder / "sitecustomize.py").write_text(
        "import site, sys\n"
        "hidden = {*site.getsitepackages(), site.getusersitepackages()}\n"
        "sys.path[:] = [p for p in sys.path if p not in hidden]\n"
        f"site.addsitedir({str(lib)!r})\n")
    return str(folder)


def hint(python):
    return (f"mixkv: building needs torch >= 2.11 already installed ({python}: "
            f"ModuleNotFoundError: No module named 'torch'): pip install 'torch>=2.11', then "
            f"pip install --no-build-isolation .")


def test_find_torch_without_torch_stops_with_the_hint(setup_py, bare_python):
    with pytest.raises(SystemExit, match=exactly(hint(bare_python))):
        setup_py.find_torch(bare_python, {"PATH": os.environ["PATH"], "PYTHONPATH": "/nowhere"})


def test_find_torch_too_old(setup_py, bare_python, tmp_path):
    fake = tmp_path / "torch"
    (fake / "version").mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '2.10.0+cpu'\nfrom . import version\n")
    (fake / "version" / "__init__.py").write_text("cuda = None\n")
    with pytest.raises(SystemExit, match=exactly(
            f"mixkv: building needs torch >= 2.11 already installed ({bare_python}: torch "
            f"2.10.0+cpu): pip install 'torch>=2.11', then pip install --no-build-isolation .")):
        setup_py.find_torch(bare_python, {"PYTHONPATH": str(tmp_path)})


def pep517(python, hook, env_path, *args):
    """Run one PEP 517 hook of setuptools' backend in the source tree, as pip does."""
    code = f"from setuptools import build_meta; print(build_meta.{hook}(*{list(args)!r}))"
    start = time.monotonic()
    out = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": env_path}, timeout=300)
    return out, time.monotonic() - start


def test_pip_install_without_torch_stops_at_its_first_hook(bare_python, isolated_build_env):
    """`pip install .` in a venv without torch: the first hook pip runs (before it resolves or
    downloads anything) exits within seconds, its one line of output saying what to run."""
    out, took = pep517(bare_python, "get_requires_for_build_wheel", isolated_build_env)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [hint(bare_python)]
    assert took < 10


def test_under_build_isolation_the_target_torch_is_found(isolated_build_env, tmp_path):
    """`pip install .` where torch is installed: pip's isolation hides it from the backend;
    setup.py finds it in the environment pip installs into and names the metadata after it."""
    assert subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                          env={**os.environ, "PYTHONPATH": isolated_build_env}).returncode == 1
    before = sorted(p.name for p in ROOT.iterdir())
    out, _ = pep517(sys.executable, "prepare_metadata_for_build_wheel", isolated_build_env,
                    str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    version = f"{mixkv.__version__}+torch{RUNNING.replace('+', '.')}"
    assert out.stdout.strip().splitlines()[-1] == f"mixkv-{version}.dist-info"
    metadata = (tmp_path / f"mixkv-{version}.dist-info" / "METADATA").read_text()
    assert f"\nVersion: {version}\n" in metadata
    assert f"\nRequires-Dist: torch=={RUNNING}\n" in metadata
    assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing written into the tree
