"""Tiny random-weight Hugging Face models built from configs (no files, no downloads).

Each builder returns ``(model, make_inputs)``: the model in eval mode, fp32, seeded weights and
the requested attention implementation; ``make_inputs(length, image=False)`` returns the keyword
arguments of one prompt of about ``length`` tokens (batch 1) for ``model(**inputs)`` and
``model.generate(**inputs)``. Greedy generation never stops early: the models have no EOS.
"""

from __future__ import annotations

import inspect

import torch
import transformers

VOCAB = 128
IMAGE_TOKEN = VOCAB - 1        # LLaVA <image>, Qwen2-VL <|image_pad|>
VISION_START = VOCAB - 2       # Qwen2-VL <|vision_start|>
VISION_END = VOCAB - 3         # Qwen2-VL <|vision_end|>
VIDEO_TOKEN = VOCAB - 4        # Qwen2-VL <|video_pad|> (never used)
TEXT_VOCAB = VOCAB - 8         # prompts draw ordinary tokens below this id

# Common text-stack sizes: head_dim 16, GQA group 2.
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=None)


def cache_kwarg() -> str:
    """The keyword that carries the cache into a decoder-only model's forward: ``cache`` since
    transformers 5.2x, ``past_key_values`` before (5.17)."""
    params = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _finish(model, attn):
    model = model.eval().to(torch.float32)
    model.set_attn_implementation(attn)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, 0, 1
    gc.do_sample = False
    return model


def _text_prompt(length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TEXT_VOCAB, (1, length), generator=g)
    ids[0, 0] = 1  # BOS
    return ids


def _text_inputs(length, image=False):
    if image:
        raise NotImplementedError("text-only model")
    ids = _text_prompt(length)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def _build(config_cls, model_cls, attn, seed, **overrides):
    torch.manual_seed(seed)
    config = config_cls(**{**TEXT, **overrides})
    return _finish(model_cls(config), attn)


def llama(attn="sdpa", seed=0):
    return _build(transformers.LlamaConfig, transformers.LlamaForCausalLM, attn, seed), _text_inputs


def mistral(attn="sdpa", seed=0, sliding_window=None):
    model = _build(transformers.MistralConfig, transformers.MistralForCausalLM, attn, seed,
                   sliding_window=sliding_window)
    return model, _text_inputs


def qwen2(attn="sdpa", seed=0):
    return _build(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, attn, seed,
                  attention_bias=True), _text_inputs


def qwen3(attn="sdpa", seed=0):
    return _build(transformers.Qwen3Config, transformers.Qwen3ForCausalLM, attn, seed,
                  head_dim=16), _text_inputs


GEMMA3_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention",
                      "full_attention"]


def gemma3(attn="sdpa", seed=0, sliding_window=24):
    """Gemma3 text stack: sliding and full-attention layers interleaved, q/k norms, a
    query_pre_attn_scalar that differs from head_dim (scaling != head_dim ** -0.5)."""
    model = _build(transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, attn, seed,
                   num_hidden_layers=len(GEMMA3_LAYER_TYPES), layer_types=GEMMA3_LAYER_TYPES,
                   head_dim=16, query_pre_attn_scalar=32, sliding_window=sliding_window,
                   hidden_activation="gelu_pytorch_tanh")
    return model, _text_inputs


class AttentionRecording(dict):
    """What the model's attention function saw: ``self[layer_idx]`` is that layer's last
    prefill call ``(query, key, value, mask)``; ``calls`` lists every call as a dict (layer,
    query, key, value, mask, scaling, output [B, q, H, D])."""

    def __init__(self):
        super().__init__()
        self.calls = []


