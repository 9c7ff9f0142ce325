"""The kept tokens of every method x base equal main's recorded ones (tests/data/
selections_main.json, written by tests/record_selections.py before the method layer existed):
the method layer changes how methods are built, never what they keep."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import record_selections as rs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDED = json.loads(rs.FIXTURE.read_text())


def test_fixture_covers_every_case():
    expected = {rs.case_key(m, method, base, sized, padded, red)
                for m in rs.MODELS for method, base, red in rs.cases()
                for sized in ("budget", "ratio") for padded in (False, True)}
    assert set(RECORDED) == expected


@pytest.mark.parametrize("model_name", list(rs.MODELS))
def test_kept_tokens_equal_main(model_name):
    builder, seed = rs.MODELS[model_name]
    model, _ = builder(seed=seed)
    differing = []
    for method, base, redundancy_on in rs.cases():
        for sized in ("budget", "ratio"):
            for padded in (False, True):
                key = rs.case_key(model_name, method, base, sized, padded, redundancy_on)
                if rs.run_case(model, method, base, sized, padded, redundancy_on) != RECORDED[key]:
                    differing.append(key)
    assert not differing, f"kept tokens differ from main in {len(differing)} case(s): {differing}"
    # the fixture is not vacuous: compressed layers keep fewer tokens than the prompt
    kept = RECORDED[f"{model_name}/adakv+snapkv/budget/pad"]
    assert any(layer is not None and len(layer[0][0]) < rs.LENGTH for layer in kept)


# ATen's vectorised reductions round differently per instruction set (default, AVX2, AVX-512):
# about 1e-7 of a float32 norm. The recorded positions are machine-independent only while the
# inputs hold no near-ties that rounding could flip; knorm ranks by ATen's norm, so its scores
# are checked here (the attention-based scores come from mixkv's own kernels, and .ci/run
# replays the fixture under ATEN_CPU_CAPABILITY=default and avx2 besides the machine's own).
NORM_GAP = 1e-6


@pytest.mark.parametrize("model_name", list(rs.MODELS))
def test_inputs_hold_no_key_norm_near_ties(model_name):
    from transformers import DynamicCache

    builder, seed = rs.MODELS[model_name]
    model, _ = builder(seed=seed)
    for padded in (False, True):
        ids, mask = rs.inputs(padded)
        real = ids[:, -rs.SHORT:]  # the real tokens of both rows: no token repeats
        assert all(len(set(row.tolist())) == rs.SHORT for row in real)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True,
                  **{rs.hf_models.cache_kwarg(): cache})
        candidates = rs.LENGTH - rs.WINDOW
        full = [layer.keys for layer in cache.layers if layer.keys.shape[-2] == rs.LENGTH]
        assert full, "no layer holds the whole prompt"
        for keys in full:
            norms = keys[..., :candidates, :].norm(dim=-1)               # [B, Hkv, C]
            for b in range(ids.shape[0]):
                ranked = norms[b][:, mask[b, :candidates].bool()].sort(-1).values
                gaps = (ranked[:, 1:] - ranked[:, :-1]) / ranked[:, -1:]
                assert gaps.min().item() > NORM_GAP, (model_name, padded, b, gaps.min().item())
