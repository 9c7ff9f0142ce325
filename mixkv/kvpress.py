"""MixKV for NVIDIA kvpress: presses whose scores come from ``torch.ops.mixkv``.

kvpress (https://github.com/NVIDIA/kvpress) runs a *press* over a Hugging Face model: a
``ScorerPress`` scores every token of every KV head after prefill and keeps the top
``int(N * (1 - compression_ratio))`` of each head. The presses here are ScorerPresses, so
kvpress's wrappers of a ScorerPress take them: ``pipeline("kv-press-text-generation")``,
``AdaKVPress`` (head-wise budgets, by masking: kvpress frees no memory there),
``PerLayerCompressionPress``, ``DecodingPress`` and kvpress's evaluation scripts (tested in
tests/kvpress). ``ChunkPress`` and ``BlockPress``, which score slices of the sequence with the
whole sequence's rotary embeddings, are refused with an error.

- :class:`MixKVPress`: MixKV over SnapKV scores, ``S = r D~ + (1 - r)(A + V~)`` per head, with
  ``A`` the pooled attention of the last ``window_size`` queries, ``V~``/``D~`` the value norm and
  key diversity rescaled to ``A``'s mean, ``r`` the head's key redundancy (online, or an offline
  ``redundancy`` profile [num_layers, num_kv_heads]).
- :class:`MixKVSnapKVPress` (``A`` alone: SnapKV through the mixkv ops),
  :class:`MixKVValueNormPress` (``A + V~``), :class:`MixKVKeyDiffPress` (``D~``: KeyDiff with the
  window kept), :class:`MixKVMix3Press` (``(A + V~ + D~) / 3``): the other mix modes.

Scores cover all N tokens, as kvpress expects. mixkv always keeps the observation window (the
last ``window_size`` tokens): the window's scores are set above every candidate score of the
batch row (the row's maximum + 1, rising with position), so a plain ScorerPress, AdaKVPress's
cross-head ranking and PerLayerCompressionPress keep the whole window whenever a head keeps at
least ``window_size`` tokens, and the most recent window tokens otherwise. The candidates
(positions 0 .. N-W-1) are ranked exactly as ``torch.ops.mixkv.compress`` ranks them.

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

from .methods import load_profile
from .reference import MODES

__all__ = ["MixKVPress", "MixKVSnapKVPress", "MixKVValueNormPress", "MixKVKeyDiffPress",
           "MixKVMix3Press", "window_queries", "window_scores"]

_NEEDS_VALUES = ("vnorm", "mix3", "mixkv")
_NEEDS_DIVERSITY = ("keydiff", "mix3", "mixkv")


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
    half = rotary // 2
    rotated = torch.cat((-q_rot[..., half:], q_rot[..., :half]), dim=-1)
    q_rot = q_rot * cos + rotated * sin
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


@dataclasses.dataclass
class MixKVPress(ScorerPress):
    """MixKV over SnapKV scores as a kvpress ScorerPress.

    Parameters
    ----------
    compression_ratio : float
        Fraction of the prompt's tokens removed per head (kvpress convention); the kept
        ``int(N * (1 - ratio))`` include the window.
    window_size : int, default 32
        Observation window: its queries score the candidates and its tokens are always kept.
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

    compression_ratio: float = 0.0
    window_size: int = 32
    kernel_size: int = 5
    mode: str = "mixkv"
    pooling: str = "avg"
    gqa_reduce: str = "mean"
    redundancy: Union[None, str, os.PathLike, torch.Tensor] = None

    def __post_init__(self):
        name = type(self).__name__
        if not (isinstance(self.compression_ratio, (int, float))
                and 0.0 <= self.compression_ratio < 1.0):
            raise ValueError(f"{name}: compression_ratio must be in [0, 1), got "
                             f"{self.compression_ratio!r}")
        if not isinstance(self.window_size, int) or self.window_size < 1:
            raise ValueError(f"{name}: window_size must be an integer >= 1, got "
                             f"{self.window_size!r}")
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
        if self.redundancy is not None:
            if self.mode != "mixkv":
                raise ValueError(f"{name}: a redundancy profile is only used by mode 'mixkv' "
                                 f"(mode is {self.mode!r})")
            try:
                self._redundancy = load_profile(self.redundancy, "redundancy")
            except ValueError as error:
                raise ValueError(f"{name}: redundancy: {error}") from error
        else:
            self._redundancy = None
        super().__post_init__()

    def candidate_scores(self, module: nn.Module, hidden_states: torch.Tensor,
                         keys: torch.Tensor, values: torch.Tensor, kwargs) -> torch.Tensor:
        """mixkv's score [B, Hkv, N - W] float32 of the candidates (the window excluded)."""
        name = type(self).__name__
        B, Hkv, N, _ = keys.shape
        W = self.window_size
        if N <= W:
            raise ValueError(f"{name}: the prompt ({N} tokens) must be longer than "
                             f"window_size ({W})")
        rope = kwargs.get("position_embeddings")
        T = hidden_states.shape[1]
        if T < W:
            raise ValueError(f"{name}: window_size ({W}) needs the last {W} queries, but this "
                             f"call has {T} hidden states")
        if rope is not None and rope[0].shape[-2] > T:
            raise ValueError(f"{name}: this call has {T} hidden states but rotary embeddings "
                             f"for {rope[0].shape[-2]} positions; wrappers that score slices of "
                             "the sequence (ChunkPress, BlockPress) are not supported")
        if rope is not None and rope[0].shape[-2] < T:
            # DecodingPress: a buffer of the latest hidden states, the rotary embeddings of
            # this step only. The buffer ends at this step's token.
            hidden_states = hidden_states[:, -W:]
            rope = self._latest_rope(module, hidden_states, kwargs)
        q = window_queries(module, hidden_states, W, rope)
        scaling = getattr(module, "scaling", None)
        scaling = None if scaling is None else float(scaling)
        ops = torch.ops.mixkv
        importance = ops.window_importance(q, keys, None, self.kernel_size, self.pooling,
                                           self.gqa_reduce, scaling)
        vnorm = ops.value_norm(values, W, None) if self.mode in _NEEDS_VALUES else None
        diversity = redundancy = None
        if self.mode in _NEEDS_DIVERSITY:
            diversity, redundancy = ops.key_diversity(keys, W, None)
        if self.mode == "mixkv" and self._redundancy is not None:
            layer = module.layer_idx
            num_layers = getattr(module.config, "num_hidden_layers", None)
            if self._redundancy.shape[1] != Hkv or layer >= self._redundancy.shape[0] or (
                    num_layers is not None and self._redundancy.shape[0] != num_layers):
                raise ValueError(f"{name}: redundancy profile has shape "
                                 f"{tuple(self._redundancy.shape)}, the model needs "
                                 f"[{num_layers}, {Hkv}]")
            redundancy = self._redundancy[layer].to(keys.device).expand(B, Hkv).contiguous()
        return ops.mix_scores(importance, vnorm, diversity, redundancy, self.mode, None)

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
        """Scores [B, Hkv, N] float32: mixkv's candidate scores, then the window above them."""
        scores = self.candidate_scores(module, hidden_states, keys, values, kwargs)
        return window_scores(scores, self.window_size)


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

