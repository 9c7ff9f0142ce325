"""mixkv's methods for NVIDIA kvpress: presses whose scores come from mixkv's scorers and ops.

kvpress (https://github.com/NVIDIA/kvpress) runs a *press* over a Hugging Face model: a
``ScorerPress`` scores every token of every KV head after prefill and keeps the top
``int(N * (1 - compression_ratio))`` of each head. :class:`MethodPress` is one ScorerPress for
any mixkv method under a uniform budget, by name or object: ``MethodPress(method="tova")``,
``MethodPress(method="mixkv(knorm)")``, ``MethodPress(method=MixKV(TOVA()))``,
``MethodPress(method="streamingllm", options=dict(sinks=8))``. kvpress's wrappers of a
ScorerPress take it: ``pipeline("kv-press-text-generation")``, ``AdaKVPress`` (head-wise budgets,
by masking: kvpress frees no memory there), ``PerLayerCompressionPress``, ``DecodingPress`` and
kvpress's evaluation scripts (tested in tests/kvpress). ``ChunkPress`` and ``BlockPress``, which
score slices of the sequence with the whole sequence's rotary embeddings, are refused with an
error. Head-wise or cross-layer policies (``+adakv``, ``+pyramidkv``, ``+global``) are refused:
in kvpress the wrapper decides the split (``AdaKVPress(MethodPress(...))``); so is ``kvzip``,
whose reconstruction pass kvpress runs itself (``KVzipPress``).

The five presses of earlier releases stay, as MethodPress with their own options:
:class:`MixKVPress` (MixKV over SnapKV, ``mode`` picking the mix: "mixkv", "attn" SnapKV,
"vnorm", "keydiff", "mix3"; ``kernel_size``, ``pooling``, ``gqa_reduce``, ``redundancy``) and
:class:`MixKVSnapKVPress`, :class:`MixKVValueNormPress`, :class:`MixKVKeyDiffPress`,
:class:`MixKVMix3Press` (one mode each).

Scores cover all N tokens, as kvpress expects. mixkv always keeps the observation window (the
last ``window_size`` tokens): the window's scores are set above every candidate score of the
batch row (the row's maximum + 1, rising with position), so a plain ScorerPress, AdaKVPress's
cross-head ranking and PerLayerCompressionPress keep the whole window whenever a head keeps at
least ``window_size`` tokens, and the most recent window tokens otherwise. The candidates
(positions 0 .. N-W-1) are ranked by the method's own scores (``Method.scored``: the scorer,
its mixer, the tokens it always keeps), as ``mixkv.patch`` ranks them.

Window queries are recomputed from the layer's input hidden states (the last ``window_size``
rows through ``q_proj``, the optional ``q_norm``, and RoPE from ``position_embeddings``, or, for
DecodingPress's buffered hidden states, from the module's ``rotary_emb`` at their true
positions), as kvpress's SnapKVPress does; the attention scale is the module's own ``scaling``.

This module imports kvpress, which pins ``transformers>=4.56,<5.3``: install it in its own
virtual environment (README "Use with kvpress").
"""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Optional, Union

import torch
from torch import nn

try:
    from kvpress.presses.scorer_press import ScorerPress
except ImportError as _error:  # pragma: no cover - exercised without kvpress installed
    raise ImportError(
        "mixkv.kvpress needs NVIDIA kvpress (`pip install kvpress`, which pins "
        "transformers>=4.56,<5.3; use its own virtual environment, see the README section "
        "'Use with kvpress')") from _error

import mixkv  # noqa: F401  (loads the op library)

from .methods import (DEFAULT_WINDOW, FULL, MODES, BudgetPolicy, Method, Prefill, Scorer,
                      load_profile, mode_method, resolve)
from .methods.modes import REDUNDANCY, reads
from .methods.scorers import rotate_half

__all__ = ["MethodPress", "MixKVPress", "MixKVSnapKVPress", "MixKVValueNormPress", "MixKVKeyDiffPress",
           "MixKVMix3Press", "window_queries", "window_scores"]

