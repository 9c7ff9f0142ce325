"""Every option of every registered scorer and policy reaches the computation: building a part
with one option off its default changes what the ``torch.ops.mixkv`` ops receive when the method
compresses a layer. The parts and their options are read from the registries at collection, so
a new scorer, policy or option is tested without editing a list (and an option this file cannot
give a non-default value fails, asking for one). Also: ``mixkv.patch`` refuses options it would
ignore (a method that is already a resolved :class:`Method`)."""

import dataclasses
import functools
import inspect

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import mixkv  # noqa: E402
import mixkv.hf  # noqa: E402
from mixkv import methods as M  # noqa: E402

import hf_models  # noqa: E402
# test_methods also registers its "test_recency" scorer, which the registries then list.
from test_methods import BUDGET, W, _model_prefill, _prefill  # noqa: E402
from helpers import exactly  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS, HKV = 3, 2                 # _prefill's num_layers and KV heads: the [L, Hkv] profiles


def _profile(seed):
    return torch.rand(LAYERS, HKV, generator=torch.Generator().manual_seed(seed)) + 0.1


# Options with no usable default: every build of a part that takes them gets this value
# (kvzap's default, the surrogate shipped for the model, has none for the tiny Llama).
REQUIRED = {"profile": _profile(1), "weights": hf_models.kvzap_weights(hf_models.llama()[0])}


def _tokenizer(text, add_special_tokens=True):
    """A stand-in Hugging Face tokenizer (callable, returns input_ids)."""
    return {"input_ids": [11, 12, 13]}


def _encode(text):
    """The caller's tokenizer a reconstruction plan falls back to (ids unlike _tokenizer's)."""
    return [ord(c) % 50 for c in text]


# A non-default value per option name; options not listed get one from their default's type.
ALTERNATIVES = {
    "pool_kernel": 3, "pooling": "max", "gqa_reduce": "max",
    "window": W // 2,              # a window a scorer sets becomes the method's window
    "seed": 1, "sinks": 12,
    "redundancy": _profile(2) / 2,  # an offline [L, Hkv] profile instead of "online"
    "floor_alpha": 0.6, "normalize": False, "pyramid_beta": 4, "profile": _profile(3),
    "future_positions": 3, "skip_first": 0, "epsilon": 0.5, "use_covariance": False,
    "chunk_size": 16, "repeat_prompt": [5, 6, 7], "tokenizer": _tokenizer, "crop_chunks": False,
    "chunk_prompt": [8, 9], "reread": "all", "softmax": "all", "floor": 1000,  # every head its whole capacity: uniform
    "weights": hf_models.kvzap_weights(hf_models.llama()[0], seed=1),
}

# Options that act outside Method.compress, so the ops cannot see them on a captured prefill.
CANNOT_CHANGE = {
    ("kvzip", "chunk_size"): "sets the chunks of the reconstruction pass (mixkv/hf/reconstruct.py)"
                             ", which fills Prefill.reconstruction before compress runs",
    ("kvzip", "crop_chunks"): "sets whether the reconstruction pass crops the cache after each "
                              "chunk (mixkv/hf/reconstruct.py), before compress runs",
    ("kvzip", "repeat_prompt"): "is the prompt the reconstruction pass feeds before the context "
                                "(mixkv/hf/reconstruct.py), before compress runs",
    ("kvzip", "tokenizer"): "tokenizes the reconstruction pass's text prompt "
                            "(mixkv/hf/reconstruct.py), before compress runs",
    ("kvzip", "chunk_prompt"): "is the prompt before later chunks of the reconstruction pass "
                               "(mixkv/hf/reconstruct.py), before compress runs",
    ("kvzip", "overlap"): "sets how many of the previous chunk's tokens follow chunk_prompt in "
                          "the reconstruction pass, before compress runs",
    ("kvzip", "header"): "adds the chat template's assistant header to the reconstruction "
                         "pass's prompt, before compress runs",
    ("kvzip", "reread"): "sets which tokens the reconstruction pass re-reads, before compress "
                         "runs",
    ("kvzip", "softmax"): "sets the keys of the reconstruction pass's scoring softmax, before "
                          "compress runs",
    ("kvzip", "sinks"): "sets which tokens the reconstruction pass marks as kept (+inf in "
                        "Prefill.reconstruction, which this test draws at random)",
}


def _alternative(part, option, default):
    if option in ALTERNATIVES:
        return ALTERNATIVES[option]
    if isinstance(default, bool):  # before int: bool is an int
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default + 0.5
    pytest.fail(f"option {option!r} of {part!r} (default {default!r}) has no non-default value "
                "to test with: add one to ALTERNATIVES in tests/methods/test_method_options.py")


