"""KVzap-style scores (Jegou et al., 2026, "KVzap", arXiv 2601.07891): a learned surrogate of
KVzip. KVzip (``methods/kvzip.py``) scores a cached token by the most attention it receives
while the model re-reads its context, which costs a second pass over the context and cannot run
during generation; KVzap predicts those scores from the token's own hidden state.

Per decoder layer, one linear map from the attention module's input hidden state
``h`` [hidden] to one log-score per KV head: ``log s = h W + b``; the score is ``exp`` of it,
on KVzip's scale (a probability), so budget policies (AdaKV, global) split budgets as KVzip's
scores would. Linear, not KVzap's 2-layer MLP: ridge regression has a closed form (trained in
seconds on a CPU, deterministic), the files are tiny (SmolLM2: 30 x 576 x 3 floats), and the
paper finds the MLP only slightly better. The maps are fitted by ``mixkv-calibrate --kvzap``
(``mixkv/eval/kvzap_train.py``) with KVzip's reconstruction pass as the teacher; files for the
packaged models ship in ``kvzap_weights/``, found by the model's fingerprint.

A token's score depends on that token alone, so the scorer sets ``static_scores``: the shim
computes each token's score once, when its K/V enters the cache (prefill and every decode
step), keeps the scores aligned with the cache, and compresses during generation too
(``mixkv/hf/decode.py``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar, Dict, Optional, Union

import torch
from torch import Tensor, nn

from .base import Prefill, Scorer, options_dataclass, register_scorer

WEIGHTS_DIR = Path(__file__).resolve().parent / "kvzap_weights"
FORMAT = "mixkv-kvzap-linear"
# Log-scores are clamped to [LOG_FLOOR, 0] before exp: KVzip's scores are probabilities (<= 1)
# and exp(-69) ~ 1e-30 stays a normal float32, so a score is always finite and positive.
LOG_FLOOR = -69.0


def fingerprint(config) -> str:
    """The architecture a surrogate file fits: model type, hidden size, layers, KV heads x head
    dim of a decoder's config ("llama-h576-l30-kv3x64"). Two checkpoints of one architecture
    (a base model and its instruction-tuned version) share it."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (f"{config.model_type}-h{config.hidden_size}-l{config.num_hidden_layers}-"
            f"kv{kv}x{head_dim}")


def shipped() -> Dict[str, Path]:
    """The surrogate files shipped with mixkv, by fingerprint."""
    return {p.stem: p for p in sorted(WEIGHTS_DIR.glob("*.pt"))}


def random_weights(model: nn.Module, seed: int = 0, scale: float = 0.3) -> dict:
    """An untrained surrogate for ``model`` in the file's format (smoke runs, tests): random
    maps of the compressed layers, log-scores spread ~``scale`` x |h| / sqrt(hidden) around -3."""
    from ..hf.model import compressed_layers

    decoder, modules, layers = compressed_layers(model)
    config = decoder.config
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(len(modules), config.hidden_size, kv, generator=g)
    return dict(format=FORMAT, fingerprint=fingerprint(config), layers=layers,
                weights=scale * weights / config.hidden_size ** 0.5,
                bias=torch.full((len(modules), kv), -3.0))


def load_weights(value) -> dict:
    """A surrogate as a dict (``weights`` [L, hidden, Hkv], ``bias`` [L, Hkv] float32,
    ``layers`` the fitted layers, ``fingerprint``, ...) from a file written by
    ``mixkv-calibrate --kvzap`` or such a dict; errors name the option."""
    if isinstance(value, (str, os.PathLike)):
        if not Path(value).is_file():
            raise FileNotFoundError(f"mixkv: kvzap weights file {str(value)!r} does not exist")
        value = torch.load(value, map_location="cpu", weights_only=True)
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        raise ValueError(f"mixkv: kvzap weights must be a file written by mixkv-calibrate "
                         f"--kvzap (or its dict, format {FORMAT!r}), got "
                         f"{type(value).__name__}")
    weights, bias = value.get("weights"), value.get("bias")
    if not isinstance(weights, Tensor) or weights.dim() != 3 or \
            not isinstance(bias, Tensor) or tuple(bias.shape) != (weights.shape[0],
                                                                  weights.shape[2]):
        raise ValueError("mixkv: kvzap weights need 'weights' [layers, hidden, kv_heads] and "
                         "'bias' [layers, kv_heads], got shapes "
                         f"{tuple(getattr(weights, 'shape', ()))} and "
                         f"{tuple(getattr(bias, 'shape', ()))}")
    layers = [int(i) for i in value.get("layers", [])]
    if not layers or not all(0 <= i < weights.shape[0] for i in layers):
        raise ValueError(f"mixkv: kvzap weights' fitted 'layers' {layers} must be a non-empty "
                         f"list of layer indices below {weights.shape[0]}")
    if not (torch.isfinite(weights).all() and torch.isfinite(bias).all()):
        raise ValueError("mixkv: kvzap weights hold non-finite values")
    return dict(value, weights=weights.float(), bias=bias.float(), layers=layers)