def window_queries(module: nn.Module, hidden_states: torch.Tensor, window: int,
                   position_embeddings) -> torch.Tensor:
    """Post-RoPE queries [B, Hq, W, D] of the last ``window`` positions of one attention layer,
    recomputed from its input ``hidden_states`` [B, N, hidden] (q_proj or the query part of a
    fused qkv_proj, then q_norm if the module has one, then rotary embedding with the given
    ``(cos, sin)`` [B, N, rotary_dim]; dimensions past rotary_dim pass through)."""
    config = module.config
    B = hidden_states.shape[0]
    Hq, D = config.num_attention_heads, module.head_dim
    h = hidden_states[:, -window:]
    if getattr(module, "q_proj", None) is not None:
        q = module.q_proj(h)
    elif getattr(module, "qkv_proj", None) is not None:  # Phi-3
        q = module.qkv_proj(h)[..., : Hq * D]
    else:
        raise NotImplementedError(
            f"mixkv.kvpress: {type(module).__name__} has neither q_proj nor qkv_proj; the "
            "window queries cannot be recomputed")
    q = q.view(B, window, Hq, D)
    q_norm = getattr(module, "q_norm", None)
    if q_norm is not None:  # Qwen3, Gemma3: RMSNorm over the head dimension
        q = q_norm(q)
    q = q.transpose(1, 2)
    if position_embeddings is None:
        raise ValueError("mixkv.kvpress: the attention layer got no position_embeddings "
                         "(cos, sin); only RoPE models are supported")
    cos, sin = position_embeddings
    cos = cos[:, -window:].unsqueeze(1).to(q.dtype)
    sin = sin[:, -window:].unsqueeze(1).to(q.dtype)
    rotary = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary], q[..., rotary:]
    q_rot = q_rot * cos + rotate_half(q_rot) * sin
    return torch.cat((q_rot, q_pass), dim=-1) if q_pass.shape[-1] else q_rot


def window_scores(candidate_scores: torch.Tensor, window: int) -> torch.Tensor:
    """Scores [B, H, C + W] of all tokens from the candidates' [B, H, C]: the W window tokens
    score above every candidate of their batch row (row max + 1 + position / W), so any
    top-k of a row, within one head or across heads, takes the window first, latest first."""
    B, H, C = candidate_scores.shape
    top = candidate_scores.reshape(B, -1).amax(dim=-1) if C > 0 else \
        torch.zeros(B, device=candidate_scores.device)
    ramp = torch.arange(1, window + 1, device=candidate_scores.device,
                        dtype=candidate_scores.dtype) / window
    win = (top[:, None, None] + 1.0 + ramp[None, None, :]).expand(B, H, window)
    return torch.cat([candidate_scores, win.to(candidate_scores.dtype)], dim=-1)


def _without_prefix(error: Exception) -> str:
    return str(error).removeprefix("mixkv: ")