class _ComposedAdaKV(M.AdaKV):
    """AdaKV redefining capacities(), so not native: the scorer's own leaf ops run."""

    def capacities(self, importance, capacity, prefill):
        return super().capacities(importance, capacity, prefill)


# Scorers (mixers over SnapKV) under a native policy (fused op where the scorer has one) and a
# composed one; policies over SnapKV (the fused op) and over knorm (head_budgets).
PATHS = {"scorer": {"native": lambda s: M.Uniform(s), "composed": lambda s: _ComposedAdaKV(s)},
         "policy": {"fused": lambda: M.SnapKV(), "composed": lambda: M.KeyNorm()}}


def _cases():
    cases = []
    for kind, table in (("scorer", M.SCORERS), ("policy", M.POLICIES)):
        for name, cls in table.items():
            for option in M.constructor_options(cls):
                for path in PATHS[kind]:
                    cases.append(pytest.param(kind, name, option, path,
                                              id=f"{kind}-{name}-{option}-{path}"))
    return cases


def _build(kind, name, path, **options):
    """The part `name` with `options` (REQUIRED ones added) inside a method of `path`."""
    cls = (M.SCORERS if kind == "scorer" else M.POLICIES)[name]
    kwargs = {k: v for k, v in REQUIRED.items() if k in M.constructor_options(cls)}
    kwargs.update(options)
    if kind == "policy":
        part = cls(PATHS["policy"][path](), **kwargs)
        obj = part
    else:
        part = cls(M.SnapKV(), **kwargs) if issubclass(cls, M.Mixer) else cls(**kwargs)
        obj = PATHS["scorer"][path](part)
    # A window a scorer part sets is the method's; else the helpers' W.
    declared = any(getattr(p, "window", None) is not None for p in obj.scorer.parts())
    return part, M.resolve(obj, budget=BUDGET, window=None if declared else W)


@functools.lru_cache(maxsize=None)
def _model_prefill_once():
    model, _ = hf_models.llama()
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, 40),
                        generator=torch.Generator().manual_seed(2))
    return _model_prefill(model, ids)


def _prefill_for(method):
    """A layer's capture with what the method's scorers read, at the method's window."""
    parts = method.scorer.parts()
    p = _model_prefill_once() if any(s.needs_hidden_states for s in parts) else _prefill(True)
    if any(s.needs_reconstruction for s in parts):
        B, Hkv, N, _ = p.keys.shape
        p = dataclasses.replace(p, reconstruction=torch.rand(
            B, Hkv, N, generator=torch.Generator().manual_seed(4)))
    if method.window != p.window:  # the shim captures the method's window of queries
        assert method.window < p.window
        p = dataclasses.replace(p, queries=p.queries[..., -method.window:, :],
                                window=method.window)
    return p


class OpSpy(TorchDispatchMode):
    """Records every mixkv op the dispatcher runs (name, arguments), however the op was looked
    up (torch.ops.mixkv.X, mixkv.ops, a stored reference)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mixkv":
            snapshot = [x.detach().clone() if isinstance(x, torch.Tensor) else x
                        for x in (*args, *kwargs.values())]
            self.calls.append((func.name(), list(kwargs), snapshot))
        return func(*args, **kwargs)


def _op_calls(method, prefill):
    with OpSpy() as spy:
        method.compress(prefill, BUDGET)
    return spy.calls


def _same(a, b):
    """Op records (or their arguments) equal, tensors by shape, dtype and value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def test_the_spy_sees_the_fused_and_the_leaf_ops():
    p = _prefill(True)
    fused = _op_calls(M.resolve("adakv", budget=BUDGET, window=W), p)
    assert [name for name, _, _ in fused] == ["mixkv::compress_ragged"]
    composed = _op_calls(M.resolve("mixkv(knorm)+pyramidkv", budget=BUDGET, window=W), p)
    assert [name for name, _, _ in composed] == [
        "mixkv::value_norm", "mixkv::key_diversity", "mixkv::mix_scores", "mixkv::head_budgets",
        "mixkv::select_kv_ragged"]
    # a reference taken before the spy started is seen too
    op = torch.ops.mixkv.value_norm
    with OpSpy() as spy:
        op(p.values, W, p.key_mask)
    assert [name for name, _, _ in spy.calls] == ["mixkv::value_norm"]
    assert _same(spy.calls[0][2][0], p.values) and spy.calls[0][2][1] == W


