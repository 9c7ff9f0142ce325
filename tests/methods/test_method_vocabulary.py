"""One vocabulary for methods (issue 28, item 2): parts are dataclasses whose options are fields
(shown in the repr, compared by value), every spelling of a method resolves to the same Method,
the Python mode table agrees with the reference's copy and the C++ op, and the method layer
calls the ops with keyword arguments named as in their schemas."""

import dataclasses

import pytest
import torch

from mixkv import methods as M
from mixkv import reference as R
from mixkv.methods import modes

from test_methods import BUDGET, W, Recency, _prefill  # noqa: F401  (registers test_recency)

pytestmark = pytest.mark.usefixtures("one_thread")

PROFILE = torch.tensor([[1.0, 3.0], [2.0, 1.0], [1.0, 1.0]])


def _registered():
    return [pytest.param(cls, id=name) for table in (M.SCORERS, M.POLICIES)
            for name, cls in table.items() if cls is not Recency]


def _built(cls):
    """A registered part with its default options (those without one given)."""
    needs = dict(profile=PROFILE) if cls is M.Explicit else {}
    if cls is M.KVzap:
        pytest.importorskip("transformers")
        import hf_models
        needs = dict(weights=hf_models.kvzap_weights(hf_models.llama()[0]))
    return cls(**needs)


# -- parts are dataclasses ----------------------------------------------------------------------

def test_reprs_show_the_options():
    assert repr(M.Random(seed=0)) == "Random(seed=0)"
    assert repr(M.StreamingLLM()) == "StreamingLLM(sinks=4)"
    assert repr(M.KeyNorm()) == "KeyNorm()"
    snap = "SnapKV(pool_kernel=5, pooling='avg', gqa_reduce='mean', window=None)"
    assert repr(M.SnapKV()) == snap
    assert repr(M.AdaKV(M.SnapKV(), floor_alpha=0.3)) == \
        f"AdaKV({snap}, floor_alpha=0.3, normalize=True)"
    assert repr(M.AdaKV()) == "AdaKV(floor_alpha=0.2, normalize=True)"
    assert repr(M.PyramidKV(pyramid_beta=4)) == "PyramidKV(pyramid_beta=4)"
    assert repr(M.MixKV(M.TOVA())) == "MixKV(TOVA(), redundancy='online')"
    # a mixer built around a policy shows it, without the scorer it already shows
    assert repr(M.KeyDiff(M.AdaKV(M.TOVA()))) == \
        "KeyDiff(TOVA(), policy=AdaKV(floor_alpha=0.2, normalize=True))"


@pytest.mark.parametrize("cls", _registered())
def test_every_registered_part_is_a_dataclass_of_its_options(cls):
    part = _built(cls)
    assert dataclasses.is_dataclass(part)
    options = M.constructor_options(cls)
    fields = {f.name for f in dataclasses.fields(part) if f.init} - {cls.wraps}
    assert set(options) == fields
    shown = repr(part)
    assert shown.startswith(f"{cls.__name__}(")
    hidden = {f.name for f in dataclasses.fields(part) if not f.repr}
    for name in set(options) - hidden - ({"weights"} if cls is M.KVzap else set()):
        assert f"{name}=" in shown, f"{cls.__name__}'s repr leaves out option {name}"
    # equal by value to a second build, and hashed alike
    again = _built(cls)
    assert part == again and hash(part) == hash(again) and part is not again


def test_equality_is_by_value_tensors_by_torch_equal():
    assert M.Random(seed=1) == M.Random(seed=1) != M.Random(seed=2)
    assert M.SnapKV() != M.SnapKV(window=16) and M.SnapKV() != M.TOVA()
    assert M.MixKV(redundancy=PROFILE) == M.MixKV(redundancy=PROFILE.clone())
    assert M.MixKV(redundancy=PROFILE) != M.MixKV(redundancy=PROFILE + 1)
    assert M.MixKV(redundancy=PROFILE) != M.MixKV()           # a profile is not "online"
    assert M.MixKV(redundancy=None) == M.MixKV()              # None is "online"
    assert M.Explicit(profile=PROFILE) == M.Explicit(profile=PROFILE.clone())
    assert M.Explicit(profile=PROFILE) != M.Explicit(profile=PROFILE * 2)
    assert M.AdaKV(M.SnapKV()) == M.AdaKV(M.SnapKV()) != M.AdaKV(M.TOVA())
    assert M.AdaKV() != M.AdaKV(floor_alpha=0.5) and M.AdaKV() != M.PyramidKV()
    # defaults are not shared between instances
    assert M.MixKV().inner is not M.MixKV().inner


