"""Kept tokens of every method x base on seeded tiny models: the differential safety net of the
method layer (issue 11).

``tests/data/selections_main.json`` holds, for each case, the positions each (layer, row, KV
head) keeps after a patched prefill, as recorded from main before the method layer existed
(commit 030f0b8). ``tests/methods/test_selections_main.py`` replays every case and demands the same
positions. Regenerate (only when a selection change is intended, and say so in the commit):

    cd <repo> && python tests/record_selections.py

Cases: 3 models (Llama GQA; Qwen2 with attention bias; Gemma3 with q/k norms, its own
attention scaling and sliding layers that stay uncompressed) x every method and base x
budget / ratio x unpadded / left-padded batch of 2, plus offline redundancy profiles.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_models  # noqa: E402

import mixkv  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "data" / "selections_main.json"
WINDOW = 8
LENGTH, SHORT = 64, 48          # prompt length; real tokens of the padded row
BUDGET, RATIO = 24, 0.55


def gemma3_with_norm_scales(seed: int):
    """Gemma3 whose q/k norms scale each dimension differently, as a trained model's do. At
    initialisation the scales are all 1 and every key's norm is sqrt(D) to within 1e-5, so
    knorm would rank rounding errors, which differ with the CPU's instruction set."""
    model, make_inputs = hf_models.gemma3(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
    return model, make_inputs


MODELS = {"llama": (hf_models.llama, 0), "qwen2": (hf_models.qwen2, 1),
          "gemma3": (gemma3_with_norm_scales, 2)}
PLAIN = ("full", "random", "streamingllm", "knorm", "snapkv", "pyramidkv", "adakv")
MIXES = ("vnorm", "keydiff", "mix3", "mixkv")
BASES = ("snapkv", "pyramidkv", "adakv", "explicit")


def cases():
    """(method, base, uses the offline redundancy profile) of every recorded case."""
    out = [(m, "snapkv", False) for m in PLAIN]
    out += [(m, b, False) for m in MIXES for b in BASES]
    out += [("mixkv", b, True) for b in ("snapkv", "adakv")]
    return out


def profiles(num_layers: int, kv_heads: int):
    """A capacity profile (base explicit) and an offline redundancy profile, fixed per shape."""
    weights = torch.arange(num_layers * kv_heads, dtype=torch.float32).view(num_layers, kv_heads)
    capacity = 1.0 + (weights * 7) % 5
    redundancy = ((weights * 3) % 4) / 3.0
    return capacity, redundancy


def inputs(padded: bool):
    """Two rows of distinct tokens each. A token repeated in a row ties with itself: RoPE keeps
    key norms, so its layer-0 keys' norms agree to ~1e-7 and knorm's choice between them flips
    with the CPU's instruction set (ATen's vectorised reductions round differently)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.stack([torch.randperm(hf_models.TEXT_VOCAB - 2, generator=g)[:LENGTH] + 2
                       for _ in range(2)])
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :LENGTH - SHORT] = 0
        mask[1, :LENGTH - SHORT] = 0
    return ids, mask


def kept_positions(layer, full_keys):
    """[row][KV head] -> kept positions, found by matching each kept key row with the prefill's
    keys (every key of a random model is distinct; asserted)."""
    B, H = full_keys.shape[:2]
    if isinstance(layer, mixkv.hf.HeadwiseLayer):
        starts, lengths = layer.starts.view(B, H), layer.lengths.view(B, H)
        kept = [[layer.key_buffer[int(starts[b, h]):int(starts[b, h] + lengths[b, h])]
                 for h in range(H)] for b in range(B)]
    else:
        kept = [[layer.keys[b, h] for h in range(H)] for b in range(B)]
    out = []
    for b in range(B):
        row = []
        for h in range(H):
            match = (kept[b][h][:, None, :] == full_keys[b, h][None]).all(-1)   # [k, N]
            assert bool((match.sum(-1) == 1).all()), "kept keys must match one prompt key each"
            row.append(match.int().argmax(-1).tolist())
        out.append(row)
    return out


def run_case(model, method, base, sized, padded, redundancy_on):
    """Kept positions per layer (None: layer left uncompressed) of one case."""
    ids, mask = inputs(padded)
    kw = hf_models.cache_kwarg()
    from transformers import DynamicCache

    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: full})
    config = model.get_decoder().config
    capacity, redundancy = profiles(config.num_hidden_layers, config.num_key_value_heads)
    options = dict(window=WINDOW, base=base, profile=capacity if base == "explicit" else None,
                   redundancy=redundancy if redundancy_on else "online")
    options.update(budget=BUDGET) if sized == "budget" else options.update(ratio=RATIO)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Gemma3's sliding layers stay uncompressed
        with mixkv.patch(model, method, **options), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})
    layers = []
    for layer, reference in zip(cache.layers, full.layers):
        compressed = isinstance(layer, mixkv.hf.HeadwiseLayer) or \
            layer.keys.shape[-2] < reference.keys.shape[-2]
        layers.append(kept_positions(layer, reference.keys) if compressed else None)
    return layers


def case_key(model_name, method, base, sized, padded, redundancy_on):
    return "/".join([model_name, f"{method}+{base}", sized, "pad" if padded else "nopad"]
                    + (["redundancy"] if redundancy_on else []))


def record_all():
    import mixkv.hf  # noqa: F401

    out = {}
    for model_name, (builder, seed) in MODELS.items():
        model, _ = builder(seed=seed)
        for method, base, redundancy_on in cases():
            for sized in ("budget", "ratio"):
                for padded in (False, True):
                    key = case_key(model_name, method, base, sized, padded, redundancy_on)
                    out[key] = run_case(model, method, base, sized, padded, redundancy_on)
    return out


def main():
    torch.set_num_threads(1)
    selections = record_all()
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(selections, separators=(",", ":")) + "\n")
    print(f"{len(selections)} cases -> {FIXTURE} ({FIXTURE.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
