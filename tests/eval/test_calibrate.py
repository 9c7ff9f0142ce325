"""mixkv-calibrate on a tiny random Llama with a character tokenizer (no files): the profile's
shape and range, its agreement with the mean pairwise cosine of the cache's keys, determinism,
the saved file used as ``mixkv.patch(..., redundancy=<file>)`` and by the eval harness, the
command line and its heatmap. (The notebook test calibrates the packaged SmolLM2 for real.)"""

import argparse

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import mixkv  # noqa: E402
from mixkv.eval import calibrate  # noqa: E402
from mixkv.eval.models import EvalModel  # noqa: E402
from mixkv.eval.runner import RunConfig, load_records, run as run_eval  # noqa: E402

from hf_models import CharTokenizer, cache_kwarg, llama  # noqa: E402

VOCAB = 128
W = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_em(seed=0):
    model, _ = llama(seed=seed)
    return EvalModel(model=model, tokenizer=CharTokenizer(), name="tiny-llama", source="config",
                     load_seconds=0.0, fixes=[], stop_ids=[], adds_bos=False)


def prompt_ids(length=150, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (length,), generator=g).tolist()


def prefill(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]), use_cache=True, **{cache_kwarg(): cache})
    return cache


def test_profile_shape_range_and_determinism():
    em = tiny_em()
    cal = calibrate.calibrate(em, samples=3, length=96, seed=0, progress=False)
    config = em.model.config
    L, Hkv = config.num_hidden_layers, config.num_key_value_heads
    assert cal.redundancy.shape == (L, Hkv) and cal.per_sample.shape == (3, L, Hkv)
    assert cal.redundancy.dtype == torch.float32
    assert bool(((cal.per_sample >= 0) & (cal.per_sample <= 1)).all())
    torch.testing.assert_close(cal.redundancy, cal.per_sample.mean(0))
    assert cal.meta["tokens"] == [96, 96, 96] and cal.meta["samples"] == 3
    again = calibrate.calibrate(em, samples=3, length=96, seed=0, progress=False)
    assert torch.equal(again.per_sample, cal.per_sample)
    other = calibrate.calibrate(em, samples=3, length=96, seed=1, progress=False)
    assert not torch.equal(other.per_sample, cal.per_sample)


def test_profile_is_the_mean_pairwise_cosine_of_the_prefill_keys():
    em = tiny_em()
    ids = prompt_ids()
    measured = calibrate.profile_from_ids(em.model, [ids], progress=False)[0]
    cache = prefill(em.model, ids)
    for layer in range(measured.shape[0]):
        keys = torch.nn.functional.normalize(cache.layers[layer].keys[0].float(), dim=-1)
        n = keys.shape[1]
        cosines = keys @ keys.transpose(-1, -2)              # [Hkv, n, n]
        expected = ((cosines.sum((-1, -2)) - n) / (n * (n - 1))).clamp(0, 1)
        torch.testing.assert_close(measured[layer], expected, rtol=1e-4, atol=1e-5)


def test_texts_are_cut_to_length_and_read_from_a_folder(tmp_path):
    em = tiny_em()
    texts = calibrate.calibration_texts(2, length=200, seed=0)
    ids = calibrate.encode_texts(em, texts, length=200)
    assert [len(x) for x in ids] == [200, 200] and texts[0] != texts[1]
    assert calibrate.calibration_texts(2, length=200, seed=0) == texts
    (tmp_path / "a.txt").write_text("Alpha beta gamma. Delta epsilon! Zeta eta theta? Iota.")
    from_dir = calibrate.calibration_texts(3, length=50, seed=0, text_dir=str(tmp_path))
    assert all(set(t.split()) <= set("Alpha beta gamma. Delta epsilon! Zeta eta theta? "
                                     "Iota.".split()) for t in from_dir)
    with pytest.raises(ValueError, match="samples"):
        calibrate.calibrate(em, samples=0)


def _patched_prefill(model, ids, **options):
    with mixkv.patch(model, "mixkv", budget=40, window=W, **options) as handle:
        cache = prefill(model, ids)
        method = handle.method
    return cache, method


