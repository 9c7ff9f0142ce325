"""The scorers: SnapKV's window attention, key norm, random, StreamingLLM, TOVA, expected
attention, and the mixers (MixKV and its ablations) that wrap any of them.

Adding a scorer: one class here (or anywhere, even a notebook) with ``@register_scorer``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Optional, Tuple, Union

import torch
from torch import Tensor

from .base import (BudgetPolicy, Prefill, Scorer, load_profile, options_dataclass, overrides,
                   profile_row, register_scorer)
from .modes import DIVERSITY, REDUNDANCY, VALUE_NORM, reads


@register_scorer("snapkv")
@options_dataclass
class SnapKV(Scorer):
    """Attention from the window queries to each candidate, pooled (SnapKV; mode "attn").

    ``window``: SnapKV's observation window (the last prompt tokens, whose queries score the
    others and which are always kept); None leaves it to the method (``patch(window=...)``,
    default ``DEFAULT_WINDOW``). It sets the window of the whole method:
    ``MixKV(AdaKV(SnapKV(window=16)))``."""

    mode: ClassVar[str] = "attn"   # its score mode in the fused op

    pool_kernel: int = 5
    pooling: str = "avg"
    gqa_reduce: str = "mean"
    window: Optional[int] = None

    def __post_init__(self):
        window = self.window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"mixkv: SnapKV window must be an integer >= 1, got {window!r}")

    def score(self, p: Prefill) -> Tensor:
        return torch.ops.mixkv.window_importance(
            q_window=p.queries, keys=p.keys, key_mask=p.key_mask, pool_kernel=self.pool_kernel,
            pooling=self.pooling, gqa_reduce=self.gqa_reduce, scaling=p.scaling)

    def fused_options(self, p: Prefill) -> Optional[dict]:
        if overrides(self, SnapKV, "score", "score_with_importance"):
            return None
        return dict(mode=self.mode, pool_kernel=self.pool_kernel, pooling=self.pooling,
                    gqa_reduce=self.gqa_reduce, redundancy=None)


@register_scorer("knorm")
@options_dataclass
class KeyNorm(Scorer):
    """Low key norm ~ high attention (Devoto et al., 2024): score -|K|."""

    def score(self, p: Prefill) -> Tensor:
        return -p.keys[:, :, :p.candidates].float().norm(dim=-1)

    def score_with_importance(self, p: Prefill):
        scores = self.score(p)
        # Policies and mixers need a non-negative importance: the norm's distance to the
        # head's largest real norm ranks tokens as the score does.
        real = p.real_candidates()[:, None, :]
        top = torch.where(real, -scores, 0.0).amax(-1, keepdim=True)
        return torch.where(real, top + scores, 0.0), scores


@register_scorer("random")
@options_dataclass
class Random(Scorer):
    """Seeded uniform scores, one generator per (seed, layer): a floor for every method."""

    seed: int = 0

    def score(self, p: Prefill) -> Tensor:
        B, Hkv = p.keys.shape[:2]
        g = torch.Generator().manual_seed(self.seed * 100003 + p.layer)
        return torch.rand(B, Hkv, p.candidates, generator=g).to(p.keys.device)


@register_scorer("streamingllm")
@options_dataclass
class StreamingLLM(Scorer):
    """Attention sinks then recency: the first `sinks` real tokens, then the most recent."""

    sinks: int = 4

    def score(self, p: Prefill) -> Tensor:
        B, Hkv = p.keys.shape[:2]
        C, device = p.candidates, p.keys.device
        pads = torch.zeros(B, 1, device=device) if p.key_mask is None else \
            (~p.key_mask[:, :C]).sum(-1, keepdim=True).float()
        relative = torch.arange(C, device=device)[None, :] - pads
        scores = torch.where(relative < self.sinks, 2.0, relative / max(C, 1))
        return scores[:, None, :].expand(B, Hkv, C).contiguous()


@options_dataclass
class Mixer(Scorer):
    """Mixes an inner scorer's importance A with value norm and key diversity by ``mode`` of
    ``torch.ops.mixkv.mix_scores`` (docs/design.md section 4, steps 2-5: V and D are min-max
    normalised over each head's real candidates and rescaled to the mean of A; which inputs a
    mode reads: ``modes.MODE_INPUTS``).

    ``inner`` is any scorer (default SnapKV), or a budget policy over one:
    ``MixKV(AdaKV(SnapKV()))`` is AdaKV over ``MixKV(SnapKV())`` (the mix decides which tokens
    a head keeps, the policy how many, from the inner importance). The mixer then keeps the
    policy, without its scorer, in ``policy``; ``resolve`` gives both spellings the same
    :class:`Method`."""

    mode: ClassVar[str] = ""
    wraps: ClassVar[str] = "inner"

    inner: Union[Scorer, BudgetPolicy, None] = None
    policy: Optional[BudgetPolicy] = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        if isinstance(self.inner, BudgetPolicy):
            self.policy, self.inner = self.inner.without_scorer(), self.inner.scorer
        if self.inner is None:
            self.inner = SnapKV()
        if not isinstance(self.inner, Scorer):
            raise TypeError(f"mixkv: {type(self).__name__} wraps a Scorer, got {self.inner!r}")

    def redundancy_row(self, p: Prefill) -> Optional[Tensor]:
        """[B, Hkv] redundancy replacing the online one (None: online)."""
        return None

    def score(self, p: Prefill) -> Tensor:
        return self.score_with_importance(p)[1]

    def score_with_importance(self, p: Prefill):
        importance, _ = self.inner.score_with_importance(p)
        importance = importance.float().contiguous()
        W, mask = p.window, p.key_mask
        norms = diversity = redundancy = None
        if reads(self.mode, VALUE_NORM):
            norms = torch.ops.mixkv.value_norm(values=p.values, window=W, key_mask=mask)
        if reads(self.mode, DIVERSITY) or reads(self.mode, REDUNDANCY):
            diversity, redundancy = torch.ops.mixkv.key_diversity(keys=p.keys, window=W,
                                                                  key_mask=mask)
        offline = self.redundancy_row(p)
        if offline is not None:
            redundancy = offline
        return importance, torch.ops.mixkv.mix_scores(
            importance=importance, value_norm=norms, diversity=diversity,
            redundancy=redundancy, mode=self.mode, key_mask=mask)

    def fused_options(self, p: Prefill) -> Optional[dict]:
        inner = self.inner.fused_options(p)
        if inner is None or inner["mode"] != SnapKV.mode or \
                overrides(self, Mixer, "score", "score_with_importance"):
            return None
        return dict(inner, mode=self.mode, redundancy=self.redundancy_row(p))

    def parts(self):
        return [self] + self.inner.parts()

    @property
    def label(self) -> str:
        inner = self.inner.label
        return self.name if inner == SnapKV.name else f"{self.name}({inner})"


@register_scorer("mixkv")
@options_dataclass
class MixKV(Mixer):
    """MixKV: S = r D~ + (1 - r)(A + V~), r the head's key redundancy (``"online"``, or a row of
    an offline [L, Hkv] ``redundancy`` profile: tensor or torch.save file, loaded into a float32
    tensor; None is "online")."""

    mode: ClassVar[str] = "mixkv"

    redundancy: Union[str, os.PathLike, Tensor, None] = "online"

    def __post_init__(self):
        super().__post_init__()
        profile = load_profile(self.redundancy, "redundancy")
        self.redundancy = "online" if profile is None else profile

    def redundancy_row(self, p: Prefill) -> Optional[Tensor]:
        if not isinstance(self.redundancy, Tensor):
            return None
        row = profile_row(self.redundancy, "redundancy", p)[p.layer]
        return row.expand(p.keys.shape[0], -1).contiguous()


@register_scorer("vnorm")
@options_dataclass
class ValueNorm(Mixer):
    """Importance plus normalised value norm: S = A + V~."""

    mode: ClassVar[str] = "vnorm"


@register_scorer("keydiff")
@options_dataclass
class KeyDiff(Mixer):
    """Diversity only (KeyDiff): S = D~ (budgets still come from the inner importance)."""

    mode: ClassVar[str] = "keydiff"


@register_scorer("mix3")
@options_dataclass
class Mix3(Mixer):
    """Equal mix: S = (A + V~ + D~) / 3."""

    mode: ClassVar[str] = "mix3"


@register_scorer("tova")
@options_dataclass
class TOVA(Scorer):
    """TOVA (Oren et al., 2024): the attention of the last prompt token's query alone,
    averaged over all query heads of the layer (so every KV head ranks alike)."""

    def score(self, p: Prefill) -> Tensor:
        last = p.queries[..., -1:, :]
        # window_importance with a one-query window: candidates 0 .. N-2, no pooling.
        attention = torch.ops.mixkv.window_importance(
            q_window=last, keys=p.keys, key_mask=p.key_mask, pool_kernel=1, pooling="avg",
            gqa_reduce="mean", scaling=p.scaling)[..., :p.candidates]
        return attention.mean(1, keepdim=True).expand_as(attention).contiguous()


def rotate_half(x: Tensor) -> Tensor:
    """RoPE's half rotation, (x1, x2) -> (-x2, x1) over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@register_scorer("expected_attention")
