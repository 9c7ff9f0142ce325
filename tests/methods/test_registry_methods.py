"""Every registered scorer, plain and inside MixKV, under every registered budget policy, through
``mixkv.patch`` on a tiny Llama: the cases come from the registries (``pytest_generate_tests``),
so a scorer or policy registered anywhere before collection (a test module, a plugin, a package
import) is tested here without editing a list; ``test_a_throwaway_scorer_is_collected`` shows it.

What every method must do, whatever its scores: spend the budget (an unpadded row keeps exactly
``layers x KV heads x budget`` tokens; a uniform policy keeps ``budget`` per head), keep the
window, keep a subsequence of the cached tokens in their order, and generate finite logits."""

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv import methods as M  # noqa: E402

import hf_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W, BUDGET, N, PAD = 8, 24, 64, 20


def _required_options(name: str, model) -> dict:
    """Options without which a part cannot run on the tiny model (the only per-name knowledge
    here): KVzap's weights, KVzip's repeat prompt as ids (no tokenizer), explicit's profile."""
    if name == "kvzap":
        return dict(weights=hf_models.kvzap_weights(model))
    if name == "kvzip":
        return dict(M.kvzip.FORMER, repeat_prompt=[5, 6, 7], chunk_size=32)
    if name == "explicit":
        return dict(profile=torch.tensor([[1.0, 3.0], [2.0, 1.0]]))
    return {}


def pytest_generate_tests(metafunc):
    if {"scorer", "policy", "mixed"} <= set(metafunc.fixturenames):
        cases = [(s, p, mixed) for s, cls in M.SCORERS.items() for p in M.POLICIES
                 for mixed in (False, True) if not (mixed and issubclass(cls, M.Mixer))]
        metafunc.parametrize("scorer,policy,mixed", cases,
                             ids=[f"{'mixkv(' + s + ')' if m else s}+{p}" for s, p, m in cases])


def _batch():
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (2, N), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0
    return ids, mask


@pytest.fixture(scope="module")
def llama():
    model, _ = hf_models.llama()
    ids, mask = _batch()
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{hf_models.cache_kwarg(): full})
    return model, [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]


def _positions(kept: torch.Tensor, full: torch.Tensor) -> list:
    """Where each kept key [k, D] sits among the cached keys [N, D] (exact match; -1: none)."""
    same = (kept[:, None, :] == full[None, :, :]).all(-1)
    return [int(row.nonzero()[0]) if bool(row.any()) else -1 for row in same]


def test_the_registries_are_collected(request):
    ids = {item.callspec.id for item in request.session.items
           if getattr(item, "originalname", "") == "test_every_method_spends_its_budget_and_"
           "keeps_a_window_and_a_subsequence"}
    # mixkv's own parts (a test elsewhere registers a scorer mid-run, after collection)
    for name, cls in M.SCORERS.items():
        if cls.__module__.startswith("mixkv."):
            assert any(i.startswith(name + "+") for i in ids), name
    for policy, cls in M.POLICIES.items():
        if cls.__module__.startswith("mixkv."):
            assert f"snapkv+{policy}" in ids and f"mixkv(tova)+{policy}" in ids, policy


def test_every_method_spends_its_budget_and_keeps_a_window_and_a_subsequence(
        llama, scorer, policy, mixed):
    model, full = llama
    label = f"mixkv({scorer})+{policy}" if mixed else f"{scorer}+{policy}"
    options = {**_required_options(scorer, model), **_required_options(policy, model)}
    ids, mask = _batch()
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mixkv.patch(model, label, budget=BUDGET, window=W, **options) as handle, \
                torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=True,
                           **{hf_models.cache_kwarg(): cache}).logits
            step = model(input_ids=ids[:, -1:],
                         attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1),
                         position_ids=torch.tensor([[N], [N - PAD]]), use_cache=True,
                         **{hf_models.cache_kwarg(): cache}).logits
    assert torch.isfinite(logits).all() and torch.isfinite(step).all()
    method = handle.method
    Hkv, layers = full[0][0].shape[1], len(full)
    kept = torch.stack([s["kept"] for _, s in sorted(handle.stats()["layers"].items())])
    assert kept.shape == (layers, 2, Hkv)                          # [L, B, Hkv]
    if not method.headwise:
        assert bool((kept == BUDGET).all())
    assert int(kept[:, 0].sum()) == layers * Hkv * BUDGET          # the unpadded row
    assert int(kept[:, 1].sum()) <= layers * Hkv * BUDGET
    assert bool((kept >= W).all())
    for idx, layer in enumerate(cache.layers):
        full_keys, full_values = full[idx]
        for s, (keys, values) in enumerate(hf_models.kept_segments(layer)):
            b, h = divmod(s, Hkv)
            keys, values = keys[:-1], values[:-1]                 # the decoded token last
            assert keys.shape[0] == int(kept[idx, b, h])
            where = _positions(keys, full_keys[b, h])
            assert -1 not in where and where == sorted(set(where)), (idx, s)   # a subsequence
            assert where[-W:] == list(range(N - W, N))                          # the window
            assert torch.equal(values, full_values[b, h][where])


def test_a_throwaway_scorer_is_collected(tmp_path):
    """A scorer registered by a plugin that exists only for this test shows up in the cases
    above and passes them: run pytest on this file with it loaded."""
    (tmp_path / "throwaway_scorer.py").write_text(textwrap.dedent("""
        import torch
        from mixkv import methods as M

        @M.register_scorer("throwaway")
        class Throwaway(M.Scorer):
            def score(self, p):
                # the key's first coordinate: any finite score will do
                return p.keys[..., :p.candidates, 0].float().contiguous()
    """))
    tests = Path(__file__).resolve().parents[1]      # hf_models, conftest
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), str(tests), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
         "throwaway_scorer", __file__, "-k", "throwaway and spends", "-rA"],
        capture_output=True, text=True, env=env, cwd=tests.parent, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    passed = [line for line in run.stdout.splitlines() if line.startswith("PASSED")]
    expected = {f"throwaway+{p}" for p in M.POLICIES} | {f"mixkv(throwaway)+{p}"
                                                          for p in M.POLICIES}
    assert {line.split("[", 1)[1].rstrip("]") for line in passed} == expected