def test_saved_profile_is_what_a_mixkv_patch_uses(tmp_path):
    em = tiny_em()
    ids = prompt_ids()
    # Calibrated on this very prompt, the offline profile equals the online redundancy: the
    # patch must then keep exactly the tokens it keeps online.
    measured = calibrate.profile_from_ids(em.model, [ids], progress=False)
    cal = calibrate.Calibration(measured[0], measured)
    path = calibrate.save(cal, tmp_path / "profile.pt")
    online, _ = _patched_prefill(em.model, ids)
    offline, method = _patched_prefill(em.model, ids, redundancy=str(path))
    torch.testing.assert_close(method.redundancy, cal.redundancy)
    for a, b in zip(online.layers, offline.layers):
        assert a.keys.shape[-2] == 40
        torch.testing.assert_close(a.keys, b.keys)
    # Another profile changes the kept tokens (the patch really reads the file).
    flipped = calibrate.save(calibrate.Calibration(1.0 - cal.redundancy,
                                                   (1.0 - cal.redundancy)[None]),
                             tmp_path / "flipped.pt")
    changed, method = _patched_prefill(em.model, ids, redundancy=flipped)
    torch.testing.assert_close(method.redundancy, 1.0 - cal.redundancy)
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(online.layers, changed.layers))
    # A profile for another model is refused with the shapes in the message.
    wrong = tmp_path / "wrong.pt"
    calibrate.save(calibrate.Calibration(torch.zeros(3, 2), torch.zeros(1, 3, 2)), wrong)
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        _patched_prefill(em.model, ids, redundancy=str(wrong))


def test_load_round_trip_and_bare_tensor(tmp_path):
    cal = calibrate.Calibration(torch.rand(4, 2), torch.rand(3, 4, 2), dict(model="m", seed=5))
    loaded = calibrate.load(calibrate.save(cal, tmp_path / "x.pt"))
    assert torch.equal(loaded.redundancy, cal.redundancy)
    assert torch.equal(loaded.per_sample, cal.per_sample)
    assert loaded.meta == dict(model="m", seed=5)
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    assert set(raw) >= {"redundancy", "per_sample", "std", "model", "seed"}
    torch.save(torch.full((4, 2), 0.5), tmp_path / "bare.pt")
    assert calibrate.load(tmp_path / "bare.pt").redundancy.shape == (4, 2)


def test_eval_harness_takes_the_profile(tmp_path):
    em = tiny_em()
    cal = calibrate.calibrate(em, samples=1, length=64, progress=False)
    path = calibrate.save(cal, tmp_path / "p.pt")
    config = RunConfig(tasks=["passkey"], lengths=[160], samples=1, methods=["mixkv"],
                       budgets=[24], window=W, out=str(tmp_path / "eval"), progress=False,
                       quiet=True, redundancy=str(path))
    run_eval(config, em=em)
    records = load_records(tmp_path / "eval" / "results.jsonl")
    assert sorted(r["method"] for r in records) == ["full", "mixkv"]


def test_command_line_writes_profile_and_heatmap(tmp_path, capsys):
    em = tiny_em()
    out = tmp_path / "cal" / "tiny.pt"
    args = calibrate.parser().parse_args(["--samples", "2", "--length", "64", "--out", str(out),
                                          "--no-progress", "--quiet", "--threads", "1"])
    result = calibrate.run(args, em=em)
    png = out.with_suffix(".png")
    assert result["profile"] == out and result["plot"] == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    loaded = calibrate.load(out)
    assert loaded.redundancy.shape == (2, 2) and loaded.meta["samples"] == 2
    printed = capsys.readouterr().out
    assert f"profile: {out}" in printed and f"heatmap: {png}" in printed
    defaults = calibrate.parser().parse_args([])
    assert (defaults.samples, defaults.length, defaults.chat) == (calibrate.DEFAULT_SAMPLES,
                                                                  calibrate.DEFAULT_LENGTH, True)


def test_heatmap_and_refusals(tmp_path):
    fig = calibrate.heatmap(torch.rand(30, 3), tmp_path / "h.png", title="t")
    assert (tmp_path / "h.png").exists() and len(fig.axes) == 2  # the map and its colorbar
    with pytest.raises(ValueError, match="layers, kv_heads"):
        calibrate.heatmap(torch.rand(3))
    em = tiny_em()
    with mixkv.patch(em.model, "mixkv", budget=40, window=W):
        with pytest.raises(RuntimeError, match="unpatch"):
            calibrate.profile_from_ids(em.model, [prompt_ids()], progress=False)


def test_console_script_is_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["mixkv-calibrate"] == "mixkv.eval.calibrate:main"
    assert isinstance(calibrate.parser(), argparse.ArgumentParser)
