"""The three abstractions of the method layer and their registries (docs/design.md section 6).

- :class:`Scorer`: per-token importance of each KV head's candidates, from what the shim
  captured at prefill (:class:`Prefill`). Higher is kept.
- :class:`BudgetPolicy`: how many candidates each KV head keeps (per-head capacities) from a
  scorer's importance.
- :class:`Method`: a scorer under a policy with a budget; ``compress`` runs the fused op
  ``torch.ops.mixkv.compress`` / ``compress_ragged`` when every part is native, and otherwise
  composes the leaf ops (the scorer's scores, ``head_budgets`` or the policy's own capacities,
  then ``select_kv`` / ``select_kv_ragged``: the selection always runs in C++).

A new scorer is one class with ``@register_scorer("name")``; it then runs plain, under every
policy and inside every mixer (``"mixkv(name)+adakv"``), in ``mixkv.patch`` and ``mixkv-eval``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import os
from typing import Any, ClassVar, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..constants import DEFAULT_WINDOW

SCORERS: Dict[str, Type["Scorer"]] = {}
POLICIES: Dict[str, Type["BudgetPolicy"]] = {}


def _register(table: Dict[str, type], kind: str, root: type, name: str, cls=None):
    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, root)):
            raise TypeError(f"mixkv: register_{kind}({name!r}) needs a {root.__name__} subclass, "
                            f"got {cls!r}")
        if "(" in name or "+" in name or "," in name or not name.strip():
            raise ValueError(f"mixkv: {kind} name {name!r} may not be empty nor contain "
                             "'(', '+' or ','")
        known = table.get(name)
        # Re-running a notebook cell redefines the class: same name and qualname replace.
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(f"mixkv: {kind} name {name!r} is taken by {known.__qualname__}")
        table[name] = cls
        cls.name = name
        return cls

    return add if cls is None else add(cls)


def register_scorer(name: str, cls=None):
    """Register a :class:`Scorer` subclass under `name` (a decorator, or call with the class).
    Its options (:func:`constructor_options`: a dataclass's fields, else its constructor's
    keyword arguments) become options of ``mixkv.patch`` and ``resolve``."""
    return _register(SCORERS, "scorer", Scorer, name, cls)


def register_policy(name: str, cls=None):
    """Register a :class:`BudgetPolicy` subclass under the base name `name` (``"NAME+name"``)."""
    return _register(POLICIES, "policy", BudgetPolicy, name, cls)


def overrides(obj, base: type, *names: str) -> bool:
    """Whether `obj`'s class redefines any of `base`'s methods `names` (then it is not native)."""
    return any(getattr(type(obj), n) is not getattr(base, n) for n in names)


def load_profile(value, what: str) -> Optional[Tensor]:
    """An [L, Hkv] profile from a tensor, a torch.save file (a bare tensor or a dict holding
    `what`), or None / "online" (no profile)."""
    if value is None or (isinstance(value, str) and value == "online"):
        return None
    if isinstance(value, (str, os.PathLike)):
        loaded = torch.load(value, map_location="cpu", weights_only=True)
        value = loaded[what] if isinstance(loaded, dict) else loaded
    profile = torch.as_tensor(value, dtype=torch.float32).cpu()
    if profile.dim() != 2:
        raise ValueError(f"mixkv: {what} profile must be [num_layers, num_kv_heads], "
                         f"got shape {tuple(profile.shape)}")
    if not torch.isfinite(profile).all() or (profile < 0).any():
        raise ValueError(f"mixkv: {what} profile must hold finite values >= 0")
    return profile


def profile_row(profile: Tensor, what: str, prefill: "Prefill") -> Tensor:
    """The prefill's layer row of an [L, Hkv] profile, checked against the model."""
    Hkv = prefill.keys.shape[1]
    if profile.shape != (prefill.num_layers, Hkv):
        raise ValueError(f"mixkv: {what} profile has shape {tuple(profile.shape)}, the model "
                         f"needs [{prefill.num_layers}, {Hkv}]")
    return profile.to(prefill.keys.device)