@dataclasses.dataclass
class MethodPress(ScorerPress):
    """Any mixkv method under a uniform budget as a kvpress ScorerPress.

    Parameters
    ----------
    compression_ratio : float
        Fraction of the prompt's tokens removed per head (kvpress convention); the kept
        ``int(N * (1 - ratio))`` include the window.
    method : str, Scorer or BudgetPolicy, default "mixkv"
        A method as ``mixkv.patch`` takes it ("tova", "mixkv(knorm)", "streamingllm",
        ``MixKV(TOVA())``, ...) under the uniform policy.
    window_size : int, default ``mixkv.constants.DEFAULT_WINDOW``
        Observation window: its queries score the candidates and its tokens are always kept.
    options : dict
        The method's options, as ``mixkv.patch``'s keywords (``sinks``, ``seed``,
        ``pool_kernel``, ``redundancy``, ...).
    """

    compression_ratio: float = 0.0
    window_size: int = DEFAULT_WINDOW
    # keyword-only: MixKVPress keeps its positional fields (ratio, window, kernel_size, ...)
    method: Union[str, Scorer, BudgetPolicy] = dataclasses.field(default="mixkv", kw_only=True)
    options: dict = dataclasses.field(default_factory=dict, kw_only=True)

    def __post_init__(self):
        name = type(self).__name__
        if not (isinstance(self.compression_ratio, (int, float))
                and 0.0 <= self.compression_ratio < 1.0):
            raise ValueError(f"{name}: compression_ratio must be in [0, 1), got "
                             f"{self.compression_ratio!r}")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"{name}: window_size must be an integer >= 1, got "
                             f"{self.window_size!r}")
        self._method = self._resolved()
        super().__post_init__()

    def _spec(self):
        """(method, options) to resolve (subclasses map their own fields)."""
        return self.method, dict(self.options)

    def _resolved(self) -> Method:
        name = type(self).__name__
        method, options = self._spec()
        try:
            resolved = resolve(method, ratio=0.0, window=self.window_size, **options)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{name}: {_without_prefix(error)}") from error
        if resolved.scorer is None:
            raise ValueError(f"{name}: method {FULL!r} compresses nothing; run without a press")
        if resolved.needs_reconstruction:
            raise ValueError(f"{name}: method {resolved.label!r} needs a reconstruction pass "
                             "over the context, which a ScorerPress cannot run; use kvpress's "
                             "KVzipPress")
        if resolved.headwise or resolved.spans_layers:
            raise ValueError(
                f"{name}: method {resolved.label!r} splits budgets by policy "
                f"{resolved.policy.label!r}, but a ScorerPress keeps the same share in every "
                f"head; for head-wise budgets wrap a uniform method in kvpress's AdaKVPress: "
                f"AdaKVPress({name}(method=...))")
        return resolved

    def _prefill(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, kwargs) -> Prefill:
        """What the method scores, from kvpress's arguments: the window queries recomputed
        from the hidden states, the module's scaling, its rotary embedding as the decoder's."""
        name = type(self).__name__
        N = keys.shape[2]
        W = self.window_size
        if N <= W:
            raise ValueError(f"{name}: the prompt ({N} tokens) must be longer than "
                             f"window_size ({W})")
        rope = kwargs.get("position_embeddings")
        T = hidden_states.shape[1]
        needs_hidden = self._method.needs_hidden_states
        if needs_hidden and T != N:
            raise ValueError(f"{name}: method {self._method.label!r} reads the hidden states of "
                             f"every cached token, but this call has {T} for {N} (DecodingPress "
                             "buffers only the latest)")
        if T < W:
            raise ValueError(f"{name}: window_size ({W}) needs the last {W} queries, but this "
                             f"call has {T} hidden states")
        if rope is not None and rope[0].shape[-2] > T:
            raise ValueError(f"{name}: this call has {T} hidden states but rotary embeddings "
                             f"for {rope[0].shape[-2]} positions; wrappers that score slices of "
                             "the sequence (ChunkPress, BlockPress) are not supported")
        window_hidden = hidden_states
        if rope is not None and rope[0].shape[-2] < T:
            # DecodingPress: a buffer of the latest hidden states, the rotary embeddings of
            # this step only. The buffer ends at this step's token.
            window_hidden = hidden_states[:, -W:]
            rope = self._latest_rope(module, window_hidden, kwargs)
        scaling = getattr(module, "scaling", None)
        decoder = types.SimpleNamespace(rotary_emb=getattr(module, "rotary_emb", None),
                                        config=module.config)
        return Prefill(queries=window_queries(module, window_hidden, W, rope), keys=keys,
                       values=values, key_mask=None, window=W, layer=module.layer_idx,
                       num_layers=module.config.num_hidden_layers,
                       scaling=None if scaling is None else float(scaling), module=module,
                       decoder=decoder, hidden_states=hidden_states if needs_hidden else None)

    def candidate_scores(self, module: nn.Module, hidden_states: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, kwargs) -> torch.Tensor:
        """The method's scores [B, Hkv, N - W] float32 of the candidates (the window
        excluded), as ``mixkv.patch`` ranks them."""
        prefill = self._prefill(module, hidden_states, keys, values, kwargs)
        try:
            return self._method.scored(prefill)[1]
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}: {_without_prefix(error)}") from error

    def _latest_rope(self, module, hidden_states, kwargs):
        """(cos, sin) of the ``hidden_states.shape[1]`` positions that end at this call's last
        position (``cache_position``), from the model's rotary embedding (kvpress hands it to
        each attention module as ``rotary_emb``)."""
        rotary = getattr(module, "rotary_emb", None)
        cache_position = kwargs.get("cache_position")
        if rotary is None or cache_position is None:
            raise ValueError(f"{type(self).__name__}: scoring buffered hidden states needs the "
                             "module's rotary_emb and this call's cache_position")
        B, T = hidden_states.shape[:2]
        last = cache_position.reshape(-1)[-1]
        positions = last - (T - 1) + torch.arange(T, device=hidden_states.device)
        return rotary(hidden_states, positions[None].expand(B, T))

    def score(self, module: nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, attentions: Optional[torch.Tensor], kwargs) -> torch.Tensor:
        """Scores [B, Hkv, N] float32: the method's candidate scores, then the window above
        them."""
        scores = self.candidate_scores(module, hidden_states, keys, values, kwargs)
        return window_scores(scores, self.window_size)