def test_a_plain_user_scorer_keeps_its_constructor_options_and_identity():
    a, b = Recency(slope=2.0), Recency(slope=2.0)
    assert not dataclasses.is_dataclass(a) and a != b and a == a and repr(a) == "Recency()"
    assert list(M.constructor_options(Recency)) == ["slope"]
    assert M.resolve("test_recency", budget=BUDGET, window=W, slope=3.0).scorer.slope == 3.0

    class OwnInit(M.StreamingLLM):   # a dataclass part's subclass with its own __init__
        def __init__(self, sinks=4, extra=1):
            super().__init__(sinks)
            self.extra = extra

    assert list(M.constructor_options(OwnInit)) == ["sinks", "extra"]
    assert OwnInit(extra=1) != OwnInit(extra=1)     # its options are not all fields: identity


def test_policy_defaults_are_the_fields_and_match_the_op_schema():
    schema = {a.name: a.default_value for a in
              torch.ops.mixkv.head_budgets.default._schema.arguments if a.has_default_value()}
    for cls, option in ((M.AdaKV, "floor_alpha"), (M.AdaKV, "normalize"),
                        (M.PyramidKV, "pyramid_beta")):
        assert M.constructor_options(cls)[option].default == schema[option]


# -- one spelling per method --------------------------------------------------------------------

def test_aliases_are_the_same_classes():
    assert M.Adaptive is M.AdaKV and M.Pyramid is M.PyramidKV
    assert M.POLICIES["adakv"] is M.AdaKV and M.POLICIES["pyramidkv"] is M.PyramidKV
    assert M.AdaKV.op_policy == "adaptive" and M.AdaKV.name == "adakv"


@pytest.mark.parametrize("policy,name", [(M.AdaKV, "adakv"), (M.PyramidKV, "pyramidkv"),
                                         (M.Global, "global")])
@pytest.mark.parametrize("inner", [M.SnapKV, M.TOVA])
def test_a_mixer_around_a_policy_and_a_policy_around_a_mixer_are_one_method(policy, name,
                                                                             inner):
    label = f"mixkv+{name}" if inner is M.SnapKV else f"mixkv(tova)+{name}"
    spellings = [M.MixKV(policy(inner())), policy(M.MixKV(inner())), label]
    methods = [M.resolve(s, budget=BUDGET, window=W) for s in spellings]
    canonical = methods[1]
    for method in methods:
        assert method == canonical and method.label == label
        assert method.scorer == M.MixKV(inner()) and method.policy == policy()
        assert method.policy.scorer is None and method.scorer.policy is None
    # the object a user built is left as it was
    assert spellings[0].policy == policy() and spellings[1].scorer == M.MixKV(inner())
    p = _prefill(True)
    kept = [m.compress(p, BUDGET).positions for m in methods[:2]]
    assert torch.equal(kept[0], kept[1])


def test_nested_mixers_and_options_normalise_too():
    a = M.resolve(M.KeyDiff(M.MixKV(M.AdaKV(M.TOVA(), floor_alpha=0.5))), budget=64)
    b = M.resolve(M.AdaKV(M.KeyDiff(M.MixKV(M.TOVA())), floor_alpha=0.5), budget=64)
    assert a == b and a.label == "keydiff(mixkv(tova))+adakv" and a.policy.floor_alpha == 0.5
    with pytest.raises(ValueError, match="carries two policies"):
        M.resolve(M.PyramidKV(M.MixKV(M.AdaKV(M.SnapKV()))), budget=64)
    # the same policy twice is one policy
    assert M.resolve(M.AdaKV(M.MixKV(M.AdaKV(M.SnapKV()))), budget=64) == \
        M.resolve("mixkv+adakv", budget=64)


# -- the mode table -----------------------------------------------------------------------------

def _mix_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, C = 2, 3, 20
    return dict(importance=torch.rand(B, H, C, generator=g),
                value_norm=torch.rand(B, H, C, generator=g) * 5,
                diversity=torch.rand(B, H, C, generator=g) - 0.5,
                redundancy=torch.rand(B, H, generator=g))


