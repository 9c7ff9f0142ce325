"""The kvpress integration is optional: without kvpress, ``import mixkv.kvpress`` says how to get
it (tests/kvpress, run by scripts/kvpress_test.sh in kvpress's own environment, tests the rest);
and the shim warns on a transformers older than the oldest it supports."""

import importlib.metadata
import sys
import warnings

import pytest

pytest.importorskip("transformers")

from mixkv.hf import check_transformers_version  # noqa: E402


def test_import_without_kvpress_names_the_fix(monkeypatch):
    try:
        importlib.metadata.distribution("kvpress")
        pytest.skip("kvpress is installed")
    except importlib.metadata.PackageNotFoundError:
        pass
    # tests/kvpress is on sys.path as a namespace package "kvpress": hide it.
    monkeypatch.setitem(sys.modules, "kvpress", None)
    monkeypatch.delitem(sys.modules, "mixkv.kvpress", raising=False)
    with pytest.raises(ImportError, match=r"mixkv.kvpress needs NVIDIA kvpress \(`pip install "
                                          r"kvpress`, which pins transformers>=4.56,<5.3"):
        import mixkv.kvpress  # noqa: F401


@pytest.mark.parametrize("version, supported", [("5.3.0", True), ("5.24.0", True),
                                                ("6.0.0.dev0", True), ("5.2.0", False),
                                                ("4.57.6", False), ("unknown", False)])
def test_transformers_version_check(version, supported):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_transformers_version(version) is supported
    assert len(caught) == (0 if supported else 1)
    if not supported:
        assert str(caught[0].message) == (
            f"mixkv: transformers {version} is older than 5.3, the oldest the shim supports "
            "(README 'Supported versions'); with kvpress, whose transformers is older, use "
            "mixkv.kvpress's presses")
        if "mutmut" not in sys.modules:  # mutation runs add frames outside mixkv
            assert caught[0].filename == __file__            # the caller's line, not mixkv's


def test_installed_transformers_is_supported():
    assert check_transformers_version()