def record_attention(monkeypatch, implementation: str = "sdpa") -> AttentionRecording:
    """Record every decoder call of the `implementation` attention function. It sits below the
    shim's wrapper, so it sees the queries and keys the shim sees and the mask the shim passes on."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    recording = AttentionRecording()
    original = ALL_ATTENTION_FUNCTIONS[implementation]

    def recorder(module, query, key, value, attention_mask, *args, **kwargs):
        out = original(module, query, key, value, attention_mask, *args, **kwargs)
        if not hasattr(module, "layer_idx"):  # a vision tower's attention
            return out
        if query.shape[-2] == key.shape[-2]:
            recording[module.layer_idx] = (query.clone(), key.clone(), value.clone(),
                                           attention_mask)
        recording.calls.append(dict(layer=module.layer_idx, query=query.clone(),
                                    key=key.clone(), value=value.clone(), mask=attention_mask,
                                    scaling=kwargs.get("scaling"), output=out[0].clone()))
        return out

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, implementation, recorder)
    return recording


# ---- vision-language models -----------------------------------------------------------------

QWEN2VL_PATCH, QWEN2VL_GRID = 4, (1, 4, 4)  # 16 patches, merged 2x2 -> 4 image tokens


def qwen2_vl(attn="sdpa", seed=0):
    """Qwen2-VL: the language model uses mrope (3 position streams, mrope_section [4, 2, 2]
    = head_dim / 2); a 4x4-patch image merges 2x2 into 4 image tokens."""
    torch.manual_seed(seed)
    text = {**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [4, 2, 2],
                                        "rope_theta": 10000.0}}
    config = transformers.Qwen2VLConfig(
        text_config=text,
        vision_config=dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=4,
                           mlp_ratio=2, patch_size=QWEN2VL_PATCH, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    model = _finish(transformers.Qwen2VLForConditionalGeneration(config), attn)

    def make_inputs(length, image=False):
        if not image:
            return _text_inputs(length)
        t, h, w = QWEN2VL_GRID
        n_image = t * h * w // 4
        ids = _text_prompt(length)
        ids[0, 2] = VISION_START
        ids[0, 3:3 + n_image] = IMAGE_TOKEN
        ids[0, 3 + n_image] = VISION_END
        g = torch.Generator().manual_seed(7)
        pixels = torch.randn(t * h * w, 3 * 2 * QWEN2VL_PATCH * QWEN2VL_PATCH, generator=g)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                    image_grid_thw=torch.tensor([QWEN2VL_GRID]),
                    mm_token_type_ids=(ids == IMAGE_TOKEN).int())

    return model, make_inputs


LLAVA_IMAGE, LLAVA_PATCH = 16, 4  # 16 patches (+ CLS, dropped) -> 16 image tokens


def llava(attn="sdpa", seed=0):
    """LLaVA: CLIP vision tower + Llama language model (get_decoder() is the LlamaModel)."""
    torch.manual_seed(seed)
    config = transformers.LlavaConfig(
        text_config={**TEXT, "model_type": "llama"},
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=4, image_size=LLAVA_IMAGE,
                           patch_size=LLAVA_PATCH, projection_dim=32),
        image_token_index=IMAGE_TOKEN, image_seq_length=(LLAVA_IMAGE // LLAVA_PATCH) ** 2,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _finish(transformers.LlavaForConditionalGeneration(config), attn)

    def make_inputs(length, image=False):
        ids = _text_prompt(length)
        if not image:
            return dict(input_ids=ids, attention_mask=torch.ones_like(ids))
        n_image = (LLAVA_IMAGE // LLAVA_PATCH) ** 2
        ids[0, 2:2 + n_image] = IMAGE_TOKEN
        g = torch.Generator().manual_seed(7)
        pixels = torch.randn(1, 3, LLAVA_IMAGE, LLAVA_IMAGE, generator=g)
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)

    return model, make_inputs


def gpt2(attn="sdpa", seed=0):
    """An unsupported architecture (no get_decoder().layers[i].self_attn)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                     n_positions=256, bos_token_id=1, eos_token_id=None,
                                     pad_token_id=0)
    return _finish(transformers.GPT2LMHeadModel(config), attn), _text_inputs


GEMMA2_LAYER_TYPES = ["sliding_attention", "full_attention"]


def gemma2(attn="eager", seed=0, sliding_window=24):
    """Gemma2: sliding/full layers and attention-logit soft-capping (honoured by eager only)."""
    model = _build(transformers.Gemma2Config, transformers.Gemma2ForCausalLM, attn, seed,
                   num_hidden_layers=len(GEMMA2_LAYER_TYPES), layer_types=GEMMA2_LAYER_TYPES,
                   head_dim=16, query_pre_attn_scalar=32, sliding_window=sliding_window,
                   attn_logit_softcapping=0.5, final_logit_softcapping=None)
    return model, _text_inputs


# A character-level tokenizer (ids within VOCAB) so the whole eval harness runs on a tiny model.
class CharTokenizer:
    chat_template = None
    bos_token_id = None
    eos_token_id = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [min(VOCAB - 1, max(3, ord(c) - 29)) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i + 29) for i in ids if i >= 3)


def sharpen_attention(model):
    """Peaked attention in a tiny random model (random init gives near-uniform attention, which
    makes attention-score comparisons weak): q/k norm weights of 3, else query and key
    projections scaled by 8. Returns the model."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if getattr(attention, "q_norm", None) is not None:
                attention.q_norm.weight.fill_(3.0)
                attention.k_norm.weight.fill_(3.0)
            else:
                attention.q_proj.weight.mul_(8.0)
                attention.k_proj.weight.mul_(8.0)
    return model


def kvzap_weights(model, seed: int = 0) -> dict:
    """A random KVzap surrogate (the dict ``mixkv-calibrate --kvzap`` saves) for ``model``."""
    from mixkv.methods import kvzap

    return kvzap.random_weights(model, seed)


def compressed_layers(model):
    """Full-attention layers (the ones mixkv compresses), from the text config."""
    config = model.get_decoder().config
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return [i for i in range(n) if "sliding" not in types[i]]
    return [] if getattr(config, "sliding_window", None) else list(range(n))


def tiny_llama(seed=0, initializer_range=0.02):
    """The evaluation tests' tiny Llama: 3 layers, GQA 2, 2,048 positions (eager-free sdpa)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, attn_implementation="sdpa",
                         initializer_range=initializer_range)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def tiny_eval_model(**model_options):
    """``tiny_llama`` as the evaluation harness's EvalModel, with the character tokenizer."""
    from mixkv.eval.models import EvalModel

    return EvalModel(model=tiny_llama(**model_options), tokenizer=CharTokenizer(),
                     name="tiny-llama", source="config", load_seconds=0.0, fixes=[], stop_ids=[],
                     adds_bos=False)


def kept_segments(layer):
    """Kept (keys, values) of each (row, KV head) of a compressed layer, in cache order."""
    from mixkv.hf import HeadwiseLayer

    if isinstance(layer, HeadwiseLayer):
        keys, values, _ = layer.held()
        counts = layer.kept_tokens().flatten().tolist()
        return list(zip(keys.split(counts), values.split(counts)))
    return [(layer.keys[b, h], layer.values[b, h]) for b in range(layer.keys.shape[0])
            for h in range(layer.keys.shape[1])]


def kept_keys(layer):
    """Kept keys of each (row, KV head) of a compressed layer."""
    return [keys for keys, _ in kept_segments(layer)]