def _reads_by_behaviour(mix_scores, mode):
    """Which inputs change mix_scores(mode)'s output when replaced."""
    base = _mix_inputs(0)
    want = mix_scores(**base, mode=mode)
    other = _mix_inputs(1)
    return {name for name in (modes.VALUE_NORM, modes.DIVERSITY, modes.REDUNDANCY)
            if not torch.allclose(mix_scores(**dict(base, **{name: other[name]}), mode=mode),
                                  want)}


@pytest.mark.parametrize("mode", modes.MODES)
def test_the_mode_table_agrees_with_the_reference_and_the_op(mode):
    assert set(R.MODES) == set(modes.MODES)
    assert _reads_by_behaviour(R.mix_scores, mode) == modes.MODE_INPUTS[mode]
    assert _reads_by_behaviour(torch.ops.mixkv.mix_scores, mode) == modes.MODE_INPUTS[mode]


@pytest.mark.parametrize("mode", modes.MODES)
def test_the_reference_computes_what_its_own_copy_says(monkeypatch, mode):
    """The reference's compress computes value norm and diversity exactly for the modes the
    table says read them (its own copy of the table, kept on purpose)."""
    computed = []
    for name in ("value_norm", "key_diversity"):
        original = getattr(R, name)
        monkeypatch.setattr(R, name, lambda *a, _n=name, _o=original, **k:
                            computed.append(_n) or _o(*a, **k))
    p = _prefill(True)
    R.compress(p.queries, p.keys, p.values, p.key_mask, budget=BUDGET, window=W, mode=mode)
    reads = modes.MODE_INPUTS[mode]
    assert ("value_norm" in computed) == (modes.VALUE_NORM in reads)
    assert ("key_diversity" in computed) == bool(reads & {modes.DIVERSITY, modes.REDUNDANCY})


def test_every_mode_has_a_scorer():
    assert {M.mode_method(m) for m in modes.MODES} == {"snapkv", "vnorm", "keydiff", "mix3",
                                                       "mixkv"}
    with pytest.raises(ValueError, match="unknown score mode 'snap'"):
        M.mode_method("snap")


# -- ops by keyword -----------------------------------------------------------------------------

OPS = ("compress", "compress_ragged", "head_budgets", "select_kv", "select_kv_ragged",
       "window_importance", "value_norm", "key_diversity", "mix_scores")


@pytest.mark.parametrize("label,ops", [
    ("snapkv", ["compress"]), ("mixkv+adakv", ["compress_ragged"]),
    ("pyramidkv", ["compress_ragged"]), ("mixkv+explicit", ["compress_ragged"]),
    ("mixkv(knorm)+adakv", ["value_norm", "key_diversity", "mix_scores", "head_budgets",
                            "select_kv_ragged"]),
    ("vnorm(tova)", ["window_importance", "value_norm", "mix_scores", "select_kv"]),
    ("keydiff+global", ["window_importance", "key_diversity", "mix_scores",
                        "select_kv_ragged"])])
def test_the_method_layer_calls_the_ops_by_keyword(monkeypatch, label, ops):
    calls = []
    for op in OPS:
        original = getattr(torch.ops.mixkv, op)
        names = {a.name for a in original.default._schema.arguments}

        def spy(*args, _op=op, _o=original, _names=names, **kwargs):
            assert not args, f"{_op} called with {len(args)} positional arguments"
            assert set(kwargs) <= _names, f"{_op}: {set(kwargs) - _names} not in its schema"
            calls.append(_op)
            return _o(**kwargs)

        monkeypatch.setattr(torch.ops.mixkv, op, spy)
    options = dict(profile=PROFILE) if "explicit" in label else {}
    method = M.resolve(label, budget=BUDGET, window=W, **options)
    p = _prefill(True)
    method.compress_layers({p.layer: p}, BUDGET)
    assert calls == ops


def test_a_policy_with_the_former_positional_op_arguments_is_told_the_new_form():
    @M.options_dataclass
    class Former(M.AdaKV):
        def op_arguments(self, p):   # the 7-tuple of before issue 28
            return ("adaptive", 0.2, True, p.layer, p.num_layers, 20, None)

    p = _prefill(False)
    for method in (M.resolve(Former(), budget=BUDGET, window=W),
                   M.resolve(Former(M.ValueNorm(M.TOVA())), budget=BUDGET, window=W)):
        with pytest.raises(TypeError, match=r"Former\.op_arguments\(\) returned tuple; it returns "
                                            r"a dict of the op's keyword arguments"):
            method.compress(p, BUDGET)