@dataclasses.dataclass
class Prefill:
    """What the shim captured for one layer at prefill: every scorer's input.

    Shapes: B rows, Hq query heads, Hkv KV heads, N prompt tokens, W window, D head dim; the
    candidates are positions 0 .. C-1 (C = N - W), the window C .. N-1 is always kept."""

    queries: Tensor                   # [B, Hq, W, D] the window's queries, post-RoPE
    keys: Tensor                      # [B, Hkv, N, D] post-RoPE, as cached
    values: Tensor                    # [B, Hkv, N, D]
    key_mask: Optional[Tensor]        # [B, N] bool, True for real tokens; None: no padding
    window: int
    layer: int                        # decoder layer index
    num_layers: int
    scaling: Optional[float] = None   # the module's attention scaling (None: 1/sqrt(D))
    module: Optional[nn.Module] = None            # the layer's attention module
    decoder: Optional[nn.Module] = None           # the decoder stack (rotary embedding, config)
    hidden_states: Optional[Tensor] = None        # [B, N, hidden] the attention module's input,
    #                                               captured for scorers with needs_hidden_states
    reconstruction: Optional[Tensor] = None       # [B, Hkv, N] the most attention each key got
    #                                               while the model re-read the context, for
    #                                               scorers with needs_reconstruction
    token_scores: Optional[Tensor] = None         # [B, Hkv, N] the scores a scorer with
    #                                               static_scores gave each token when it
    #                                               entered the cache (decoding keeps them)

    @property
    def candidates(self) -> int:
        return self.keys.shape[-2] - self.window

    def real_candidates(self) -> Tensor:
        """[B, C] bool: which candidates are real tokens."""
        B, C = self.keys.shape[0], self.candidates
        if self.key_mask is None:
            return torch.ones(B, C, dtype=torch.bool, device=self.keys.device)
        return self.key_mask[:, :C].bool()


def options_dataclass(cls):
    """Make a scorer or policy class a dataclass whose fields are its options (defaults as the
    fields' defaults); equality, hash and repr stay :class:`Part`'s (by value, tensors by
    ``torch.equal``)."""
    return dataclasses.dataclass(eq=False, repr=False)(cls)


def _option_fields(cls: type) -> Optional[Tuple[dataclasses.Field, ...]]:
    """The init fields of a part whose constructor is a dataclass's (None: a plain class, or a
    subclass of a dataclass part that writes its own ``__init__``)."""
    owner = next(c for c in cls.__mro__ if "__init__" in vars(c))
    if "__dataclass_fields__" not in vars(owner):
        return None
    return tuple(f for f in dataclasses.fields(cls) if f.init)