@dataclasses.dataclass
class MixKVPress(MethodPress):
    """MixKV over SnapKV scores as a kvpress ScorerPress (``MethodPress`` with SnapKV's options
    as fields; ``method`` is set by ``mode``).

    Parameters
    ----------
    compression_ratio, window_size : as :class:`MethodPress`
    kernel_size : int, default 5
        Pooling kernel over positions (odd).
    mode : str, default "mixkv"
        "mixkv", "attn" (SnapKV), "vnorm", "keydiff" or "mix3" (see ``mixkv.ops.mix_scores``).
    pooling : "avg" | "max";  gqa_reduce : "mean" | "max"
        As in ``torch.ops.mixkv.window_importance``.
    redundancy : None, tensor or path
        None: each head's redundancy measured online from its keys; or an offline profile
        [num_layers, num_kv_heads] (tensor, or a file saved with ``torch.save``), as written by
        ``python -m mixkv.eval.calibrate``. Only used by mode "mixkv".
    """

    kernel_size: int = 5
    mode: str = "mixkv"
    pooling: str = "avg"
    gqa_reduce: str = "mean"
    redundancy: Union[None, str, os.PathLike, torch.Tensor] = None

    def _spec(self):
        name = type(self).__name__
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 \
                or self.kernel_size % 2 == 0:
            raise ValueError(f"{name}: kernel_size must be an odd integer >= 1, got "
                             f"{self.kernel_size!r}")
        if self.mode not in MODES:
            raise ValueError(f"{name}: unknown mode {self.mode!r}; choose one of "
                             f"{', '.join(MODES)}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"{name}: pooling must be 'avg' or 'max', got {self.pooling!r}")
        if self.gqa_reduce not in ("mean", "max"):
            raise ValueError(f"{name}: gqa_reduce must be 'mean' or 'max', got "
                             f"{self.gqa_reduce!r}")
        options = dict(pool_kernel=self.kernel_size, pooling=self.pooling,
                       gqa_reduce=self.gqa_reduce)
        if self.redundancy is not None:
            if not reads(self.mode, REDUNDANCY):
                users = " or ".join(repr(m) for m in MODES if reads(m, REDUNDANCY))
                raise ValueError(f"{name}: a redundancy profile is only used by mode {users} "
                                 f"(mode is {self.mode!r})")
            try:
                options["redundancy"] = load_profile(self.redundancy, "redundancy")
            except ValueError as error:
                raise ValueError(f"{name}: redundancy: {error}") from error
        self.method = mode_method(self.mode)
        return self.method, options


@dataclasses.dataclass
class MixKVSnapKVPress(MixKVPress):
    """SnapKV through the mixkv ops: pooled window attention alone (mode "attn")."""

    mode: str = "attn"


@dataclasses.dataclass
class MixKVValueNormPress(MixKVPress):
    """Window attention plus the value norm rescaled to it, ``A + V~`` (mode "vnorm")."""

    mode: str = "vnorm"


@dataclasses.dataclass
class MixKVKeyDiffPress(MixKVPress):
    """Key diversity (KeyDiff's anchor distance), the window kept (mode "keydiff")."""

    mode: str = "keydiff"


@dataclasses.dataclass
class MixKVMix3Press(MixKVPress):
    """Equal mix of attention, value norm and diversity, ``(A + V~ + D~) / 3`` (mode "mix3")."""

    mode: str = "mix3"
