"""What a user picks: a compression method and its budget (docs/design.md section 6).

A method is a :class:`Scorer` (which tokens matter) under a :class:`BudgetPolicy` (how many each
KV head keeps), optionally inside a mixer such as :class:`MixKV`. Names, as ``mixkv.patch`` and
``mixkv-eval --methods`` take them, are parsed here and only here:

- ``NAME``: a registered scorer (``snapkv``, ``knorm``, ``random``, ``streamingllm``, ``tova``,
  ``expected_attention``, ``kvzip``, ``kvzap``, ...) under uniform budgets, or ``full`` (no
  compression);
- ``NAME+BASE``: the same under a registered policy (``snapkv`` uniform, ``pyramidkv``,
  ``adakv``, ``explicit``, ``global``); ``base=`` says the same; ``pyramidkv`` / ``adakv`` alone are
  SnapKV under that policy;
- ``MIXER(NAME)+BASE``: a mixer (``mixkv``, ``vnorm``, ``keydiff``, ``mix3``) over any scorer;
  ``MIXER`` alone wraps SnapKV, so ``mixkv+adakv`` is "AdaKV + MixKV".

Objects work as well: ``mixkv.patch(model, MixKV(AdaKV(SnapKV())), budget=256)``. One method,
one :class:`Method`: ``MixKV(AdaKV(SnapKV()))``, ``AdaKV(MixKV(SnapKV()))`` and
``"mixkv+adakv"`` resolve to equal parts, the canonical form being the policy over the scorer
(``Method.policy`` holds no scorer). Options (``pool_kernel``, ``sinks``, ``seed``,
``redundancy``, ``profile``, ``floor_alpha``, ...) go to the parts that have them (fields of
the dataclass parts, constructor arguments of plain ones); an option no part of the method
takes is an error.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional, Set, Tuple

from ..constants import DEFAULT_WINDOW, FULL
from . import policies, scorers  # noqa: F401  (registers the built-in parts)
from . import kvzip  # noqa: F401  (after them: the registry's order is the tables' order)
from . import kvzap  # noqa: F401  (KVzip's learned surrogate, after it)
from .base import (POLICIES, SCORERS, BudgetPolicy, Method, Part, Prefill, Scorer, Selection,
                   constructor_options, load_profile, options_dataclass, register_policy,
                   register_scorer)
from .kvzap import KVzap
from .kvzip import KVzip
from .modes import MODE_INPUTS, MODES
from .policies import AdaKV, Adaptive, Explicit, Global, Pyramid, PyramidKV, Uniform
from .scorers import (TOVA, ExpectedAttention, KeyDiff, KeyNorm, Mix3, Mixer, MixKV, Random,
                      SnapKV, StreamingLLM, ValueNorm)

__all__ = ["Scorer", "BudgetPolicy", "Part", "Mixer", "Method", "Prefill", "Selection",
           "register_scorer", "register_policy", "options_dataclass", "resolve", "parse",
           "base_of", "is_mix", "uses_option", "needs_hidden_states", "needs_reconstruction",
           "order_key", "method_label", "mode_method", "SCORERS", "POLICIES", "MODES",
           "MODE_INPUTS", "SnapKV", "KeyNorm", "Random", "StreamingLLM", "TOVA",
           "ExpectedAttention", "MixKV", "ValueNorm", "KeyDiff", "Mix3", "Uniform", "PyramidKV",
           "AdaKV", "Explicit", "Global", "Pyramid", "Adaptive", "KVzip", "KVzap",
           "load_profile", "DEFAULT_WINDOW", "FULL"]

DEFAULT_BASE = Uniform.name   # "snapkv": a scorer's base when none is named


def mode_method(mode: str) -> str:
    """The registered scorer that runs score mode `mode` over SnapKV (``"attn"`` -> snapkv,
    ``"vnorm"`` -> vnorm, ...): the first in the registry whose class has that ``mode``."""
    if mode in MODE_INPUTS:
        for name, cls in SCORERS.items():
            if getattr(cls, "mode", None) == mode:
                return name
    raise ValueError(f"mixkv: unknown score mode {mode!r}; choose one of {', '.join(MODES)}")


def method_label(scorer: Optional[Scorer], policy: BudgetPolicy) -> str:
    """The canonical name of a scorer under a policy ("mixkv+adakv", "adakv", "tova")."""
    if scorer is None:
        return FULL
    if policy.label == DEFAULT_BASE:
        return scorer.label
    return policy.label if scorer.label == SnapKV.name else f"{scorer.label}+{policy.label}"


def _names() -> str:
    return (f"a scorer ({', '.join(SCORERS)}), a base ({', '.join(POLICIES)}) or {FULL!r}, "
            "written NAME, NAME+BASE or MIXER(NAME)+BASE")


def _take(cls: type, options: Dict, used: Set[str]) -> Dict:
    kwargs = {k: options[k] for k in constructor_options(cls) if k in options}
    used.update(kwargs)
    return kwargs


def _scorer(expr: str, options: Dict, used: Set[str], label: str) -> Scorer:
    name, paren, rest = expr.strip().partition("(")
    name = name.strip()
    if paren and not rest.rstrip().endswith(")"):
        raise ValueError(f"mixkv: method {label!r} has an unclosed '('")
    inner = rest.rstrip()[:-1] if paren else None
    cls = SCORERS.get(name)
    if cls is None:
        raise ValueError(f"mixkv: unknown method {name!r} in {label!r}; choose {_names()}")
    kwargs = _take(cls, options, used)
    if issubclass(cls, Mixer):
        return cls(_scorer(inner or SnapKV.name, options, used, label), **kwargs)
    if inner is not None:
        raise ValueError(f"mixkv: scorer {name!r} wraps no other scorer (in {label!r}); only "
                         f"mixers do: {', '.join(n for n, c in SCORERS.items() if issubclass(c, Mixer))}")
    return cls(**kwargs)


def _policy(name: str, options: Dict, used: Set[str]) -> BudgetPolicy:
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"mixkv: unknown base {name!r}; choose one of {', '.join(POLICIES)}")
    return cls(None, **_take(cls, options, used))


def _build(label: str, base: Optional[str], options: Dict,
           used: Set[str]) -> Tuple[Optional[Scorer], BudgetPolicy]:
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"mixkv: a method name must be a non-empty string, got {label!r}")
    expr, plus, named_base = (part.strip() for part in label.partition("+"))
    if expr == FULL:
        return None, Uniform()
    if plus and base not in (None, DEFAULT_BASE, named_base):
        raise ValueError(f"mixkv: method {label!r} names base {named_base!r} but base={base!r}")
    if expr in POLICIES and expr not in SCORERS:  # "adakv": SnapKV under that policy
        if plus or base not in (None, DEFAULT_BASE, expr):
            raise ValueError(f"mixkv: method {expr!r} is SnapKV under the {expr} policy and "
                             f"takes no other base (got {named_base or base!r}); write "
                             f"'snapkv+BASE' or 'NAME+{expr}'")
        return _scorer(SnapKV.name, options, used, label), _policy(expr, options, used)
    scorer = _scorer(expr, options, used, label)
    return scorer, _policy(named_base or base or DEFAULT_BASE, options, used)


def _one_policy(outer: Optional[BudgetPolicy], inner: Optional[BudgetPolicy],
                method) -> Optional[BudgetPolicy]:
    """The policy of a method object that may name one twice (equal: one policy)."""
    if outer is not None and inner is not None and outer != inner:
        raise ValueError(f"mixkv: method {method!r} carries two policies, {outer!r} and "
                         f"{inner!r}")
    return outer if outer is not None else inner


def _inner_policy(scorer: Scorer) -> Tuple[Scorer, Optional[BudgetPolicy]]:
    """(the scorer without the policy a mixer was built around, that policy):
    ``MixKV(AdaKV(SnapKV()))`` -> (``MixKV(SnapKV())``, ``AdaKV()``); (scorer, None) when no
    mixer carries one."""
    if not isinstance(scorer, Mixer):
        return scorer, None
    inner, policy = _inner_policy(scorer.inner)
    policy = _one_policy(scorer.policy, policy, scorer)
    if policy is None:
        return scorer, None
    bare = copy.copy(scorer)
    bare.inner, bare.policy = inner, None
    return bare, policy


def _from_object(method, base: Optional[str], options: Dict,
                 used: Set[str]) -> Tuple[Scorer, BudgetPolicy]:
    """The canonical parts of a method object: ``AdaKV(MixKV(SnapKV()))`` and
    ``MixKV(AdaKV(SnapKV()))`` both give (``MixKV(SnapKV())``, ``AdaKV()``)."""
    if isinstance(method, BudgetPolicy):
        scorer, policy = method.scorer or SnapKV(), method.without_scorer()
    elif isinstance(method, Scorer):
        scorer, policy = method, None
    else:
        raise TypeError(f"mixkv: method must be a name, a Scorer or a BudgetPolicy, got "
                        f"{type(method).__name__}")
    scorer, carried = _inner_policy(scorer)
    policy = _one_policy(policy, carried, method)
    if policy is None:
        policy = _policy(base or DEFAULT_BASE, options, used)
    elif base not in (None, DEFAULT_BASE, policy.label):
        raise ValueError(f"mixkv: method {method!r} carries policy {policy.label!r}; "
                         f"base={base!r} conflicts")
    return scorer, policy


def _check_unused(options: Dict, used: Set[str], label: str) -> None:
    """Options no part of the method takes: an error unless left at a default some part has."""
    for key, value in options.items():
        if key in used:
            continue
        takers = {name: cls for name, cls in {**SCORERS, **POLICIES}.items()
                  if key in constructor_options(cls)}
        if not takers:
            raise ValueError(f"mixkv: unknown option {key}={value!r} (method {label!r})")
        defaults = [constructor_options(cls)[key].default for cls in takers.values()]
        if value is None or (isinstance(value, (str, int, float, bool))
                             and any(type(d) is type(value) and d == value for d in defaults)):
            continue
        raise ValueError(f"mixkv: option {key}={value!r} is not used by method {label!r}; it "
                         f"applies to {', '.join(takers)}")


def _window(scorer: Optional[Scorer], window: Optional[int], label: str) -> int:
    """The method's window: window= or the one a scorer part sets (SnapKV(window=...)), which
    must agree; else DEFAULT_WINDOW."""
    declared = {p.window for p in (scorer.parts() if scorer is not None else [])
                if getattr(p, "window", None) is not None}
    if len(declared) > 1:
        raise ValueError(f"mixkv: method {label!r} sets different windows {sorted(declared)}")
    if declared and window is not None and window not in declared:
        raise ValueError(f"mixkv: window={window} conflicts with the window "
                         f"{declared.pop()} set by method {label!r}")
    return window if window is not None else (declared.pop() if declared else DEFAULT_WINDOW)


def resolve(method="mixkv", *, budget: Optional[int] = None, ratio: Optional[float] = None,
            window: Optional[int] = None, base: Optional[str] = None, **options) -> Method:
    """Validate a method (name or object) with its budget into a :class:`Method`; errors name
    the method and the argument."""
    used: Set[str] = set()
    if isinstance(method, str):
        scorer, policy = _build(method, base, options, used)
    else:
        scorer, policy = _from_object(method, base, options, used)
    label = method_label(scorer, policy)
    _check_unused(options, used, label)
    window = _window(scorer, window, label)
    if window < 1:
        raise ValueError(f"mixkv: window must be >= 1, got {window}")
    if scorer is not None:
        if (budget is None) == (ratio is None):
            raise ValueError("mixkv: give exactly one of budget= (tokens kept per head, window "
                             "included) or ratio= (fraction of the prompt removed)")
        if budget is not None and budget <= window:
            raise ValueError(f"mixkv: budget ({budget}) must be larger than window ({window}): "
                             "the budget counts the window")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"mixkv: ratio must be in [0, 1), got {ratio}")
    return Method(scorer=scorer, policy=policy, budget=budget, ratio=ratio, window=window,
                  label=label)


def parse(label: str) -> Tuple[Optional[Scorer], BudgetPolicy]:
    """The parts a method name stands for, with default options (no budget needed)."""
    return _build(label, None, {}, set())


def base_of(label: str) -> Optional[str]:
    """The method a mix is compared with: its inner scorer under the same policy
    ("mixkv+adakv" -> "adakv", "mixkv(tova)" -> "tova"); None for plain or unknown methods."""
    try:
        scorer, policy = parse(label)
    except (ValueError, TypeError):
        return None
    if not isinstance(scorer, Mixer):
        return None
    return method_label(scorer.inner, policy)


def is_mix(label: str) -> bool:
    """Whether the method is a mixer over another method."""
    return base_of(label) is not None


def _any_part(label: str, flag: str) -> bool:
    """Whether a scorer part of the method sets the class flag `flag` (False for bad names)."""
    try:
        scorer, _ = parse(label)
    except (ValueError, TypeError):
        return False
    return scorer is not None and any(getattr(s, flag) for s in scorer.parts())


def needs_hidden_states(label: str) -> bool:
    """Whether the method's scorers read the layers' hidden states (capture them)."""
    return _any_part(label, "needs_hidden_states")


def needs_reconstruction(label: str) -> bool:
    """Whether the method's scores come from a reconstruction pass (compression after the
    whole prefill; mixkv/hf/reconstruct.py)."""
    return _any_part(label, "needs_reconstruction")


def order_key(label: str) -> tuple:
    """Sort key of method names for tables: full, then per base scorer (registry order) and
    policy (registry order), the plain method before its mixes; unknown names last."""
    try:
        scorer, policy = parse(label)
    except (ValueError, TypeError):
        return (2, 0, 0, 1, label)
    if scorer is None:
        return (0, 0, 0, 0, label)
    core = scorer.parts()[-1]
    return (1, list(POLICIES).index(policy.name) if policy.name in POLICIES else len(POLICIES),
            list(SCORERS).index(core.name) if core.name in SCORERS else len(SCORERS),
            int(isinstance(scorer, Mixer)), label)


def uses_option(label: str, option: str) -> bool:
    """Whether some part of the method takes `option` (e.g. a --redundancy profile)."""
    try:
        scorer, policy = parse(label)
    except (ValueError, TypeError):
        return False
    parts = (scorer.parts() if scorer is not None else []) + [policy]
    return any(option in constructor_options(type(p)) for p in parts)
