"""Peer agreement with kvpress's KVzipPress (its default ``layerwise=False``: one top-k over
every layer, head and token) on the packaged SmolLM2-135M-Instruct, on the prompts
``mixkv-eval`` evaluates (RULER-style, 1,024 tokens, the chat template's prefix included):
mixkv's ``kvzip+global`` set up as kvpress runs KVzip (``mixkv.methods.kvzip.KVPRESS``: the
repeat prompt then the chat template's assistant header, "starting with" + the previous chunk's
last 8 tokens for later chunks, only the context after the chat prefix re-read, a softmax over
the 4 sinks, the chunk's own span and the fed tokens, the first 4 tokens kept) keeps the same
tokens, per layer and KV head, up to score ties.

Aligned by design: mixkv always keeps the last ``window`` tokens of every head (inside the
budget), kvpress keeps no window; kvpress's press here raises the window's scores above every
attention probability (as its own sinks are), the rest of its code untouched. kvpress's ratio is
set so that it keeps exactly budget x heads x layers tokens, mixkv's whole-cache budget.

kvpress's kept tokens are read from what its attention patch would mask
(``masked_key_indices``), its scores from ``score_val`` after its sinks are raised. mixkv's
kept set must be the global top of those scores (ties to the lower (layer, head, position))
up to near ties (NEAR_TIE: the two compute the attention probabilities with different
rounding, <= 2e-6 of the value seen here), kvpress's own set up to exact ties (torch.topk's
order of ties is open). On these prompts both found none: the sets are equal.
"""

import copy
from unittest import mock

import pytest
import torch
from transformers import DynamicCache

import kvpress.presses.kvzip_press as kvzip_press
from kvpress import KVzipPress

import mixkv
from mixkv import methods as M
from mixkv.eval.engine import Engine, capture_window_queries
from mixkv.eval.tasks import make_samples
from peers import WINDOW, global_differ_only_in_ties, global_top

NEAR_TIE = 2e-5
CASES = [  # task, budget per head, chunk size (400: three chunks, the per-chunk prompt)
    ("niah_single", 256, 2048),
    ("niah_multikey", 512, 400),
]


class WindowKeptKVzip(KVzipPress):
    """kvpress's KVzipPress with mixkv's window: its last WINDOW tokens raised above every
    attention probability before its own selection; records the scores it selects from."""

    def compress_post(self, model):
        self.score_val[..., -WINDOW:] = 2.0
        super().compress_post(model)
        self.recorded = self.score_val.detach().clone()


@pytest.fixture(autouse=True)
def _threads(two_threads):
    """Both cores, whatever the session set (conftest.two_threads)."""


def _kvpress_kept(em, ids, budget, chunk):
    model = em.model
    L, H, N = model.config.num_hidden_layers, model.config.num_key_value_heads, ids.shape[1]
    numel = L * H * N
    # kvpress prunes int(numel * ratio): exactly numel - budget x H x L
    press = WindowKeptKVzip(compression_ratio=(numel - budget * H * L + 0.5) / numel,
                            chunk_size=chunk)
    # kvpress loads the tokenizer by the model's name_or_path; the packaged GGUF has none there
    with mock.patch.object(kvzip_press.AutoTokenizer, "from_pretrained",
                           lambda *args, **kwargs: em.tokenizer), torch.no_grad():
        with press(model):
            model.model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True)
    kept = torch.ones(L, H, N, dtype=torch.bool)
    for layer, decoder_layer in enumerate(model.model.layers):
        rows, heads, positions = decoder_layer.self_attn.masked_key_indices
        assert bool((rows == 0).all())
        kept[layer, heads, positions] = False
        del decoder_layer.self_attn.masked_key_indices   # kvpress's attention patch reads it
    return kept, press.recorded[:, 0]


def _mixkv_kept(em, ids, budget, chunk):
    model = em.model
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), capture_window_queries(model, WINDOW) as queries:
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    full = copy.deepcopy(cache)
    options = dict(M.kvzip.KVPRESS, chunk_size=chunk)
    with mixkv.patch(model, "kvzip+global", budget=budget, window=WINDOW,
                     tokenizer=em.tokenizer, **options) as handle:
        handle.compress_cache(cache, dict(queries), context_ids=ids)
    L, H, N = len(cache.layers), full.layers[0].keys.shape[1], ids.shape[1]
    kept = torch.zeros(L, H, N, dtype=torch.bool)
    for layer in range(L):
        compressed = cache.layers[layer]
        for h in range(H):
            start, length = int(compressed.starts[h]), int(compressed.lengths[h])
            rows = {full.layers[layer].keys[0, h, j].numpy().tobytes(): j for j in range(N)}
            assert len(rows) == N
            for key in compressed.key_buffer[start:start + length]:
                kept[layer, h, rows[key.numpy().tobytes()]] = True
    return kept


@pytest.mark.parametrize("task, budget, chunk", CASES)
def test_kvzip_global_keeps_kvpress_kvzips_tokens(smollm2, task, budget, chunk):
    sample = make_samples(task, 1, length=1024, count_tokens=smollm2.count_tokens)[0]
    ids = torch.tensor([Engine(smollm2, window=WINDOW).prepare(sample).prefill_ids])
    L = smollm2.model.config.num_hidden_layers
    H = smollm2.model.config.num_key_value_heads
    assert ids.shape[1] > 900 and ids.shape[1] > chunk or chunk == 2048
    theirs, scores = _kvpress_kept(smollm2, ids, budget, chunk)
    ours = _mixkv_kept(smollm2, ids, budget, chunk)
    total = budget * H * L
    assert int(theirs.sum()) == int(ours.sum()) == total
    expected = global_top(scores, total)
    assert global_differ_only_in_ties(ours, expected, scores, NEAR_TIE) <= total // 1000
    global_differ_only_in_ties(theirs, expected, scores)
    # not a uniform split: kept per head ranges widely (the point of a global budget)
    per_head = ours[..., :-WINDOW].sum(-1)
    assert int(per_head.min()) < budget // 4 and int(per_head.max()) > 3 * budget // 2
    # both keep the 4 sinks and the window in every head
    assert bool(ours[..., :4].all()) and bool(ours[..., -WINDOW:].all())
