"""The README's "Patch a model" example runs as written, on a local folder holding a tiny random
Llama and a word-level tokenizer built here (no downloads)."""

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(name):
    text = README.read_text()
    block = text.split(f"<!-- readme-example: {name} -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def _local_model_folder(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> a long document and the question . ... x y z".split()
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         eos_token_id=2, pad_token_id=0, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(path)


def test_patch_example_runs(tmp_path, capsys):
    _local_model_folder(tmp_path)
    code = _example("patch").replace('"path/to/local/model"', repr(str(tmp_path)))
    code = code.replace("A long document ... and the question.",
                        " ".join(["a long document x y z"] * 40) + " and the question .")
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "bytes_before" in printed and "ratio" in printed