def same_value(a: Any, b: Any) -> bool:
    """Equal options: tensors by shape, dtype, device and ``torch.equal`` (``==`` is
    elementwise), dicts and sequences item by item, anything else by ``==``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and \
            a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and \
            all(same_value(x, y) for x, y in zip(a, b))
    return a is b or bool(a == b)


class Part:
    """What scorers and budget policies share. A part written as a dataclass
    (:func:`options_dataclass`; every built-in one) has its options as fields: they are shown
    in the repr (``StreamingLLM(sinks=4)``, ``AdaKV(SnapKV(...), floor_alpha=0.2,
    normalize=True)``: the part it wraps first, unnamed), compared by value (tensors with
    ``torch.equal``) and hashed by type alone, so equal parts hash alike. A plain class with
    its own ``__init__`` (a notebook's scorer) compares by identity, as any Python object."""

    name: ClassVar[str] = ""
    # The field holding the part this one wraps (a mixer's inner scorer, a policy's scorer):
    # first in the repr, never an option.
    wraps: ClassVar[Optional[str]] = None

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def __eq__(self, other):
        if type(other) is not type(self) or _option_fields(type(self)) is None:
            return NotImplemented
        return all(same_value(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self) if f.compare)

    def __hash__(self):
        return hash(type(self))

    def __repr__(self):
        shown = []
        for f in (dataclasses.fields(self) if dataclasses.is_dataclass(self) else ()):
            value = getattr(self, f.name, None)
            if not f.repr or (value is None and (f.name == self.wraps or not f.init)):
                continue   # unset wrapped parts and derived state are left out
            shown.append(repr(value) if f.name == self.wraps else f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"


class Scorer(Part):
    """Scores each KV head's candidates: ``score(prefill)`` -> [B, Hkv, C] float32, higher is
    kept (finite at real candidates; padded candidates are ranked last whatever their score).

    Subclass, implement ``score``, register with ``@register_scorer("name")``; the scorer's
    options are its dataclass fields (``@options_dataclass``, as the built-in scorers) or its
    constructor's keyword arguments (a plain class). Set ``needs_hidden_states = True`` to receive
    ``prefill.hidden_states`` (the shim and the evaluation engine then capture them). Set
    ``needs_reconstruction = True`` to receive ``prefill.reconstruction``: after the prefill the
    shim has the model re-read the context (``reconstruction_plan``) and records the most
    attention each cached key receives (``mixkv/hf/reconstruct.py``); compression then waits
    for the whole prefill forward. Set ``static_scores = True`` when a token's score depends on
    that token alone and never changes (a function of its own hidden state, KVzap): implement
    ``token_scores``; the shim then scores each token once, when it enters the cache, and keeps
    the scores beside the cache, so such a scorer also runs during generation.
    Budget policies split capacities by ``importance``: the score unless a scorer's scores are
    not a non-negative importance (override ``score_with_importance`` then)."""

    needs_hidden_states: ClassVar[bool] = False
    needs_reconstruction: ClassVar[bool] = False
    static_scores: ClassVar[bool] = False

    def token_scores(self, hidden_states: Tensor, layer: int, decoder: nn.Module) -> Tensor:
        """For scorers with ``static_scores``: [B, Hkv, n] float32 scores of the n tokens whose
        attention-module input is ``hidden_states`` [B, n, hidden] in decoder layer ``layer``
        (``decoder``: the model's decoder stack, for its config). ``score`` reads them from
        ``Prefill.token_scores`` when the shim kept them, else computes them from
        ``Prefill.hidden_states``."""
        raise NotImplementedError(f"mixkv: scorer {type(self).__name__} sets static_scores and "
                                  "must implement token_scores()")

    def reconstruction_plan(self, encode=None) -> dict:
        """For scorers with ``needs_reconstruction``: how the context is re-read, a dict of
        ``prompt_ids`` (list of token ids fed before the context), ``chunk_size`` and
        ``crop_chunks`` (see :class:`mixkv.methods.kvzip.KVzip`). ``encode`` (text -> ids) is
        a tokenizer the caller has at hand, if any."""
        raise NotImplementedError(f"mixkv: scorer {type(self).__name__} needs a reconstruction "
                                  "pass and must implement reconstruction_plan()")

    def score(self, prefill: Prefill) -> Tensor:
        raise NotImplementedError(f"mixkv: scorer {type(self).__name__} must implement score()")

    def always_kept(self, prefill: Prefill) -> Optional[Tensor]:
        """[B, C] bool: candidates every head keeps whatever the scores (sinks, a system
        prompt), inside the budget; None (the default): none. ``Method`` raises their scores and
        importance above the layer's highest, so every policy and mixer keeps them first."""
        return None

    def score_with_importance(self, prefill: Prefill) -> Tuple[Tensor, Tensor]:
        """(importance for budget policies and mixers, selection scores), both [B, Hkv, C]."""
        scores = self.score(prefill)
        return scores, scores

    def fused_options(self, prefill: Prefill) -> Optional[dict]:
        """Arguments of the fused op (mode, pooling, redundancy row, ...) when this scorer is
        one of its modes; None: compose the leaf ops."""
        return None

    def parts(self):
        """This scorer and the scorers inside it, outermost first."""
        return [self]


@options_dataclass
class BudgetPolicy(Part):
    """Per-head capacities from importance: ``capacities(importance [B, Hkv, C], capacity,
    prefill)`` -> [B, Hkv] int32, each row summing to at most Hkv * capacity and no head above
    its row's real candidates. ``headwise`` False keeps one dense capacity for all heads.

    The native policies run ``torch.ops.mixkv.head_budgets`` with ``op_policy``; a subclass may
    override ``capacities`` (then the scores are selected by ``select_kv_ragged``).
    ``BudgetPolicy(scorer)`` reads as "this policy over that scorer": ``AdaKV(SnapKV())``;
    the options are the fields after ``scorer``."""

    headwise: ClassVar[bool] = True
    op_policy: ClassVar[Optional[str]] = None
    # True: capacities need every compressed layer's importance at once (``layer_capacities``),
    # so the shim compresses after the whole prefill forward, as for a reconstruction pass.
    spans_layers: ClassVar[bool] = False
    wraps: ClassVar[str] = "scorer"

    scorer: Optional[Scorer] = None

    def op_arguments(self, prefill: Prefill) -> Dict[str, Any]:
        """This policy's keyword arguments of ``head_budgets`` / ``compress_ragged``, by the
        ops' schema names (``policy``, ``layer``, ``num_layers`` and the options the policy
        has: ``floor_alpha``, ``normalize``, ``pyramid_beta``, ``profile``); arguments a policy
        does not have keep the schema's defaults."""
        return dict(policy=self.op_policy, layer=prefill.layer, num_layers=prefill.num_layers)

    def capacities(self, importance: Tensor, capacity: int, prefill: Prefill) -> Tensor:
        if self.op_policy is None:
            raise NotImplementedError(f"mixkv: policy {type(self).__name__} must implement "
                                      "capacities()")
        return torch.ops.mixkv.head_budgets(importance=importance, capacity=capacity,
                                            key_mask=prefill.key_mask,
                                            **self.op_keywords(prefill))

    def op_keywords(self, prefill: Prefill) -> Dict[str, Any]:
        """``op_arguments``, checked: a policy written for the former positional form (a
        7-tuple) gets an error that names the new one."""
        arguments = self.op_arguments(prefill)
        if not isinstance(arguments, dict):
            raise TypeError(f"mixkv: policy {type(self).__name__}.op_arguments() returned "
                            f"{type(arguments).__name__}; it returns a dict of the op's keyword "
                            "arguments by schema name (policy=, layer=, num_layers=, "
                            "floor_alpha=, normalize=, pyramid_beta=, profile=)")
        return arguments

    def without_scorer(self) -> "BudgetPolicy":
        """This policy with no scorer (a copy; itself when it has none): a :class:`Method`
        holds its scorer apart."""
        if self.scorer is None:
            return self
        bare = copy.copy(self)
        bare.scorer = None
        return bare

    def layer_capacities(self, importances: Dict[int, Tensor], capacity: int,
                         prefills: Dict[int, Prefill]) -> Dict[int, Tensor]:
        """Capacities of several layers at once ({layer: [B, Hkv]}); per layer unless the
        policy ``spans_layers``."""
        return {i: self.capacities(importances[i], capacity, prefills[i]) for i in importances}

    def native(self) -> bool:
        return self.op_policy is not None and not overrides(self, BudgetPolicy, "capacities")


@dataclasses.dataclass
class Selection:
    """Kept K/V of one layer: dense ([B, Hkv, k, D], positions [B, Hkv, k]) when ``offsets`` is
    None, else ragged ([T, D], positions [T], offsets [B*Hkv + 1]) as from select_kv_ragged."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    offsets: Optional[Tensor] = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A resolved method: a scorer (None: no compression) under a budget policy (without a
    scorer of its own: ``policy.scorer`` is None), with the budget. Built by
    :func:`mixkv.methods.resolve`, which gives every spelling of a method equal parts; the shim
    calls ``compress`` per layer."""

    scorer: Optional[Scorer]
    policy: BudgetPolicy
    budget: Optional[int] = None       # tokens kept per head, window included
    ratio: Optional[float] = None      # or: fraction of the prompt removed (kvpress convention)
    window: int = DEFAULT_WINDOW
    label: str = ""

    @property
    def name(self) -> str:
        return self.label

    @property
    def headwise(self) -> bool:
        """Per-head or per-layer capacities need the head-wise cache."""
        return self.policy.headwise

    @property
    def parts(self) -> list:
        """The scorer and the scorers inside it, outermost first (none for ``FULL``)."""
        return self.scorer.parts() if self.scorer is not None else []

    @property
    def needs_hidden_states(self) -> bool:
        return any(s.needs_hidden_states for s in self.parts)

    @property
    def reconstruction_scorer(self) -> Optional[Scorer]:
        """The part whose scores need a reconstruction pass (None: compress per layer)."""
        return next((s for s in self.parts if s.needs_reconstruction), None)

    @property
    def needs_reconstruction(self) -> bool:
        return self.reconstruction_scorer is not None

    @property
    def static_scorer(self) -> Optional[Scorer]:
        """The part whose scores are per token and static (``Scorer.static_scores``): the shim
        computes its ``token_scores`` once per token and keeps them beside the cache."""
        return next((s for s in self.parts if s.static_scores), None)

    @property
    def spans_layers(self) -> bool:
        """Whether the policy splits one budget over every compressed layer (global)."""
        return self.scorer is not None and self.policy.spans_layers

    @property
    def deferred(self) -> bool:
        """Whether compression waits for the whole prefill forward (a reconstruction pass, or
        a policy over every layer's scores)."""
        return self.needs_reconstruction or self.spans_layers

    @property
    def redundancy(self) -> Optional[Tensor]:
        """The offline redundancy profile of a MixKV mix, if any."""
        for part in self.parts:
            if isinstance(getattr(part, "redundancy", None), Tensor):
                return part.redundancy
        return None

    def budget_for(self, prompt_len: int) -> int:
        """Tokens to keep per head for a prompt of this length (window included)."""
        if self.budget is not None:
            return self.budget
        return max(self.window + 1, int(round(prompt_len * (1.0 - self.ratio))))

    def compress(self, prefill: Prefill, budget: int) -> Selection:
        """Kept K/V of one layer (N > budget)."""
        keys, values, mask, W = prefill.keys, prefill.values, prefill.key_mask, prefill.window
        fused = self.scorer.fused_options(prefill)
        if fused is not None and self.policy.native():
            # fused: mode, redundancy, pool_kernel, pooling, gqa_reduce (the schema's names)
            common = dict(q_window=prefill.queries, keys=keys, values=values, key_mask=mask,
                          budget=budget, window=W, scaling=prefill.scaling, **fused)
            if self.policy.headwise:
                return Selection(*torch.ops.mixkv.compress_ragged(
                    **common, **self.policy.op_keywords(prefill)))
            return Selection(*torch.ops.mixkv.compress(**common))
        importance, scores = self.scored(prefill)
        capacity = budget - W
        if not self.policy.headwise:
            return Selection(*torch.ops.mixkv.select_kv(
                scores=scores, keys=keys, values=values, capacity=capacity, window=W,
                key_mask=mask))
        capacities = self.policy.capacities(importance, capacity, prefill)
        return Selection(*_select_ragged(scores, capacities, prefill))

    def compress_layers(self, prefills: Dict[int, Prefill], budget: int
                        ) -> Dict[int, Selection]:
        """Kept K/V of several layers (each N > budget): per layer (``compress``), or, under a
        policy that ``spans_layers``, every layer scored first, then one split of the budget
        over all of them, then each layer's selection."""
        if not self.policy.spans_layers:
            return {i: self.compress(p, budget) for i, p in prefills.items()}
        scored = {i: self.scored(p) for i, p in prefills.items()}
        capacities = self.policy.layer_capacities({i: s[0] for i, s in scored.items()},
                                                  budget - self.window, prefills)
        return {i: Selection(*_select_ragged(scored[i][1], capacities[i], p))
                for i, p in prefills.items()}

    def scored(self, prefill: Prefill) -> Tuple[Tensor, Tensor]:
        """(importance, scores) [B, Hkv, C] float32 of the scorer, checked, with the
        candidates a scorer part always keeps (``Scorer.always_kept``) raised to 1 above the
        layer's highest real score (both tensors), so every policy counts and every head
        selects them first."""
        importance, scores = (self._checked(x, prefill)
                              for x in self.scorer.score_with_importance(prefill))
        kept = None
        for part in self.scorer.parts():
            mask = part.always_kept(prefill)
            if mask is not None:
                mask = mask.to(device=scores.device, dtype=torch.bool)
                kept = mask if kept is None else kept | mask
        if kept is None or not bool(kept.any()):
            return importance, scores
        kept = (kept & prefill.real_candidates())[:, None, :]
        return _raised(importance, kept, prefill), _raised(scores, kept, prefill)

    def _checked(self, scores: Tensor, prefill: Prefill) -> Tensor:
        B, Hkv = prefill.keys.shape[:2]
        want = (B, Hkv, prefill.candidates)
        if not isinstance(scores, Tensor) or tuple(scores.shape) != want:
            raise ValueError(f"mixkv: scorer {self.scorer.label!r} returned "
                             f"{getattr(scores, 'shape', type(scores).__name__)}, expected "
                             f"scores of shape {list(want)} (rows, KV heads, candidates)")
        return scores.to(device=prefill.keys.device, dtype=torch.float32).contiguous()


def _select_ragged(scores: Tensor, capacities: Tensor, prefill: Prefill):
    """``select_kv_ragged`` of one layer's scores with per-head capacities."""
    return torch.ops.mixkv.select_kv_ragged(
        scores=scores, keys=prefill.keys, values=prefill.values,
        capacity=capacities.to(torch.int32), window=prefill.window, key_mask=prefill.key_mask)


def _raised(x: Tensor, kept: Tensor, prefill: Prefill) -> Tensor:
    """`x` with the `kept` [B, 1, C] candidates set to 1 + the highest finite real value of
    the layer (1 when there is none)."""
    real = prefill.real_candidates()[:, None, :] & torch.isfinite(x)
    top = torch.where(real, x, float("-inf")).amax() if bool(real.any()) else x.new_zeros(())
    top = torch.where(torch.isfinite(top), top, 0.0)
    return torch.where(kept, top + 1.0, x).contiguous()


def constructor_options(cls: type) -> Dict[str, inspect.Parameter]:
    """The options a registered class takes, as parameters (name, kind, default; a
    ``default_factory``'s value as the default): a dataclass part's init fields, else its
    constructor's named parameters; the part it wraps (``inner``, ``scorer``) is no option."""
    fields = _option_fields(cls)
    if fields is not None:
        def default(f):
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return inspect.Parameter.empty
        return {f.name: inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY if f.kw_only
                                          else inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                          default=default(f))
                for f in fields if f.name != cls.wraps}
    skip = {"self", "inner", "scorer"}
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items()
            if n not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