@register_scorer("kvzap")
@options_dataclass
class KVzap(Scorer):
    """Query-agnostic importance predicted from each token's hidden state: per layer a linear
    map to one log-score per KV head, fitted to KVzip's scores (``mixkv-calibrate --kvzap``).
    Scores: ``exp(h W + b)`` (log clamped to [-69, 0]), 0 at padding.

    Options:
    - ``weights`` (None): a file written by ``mixkv-calibrate --kvzap`` (or its dict); None:
      the file shipped for the model (SmolLM2-135M-Instruct, Gemma-3-270M), found by the
      decoder config's :func:`fingerprint`. A model without one is an error that says how to
      train a surrogate. Layers the file has no map for (sliding-window layers, which the shim
      never compresses) are an error only when asked to score them.
    - ``sinks`` (4): the first ``sinks`` real tokens are always kept (inside the budget).
      KVzip's default keeps the chat template's prefix (system prompt), which it finds with a
      tokenizer; the surrogate has none, and the teacher's kept tokens never entered its
      training, so it keeps the first tokens, the attention sinks, as kvpress's KVzip
      (``n_sink=4``) and StreamingLLM do; 0: the predictions alone decide.
    """

    needs_hidden_states: ClassVar[bool] = True
    static_scores: ClassVar[bool] = True

    weights: Union[str, os.PathLike, dict, None] = None
    sinks: int = 4
    # derived: the given surrogate (checked at once), the shipped ones loaded, maps on devices
    _given: Optional[dict] = dataclasses.field(default=None, init=False, compare=False)
    _shipped: Dict[str, dict] = dataclasses.field(default_factory=dict, init=False,
                                                  compare=False)
    _on_device: Dict[tuple, tuple] = dataclasses.field(default_factory=dict, init=False,
                                                       compare=False)

    def __post_init__(self):
        sinks = self.sinks
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"mixkv: kvzap sinks must be an integer >= 0, got {sinks!r}")
        self._given = None if self.weights is None else load_weights(self.weights)

    def surrogate(self, decoder: Optional[nn.Module]) -> dict:
        """The surrogate for this decoder: the ``weights`` given (checked against the decoder's
        fingerprint), else the one shipped for its fingerprint."""
        config = getattr(decoder, "config", None)
        model = fingerprint(config) if config is not None else None
        if self._given is None:
            if model not in self._shipped:
                files = shipped()
                if model not in files:
                    raise ValueError(
                        f"mixkv: kvzap has no shipped weights for this model (fingerprint "
                        f"{model}; shipped: {', '.join(files) or 'none'}): train a surrogate "
                        "with `mixkv-calibrate --kvzap --model PATH --out FILE` and pass "
                        "weights=FILE")
                self._shipped[model] = load_weights(files[model])
            return self._shipped[model]
        fitted = self._given.get("fingerprint")
        if model is not None and fitted != model:
            raise ValueError(f"mixkv: kvzap weights were fitted for {fitted}, but this model is "
                             f"{model}; train a surrogate for it with `mixkv-calibrate --kvzap "
                             "--model PATH --out FILE` and pass weights=FILE")
        return self._given

    def token_scores(self, hidden_states: Tensor, layer: int, decoder: nn.Module) -> Tensor:
        s = self.surrogate(decoder)
        if layer not in s["layers"]:
            raise ValueError(f"mixkv: kvzap weights have no map for layer {layer} (fitted "
                             f"layers: {s['layers']})")
        if hidden_states.shape[-1] != s["weights"].shape[1]:
            raise ValueError(f"mixkv: kvzap weights take hidden states of size "
                             f"{s['weights'].shape[1]}, got {hidden_states.shape[-1]}")
        key = (id(s), layer, hidden_states.device)
        if key not in self._on_device:  # moved once per surrogate, layer and device
            self._on_device[key] = (s["weights"][layer].to(hidden_states.device),
                                    s["bias"][layer].to(hidden_states.device))
        weight, bias = self._on_device[key]
        log = hidden_states.float() @ weight + bias                          # [B, n, Hkv]
        log = torch.nan_to_num(log, nan=LOG_FLOOR).clamp(LOG_FLOOR, 0.0)
        return log.exp().transpose(1, 2).contiguous()

    def score(self, p: Prefill) -> Tensor:
        scores = p.token_scores
        if scores is None:
            if p.hidden_states is None:
                raise ValueError(f"mixkv: scorer {self.label!r} needs the layer's hidden states "
                                 "(Prefill.hidden_states)")
            scores = self.token_scores(p.hidden_states, p.layer, p.decoder)
        if scores.shape[1] != p.keys.shape[1]:
            raise ValueError(f"mixkv: kvzap weights predict {scores.shape[1]} KV heads, the "
                             f"layer has {p.keys.shape[1]}")
        scores = scores[..., :p.candidates].to(p.keys.device)
        return torch.where(p.real_candidates()[:, None, :], scores, 0.0).contiguous()

    def always_kept(self, p: Prefill) -> Optional[Tensor]:
        if not self.sinks:
            return None
        real = p.real_candidates()
        return real & (real.long().cumsum(-1) <= self.sinks)

    def __repr__(self):   # a dict of weights by its fingerprint, not its tensors
        weights = self.weights if not isinstance(self.weights, dict) else \
            f"<{self.weights.get('fingerprint')}>"
        return f"KVzap(weights={weights!r}, sinks={self.sinks})"