def test_every_registered_part_with_options_is_covered():
    """Not vacuous: the registries' options are all here, the built-in ones included."""
    covered = {(name, option) for _, name, option, _ in (case.values for case in _cases())}
    for key in CANNOT_CHANGE:
        assert key in covered, f"CANNOT_CHANGE names {key}, which no registered part takes"
    assert {("snapkv", "pool_kernel"), ("mixkv", "redundancy"), ("streamingllm", "sinks"),
            ("adakv", "floor_alpha"), ("expected_attention", "use_covariance"),
            ("expected_attention", "sinks"), ("expected_attention", "use_vnorm"),
            ("kvzip", "chunk_size"), ("kvzap", "weights"), ("kvzap", "sinks")} <= covered


@pytest.mark.parametrize("kind,name,option,path", _cases())
def test_a_non_default_option_changes_what_the_ops_receive(kind, name, option, path):
    cls = (M.SCORERS if kind == "scorer" else M.POLICIES)[name]
    base_value = REQUIRED.get(option, M.constructor_options(cls)[option].default)
    if base_value is inspect.Parameter.empty:
        pytest.fail(f"option {option!r} of {name!r} has no default: add a value to REQUIRED in "
                    "tests/methods/test_method_options.py")
    value = _alternative(name, option, base_value)
    assert not _same(value, base_value), f"ALTERNATIVES[{option!r}] is {name}'s default"
    part, plain = _build(kind, name, path)
    other_part, other = _build(kind, name, path, **{option: value})
    p_plain, p_other = _prefill_for(plain), _prefill_for(other)
    want = _op_calls(plain, p_plain)
    # the same method on the same input gives the same calls: a difference is the option's
    assert want and _same(_op_calls(plain, p_plain), want)
    got = _op_calls(other, p_other)
    ops = sorted({n for n, _, _ in want + got})
    reason = CANNOT_CHANGE.get((name, option))
    same = _same(got, want)  # a bool: a failure prints the message, not the tensors
    if reason is None:
        assert not same, (
            f"{kind} {name!r} built with {option}={value!r} instead of {base_value!r} passes the "
            f"same arguments to {', '.join(ops)} ({path} path): the option does not reach "
            "the computation")
        return
    assert same, f"{name}'s {option} now changes the ops' arguments: remove it from CANNOT_CHANGE"
    # where it acts instead: the reconstruction pass's plan
    assert cls.needs_reconstruction, f"CANNOT_CHANGE {(name, option)}: test where it acts"
    assert part.reconstruction_plan(_encode) != other_part.reconstruction_plan(_encode), \
        f"{name}'s {option} ({reason}) does not change the reconstruction plan either"


# -- mixkv.patch with a resolved Method ----------------------------------------------------------

def _entries():
    return [pytest.param(mixkv.patch, {}, id="mixkv.patch"),
            pytest.param(mixkv.hf.patch, {}, id="mixkv.hf.patch"),
            pytest.param(mixkv.patch, dict(decode_budget=32, interval=4), id="decoding")]


@pytest.mark.parametrize("entry,decoding", _entries())
def test_patch_refuses_options_a_resolved_method_would_ignore(entry, decoding):
    model, _ = hf_models.llama()
    resolved = M.resolve("mixkv", budget=BUDGET, window=W)
    message = ("mixkv.patch: method is an already resolved Method (label 'mixkv'); the options "
               "budget=999, window=8 would be ignored: give them to mixkv.methods.resolve() or "
               "pass the method by name or as a Scorer/BudgetPolicy object")
    with pytest.raises(ValueError, match=exactly(message)):
        entry(model, resolved, budget=999, window=8, **decoding)
    assert getattr(model, "_mixkv_patch", None) is None   # refused before patching anything
    with pytest.raises(ValueError, match=exactly(
            "mixkv.patch: method is an already resolved Method (label 'tova+adakv'); the "
            "options floor_alpha=0.5 would be ignored: give them to mixkv.methods.resolve() or "
            "pass the method by name or as a Scorer/BudgetPolicy object")):
        entry(model, M.resolve("tova+adakv", budget=BUDGET, window=W), floor_alpha=0.5,
              **decoding)


@pytest.mark.parametrize("entry,decoding", _entries())
def test_patch_takes_a_resolved_method_without_options(entry, decoding):
    model, _ = hf_models.llama()
    resolved = M.resolve("mixkv+adakv", budget=BUDGET, window=W)
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (1, 50),
                        generator=torch.Generator().manual_seed(6))
    with entry(model, resolved, **decoding) as handle, torch.no_grad():
        model(input_ids=ids, use_cache=True)
        assert handle.method is resolved
        kept = [s["kept"] for s in handle.stats()["layers"].values()]
    assert len(kept) == 2 and all(k.sum(-1).tolist() == [HKV * BUDGET] for k in kept)