@options_dataclass
class ExpectedAttention(Scorer):
    """Query-agnostic: the attention each key would get from the *future* queries, estimated
    without them (after kvpress's ExpectedAttentionPress; its defaults are the defaults here).

    The pre-RoPE queries of the prompt (the layer's hidden states through ``q_proj`` and
    ``q_norm``; the first ``skip_first`` real tokens left out) are modelled as a Gaussian per
    query head, mean mu and covariance Sigma, rotated by the RoPE rotation R averaged over the
    next ``future_positions`` positions. A key's expected logit is then
    ``s R mu . k + s^2 k^T (R Sigma R^T) k / 2`` (s the attention scaling; the second term,
    ``use_covariance``, is log E[exp] of the Gaussian's spread); its softmax over the real keys
    past the sinks, averaged over each KV head's query heads, is weighted by the value norm
    (``(a + epsilon) * |V|``; ``use_vnorm=False``: ``a`` alone, epsilon unused).

    ``sinks``: the first ``sinks`` real tokens (attention sinks) are always kept, scored above
    every other candidate of the batch row, and left out of the softmax, as kvpress's
    ``n_sink`` does; their importance (for budget policies and mixers, which may still trade
    them) is the row's largest. Their values are small, so the value norm ranks them low and
    many heads drop them (then SmolLM2 mostly answers nothing: benchmarks/RESULTS.md,
    "Expected attention against kvpress"); ``sinks=0`` scores them like any other token and
    takes the softmax over every real key (mixkv's scorer before this option).

    The defaults are the press's; kvpress's leaderboard entry is
    ``AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))``, here ``"expected_attention+adakv"``
    with ``epsilon=0.01``. The observation window is always kept (kvpress ranks it).
    Scores and importance: [B, Hkv, C] float32, >= 0, 0 at padding."""

    needs_hidden_states: ClassVar[bool] = True

    future_positions: int = 512
    skip_first: int = 4
    epsilon: float = 0.0
    use_covariance: bool = True
    sinks: int = 4
    use_vnorm: bool = True

    def __post_init__(self):
        for name in ("future_positions", "skip_first", "sinks"):
            value, least = getattr(self, name), int(name == "future_positions")
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"mixkv: expected_attention's {name} must be an integer >= "
                                 f"{least}, got {value!r}")
        for name in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"mixkv: expected_attention's {name} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        epsilon = self.epsilon
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or \
                not 0 <= epsilon < float("inf"):
            raise ValueError("mixkv: expected_attention's epsilon must be a finite number >= 0, "
                             f"got {epsilon!r}")
        self.epsilon = float(epsilon)

    def score_with_importance(self, p: Prefill) -> Tuple[Tensor, Tensor]:
        B, Hkv, N, D = p.keys.shape
        C = p.candidates
        mean_query, covariance = self._future_query_statistics(p)        # [B, Hq, D(, D)]
        Hq = mean_query.shape[1]
        keys = p.keys.float().repeat_interleave(Hq // Hkv, dim=1)       # [B, Hq, N, D]
        scale = D ** -0.5 if p.scaling is None else p.scaling
        logits = (keys @ mean_query[..., None]).squeeze(-1) * scale      # [B, Hq, N]
        if covariance is not None:
            logits = logits + 0.5 * scale ** 2 * ((keys @ covariance) * keys).sum(-1)
        real = torch.ones(B, N, dtype=torch.bool, device=p.keys.device) if p.key_mask is None \
            else p.key_mask.bool()
        sink = real & (real.long().cumsum(-1) <= self.sinks)             # [B, N]
        attended = real & ~sink
        # A prompt of sinks alone (too short for them): the softmax over every real key.
        attended = torch.where(attended.any(-1, keepdim=True), attended, real)
        logits = logits.masked_fill(~attended[:, None, :], float("-inf"))
        attention = logits.softmax(-1).view(B, Hkv, Hq // Hkv, N).mean(2)[..., :C]
        if self.use_vnorm:
            norms = p.values[:, :, :C].float().norm(dim=-1)
            attention = (attention + self.epsilon) * norms
        importance = torch.where(p.real_candidates()[:, None, :], attention, 0.0)
        if not self.sinks:
            return importance, importance
        # The sinks count as the row's most important candidate for policies and mixers (a
        # value of the scores, not a constant that would shift a mixer's rescaling), and
        # select above every candidate of the row, in every head.
        top = importance.flatten(1).amax(-1)[:, None, None]
        sink = sink[:, None, :C]
        return torch.where(sink, top, importance), torch.where(sink, top + 1.0, importance)

    def score(self, p: Prefill) -> Tensor:
        return self.score_with_importance(p)[1]

    def _mean_future_query(self, p: Prefill) -> Tensor:
        return self._future_query_statistics(p)[0]

    def _future_query_statistics(self, p: Prefill) -> Tuple[Tensor, Optional[Tensor]]:
        """(R mu [B, Hq, D], R Sigma R^T [B, Hq, D, D] or None without use_covariance)."""
        module, decoder, hidden = p.module, p.decoder, p.hidden_states
        rotary = getattr(decoder, "rotary_emb", None)
        if getattr(module, "q_proj", None) is None or rotary is None or hidden is None:
            raise NotImplementedError(
                f"mixkv: scorer {self.label!r} needs the layer's hidden states, an attention "
                "module with q_proj and a decoder with rotary_emb (Llama, Mistral, Qwen2/3, "
                "Gemma)")
        B, N = hidden.shape[:2]
        D = p.keys.shape[-1]
        queries = module.q_proj(hidden).view(B, N, -1, D)
        if getattr(module, "q_norm", None) is not None:
            queries = module.q_norm(queries)
        queries = queries.float()
        real = torch.ones(B, N, dtype=torch.bool, device=hidden.device) if p.key_mask is None \
            else p.key_mask.bool().to(hidden.device)
        rank = real.long().cumsum(-1)                                    # 1-based among real
        used = (real & (rank > self.skip_first)).float()
        used = torch.where(used.sum(-1, keepdim=True) > 0, used, real.float())
        count = used.sum(1)[:, None, None]                               # [B, 1, 1]
        mean = (queries * used[..., None, None]).sum(1) / count          # [B, Hq, D]
        # Future positions continue each row's real tokens (left padding has no positions).
        future = rank[:, -1:] + torch.arange(self.future_positions, device=hidden.device)
        kwargs = {}
        if isinstance(getattr(rotary, "rope_type", None), dict):  # one RoPE per layer type
            kwargs["layer_type"] = decoder.config.layer_types[p.layer]
        cos, sin = rotary(hidden, future, **kwargs)                      # [B, F, D]
        cos, sin = cos.float().mean(1), sin.float().mean(1)              # [B, D]
        # The averaged rotation as a matrix: R x = cos * x + sin * rotate_half(x).
        eye = torch.eye(D, device=hidden.device)
        rotation = torch.diag_embed(cos) + sin[:, :, None] * rotate_half(eye).T  # [B, D, D]
        rotation = rotation[:, None]                                     # [B, 1, D, D]
        mean_rotated = (rotation @ mean[..., None]).squeeze(-1)
        covariance = None
        if self.use_covariance:
            centred = (queries - mean[:, None]) * used[..., None, None]   # [B, N, Hq, D]
            covariance = torch.einsum("bnhd,bnhe->bhde", centred, centred) / count[..., None]
            covariance = rotation @ covariance @ rotation.transpose(-1, -2)
            covariance = covariance.to(p.keys.device)
        return mean_rotated.to(p.keys.device), covariance
