"""The shim on a model split across devices: a tiny random Llama whose decoder layers alternate
between the CPU and cuda:0 (accelerate's dispatch_model, the machinery behind
``from_pretrained(device_map=...)``), patched with uniform and head-wise methods. The split
model's patched generate must equal the unsplit (CPU) model's patched generate, a hand-written
decode loop must agree, and each layer's cache must live on the device that layer runs on.

Two placements: ``main_device="cpu"`` executes the CPU layers on the CPU (a true CPU/GPU split);
``main_device=cuda`` is accelerate's CPU offload (the CPU layers' weights stay on the CPU but the
layers run on the GPU, which is what a "cpu" entry in ``from_pretrained``'s device_map means), so
every layer's cache is on the GPU.

Skipped without CUDA. ``MIXKV_TEST_DEVICE=cpu`` runs the same code with the CPU standing in for
the GPU (all hooks attached, everything on one device): a self-test of this file.
"""

import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv.hf import HeadwiseLayer  # noqa: E402

import hf_models  # noqa: E402

GPU = torch.device(os.environ.get("MIXKV_TEST_DEVICE", "cuda:0"))
if GPU.type == "cuda" and GPU.index is None:
    GPU = torch.device("cuda", 0)
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(GPU.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs CUDA")

W = 8
PROMPT = 100
BUDGET = 36
NEW_TOKENS = 8
LAYER_DEVICES = [CPU, GPU, CPU, GPU]  # layer i runs here (with main_device="cpu")


def tiny_llama(seed=0):
    """hf_models' tiny Llama, 4 layers, with larger weights (initializer_range 0.2): peaked
    attention, so kept tokens and greedy tokens have clear margins across devices."""
    return hf_models._build(transformers.LlamaConfig, transformers.LlamaForCausalLM, "sdpa",
                            seed, num_hidden_layers=len(LAYER_DEVICES), initializer_range=0.2)


def split(model, main_device):
    """Dispatch `model` over LAYER_DEVICES: embeddings on the CPU, norm and head on the GPU."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                  "model.norm": str(GPU), "lm_head": str(GPU)}
    for i, device in enumerate(LAYER_DEVICES):
        device_map[f"model.layers.{i}"] = str(device)
    # skip_keys as from_pretrained passes them (the cache is never moved by the hooks)
    return accelerate.dispatch_model(model, device_map=device_map, main_device=str(main_device),
                                     force_hooks=True,
                                     skip_keys=list(model._skip_keys_device_placement or []))


def inputs(padded):
    if not padded:
        ids = hf_models._text_prompt(PROMPT)
        return ids, torch.ones_like(ids)
    rows = [hf_models._text_prompt(PROMPT, seed=2)[0], hf_models._text_prompt(71, seed=3)[0]]
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros(2, PROMPT, dtype=torch.long)
    for b, r in enumerate(rows):  # left padding
        ids[b, PROMPT - len(r):], mask[b, PROMPT - len(r):] = r, 1
    return ids, mask


def generate(model, ids, mask, options):
    with mixkv.patch(model, budget=BUDGET, window=W, **options):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                             do_sample=False, return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits).cpu()


OPTIONS = {
    "mixkv-uniform": dict(method="mixkv"),
    "snapkv": dict(method="snapkv"),
    "random": dict(method="random"),
    "mixkv-offline-redundancy": dict(method="mixkv",
                                     redundancy=torch.tensor([[0.1, 0.9]] * 4)),
    "mixkv-adakv": dict(method="mixkv", base="adakv"),
    "adakv": dict(method="adakv"),
    "mixkv-pyramidkv": dict(method="mixkv", base="pyramidkv"),
    "mixkv-explicit": dict(method="mixkv", base="explicit",
                           profile=torch.tensor([[1.0, 3.0], [2.0, 1.0], [1.0, 1.0], [3.0, 1.0]])),
}
CASES = [pytest.param(name, padded, main, id=f"{name}-{'pad' if padded else 'nopad'}-main_{main}")
         for name in OPTIONS for padded in (False, True) for main in ("cpu", "gpu")
         if main == "cpu" or name in ("mixkv-uniform", "mixkv-adakv")]


@pytest.mark.parametrize("name,padded,main", CASES)
def test_split_generate_equals_unsplit(name, padded, main):
    options = OPTIONS[name]
    model = tiny_llama()
    ids, mask = inputs(padded)
    want_seq, want_logits = generate(copy.deepcopy(model), ids, mask, options)
    split_model = split(model, CPU if main == "cpu" else GPU)
    seq, logits = generate(split_model, ids, mask, options)
    assert seq.device == CPU  # accelerate returns outputs on the input device
    assert torch.equal(seq, want_seq), (seq[:, PROMPT:], want_seq[:, PROMPT:])
    torch.testing.assert_close(logits, want_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["mixkv-uniform", "mixkv-adakv", "mixkv-pyramidkv"])
@pytest.mark.parametrize("main", ["cpu", "gpu"])
def test_split_cache_lives_on_each_layers_device(name, main):
    """Prefill + a hand-written decode loop on the split model: each layer's (compressed) cache
    is on the device its layer runs on, and the loop's tokens equal generate's."""
    options = OPTIONS[name]
    model = split(tiny_llama(), CPU if main == "cpu" else GPU)
    ids, _ = inputs(False)
    expected = LAYER_DEVICES if main == "cpu" else [GPU] * len(LAYER_DEVICES)
    kw = hf_models.cache_kwarg()
    with torch.no_grad(), mixkv.patch(model, budget=BUDGET, window=W, **options) as handle:
        seq = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{kw: cache})
        for i, (layer, device) in enumerate(zip(cache.layers, expected)):
            headwise = isinstance(layer, HeadwiseLayer)
            assert headwise == (options.get("base", "snapkv") != "snapkv"), i
            tensors = ((layer.key_buffer, layer.value_buffer, layer.valid) if headwise
                       else (layer.keys, layer.values))
            for t in tensors:
                assert t.device.type == device.type, f"layer {i}: cache on {t.device}, " \
                                                     f"layer runs on {device}"
            kept = handle.stats()["layers"][i]["kept"]
            if name == "mixkv-uniform":
                assert layer.keys.shape[-2] == BUDGET and (kept == BUDGET).all()
            elif name == "mixkv-adakv":
                assert int(kept.sum()) == 2 * BUDGET
        tokens = [out.logits[:, -1].argmax(-1)]
        for step in range(NEW_TOKENS - 1):
            out = model(input_ids=tokens[-1][:, None], position_ids=torch.tensor([[PROMPT + step]]),
                        use_cache=True, **{kw: cache})
            tokens.append(out.logits[:, -1].argmax(-1))
    assert torch.equal(seq[0, PROMPT:], torch.cat(tokens).cpu())
