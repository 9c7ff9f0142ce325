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
