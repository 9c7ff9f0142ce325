"""The ``global`` budget policy (mixkv/methods/policies.py): one top-k over every compressed
layer's and KV head's candidates, the whole cache keeping budget x Hkv x layers tokens.

- ``global_capacities`` equals a plain-Python reference (every real candidate of a row sorted
  by higher importance, then lower (layer, head, position)) on random importances with exact
  ties, padding, layers of different lengths, a floor, and capacities from 0 to more than the
  real candidates;
- in ``mixkv.patch`` (compression after the whole prefill) and ``compress_cache`` (the
  evaluation's path): the totals, per-head counts that vary, the counts and kept tokens of the
  reference over the method's own importance, the two paths keep the same tokens; SnapKV,
  KVzip, "+MixKV" over each, kvzip's kept sinks; a prompt within the budget changes nothing;
- in the evaluation (``mixkv-eval --methods kvzip+global``) and at decode time
  (``decode_budget``: the whole cache cut back to decode_budget x Hkv x layers);
- errors name the policy and the argument.
"""

import copy

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DynamicCache  # noqa: E402

import mixkv  # noqa: E402
from mixkv import methods as M  # noqa: E402
from mixkv.hf import reconstruct  # noqa: E402
from mixkv.hf.capture import capture_prefill  # noqa: E402
from mixkv.hf.layers import HeadwiseLayer  # noqa: E402
from mixkv.hf.model import layer_of  # noqa: E402
from mixkv.methods.policies import global_capacities  # noqa: E402

import hf_models  # noqa: E402
from helpers import exactly  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

W = 4
N = 48
BUDGET = 14
PROMPT = [5, 6, 7]


def reference_capacities(importances, reals, capacity, floor=0):
    """Plain Python: per row, every real candidate as (floor first, -importance, layer, head,
    position), sorted; the first capacity x Hkv x layers counted per (layer, head)."""
    B, Hkv = importances[0].shape[:2]
    out = [torch.zeros(B, Hkv, dtype=torch.int32) for _ in importances]
    floor = min(floor, capacity)
    for b in range(B):
        entries = []
        for layer, (x, r) in enumerate(zip(importances, reals)):
            r = r[:, None, :].expand_as(x) if r.dim() == 2 else r
            for h in range(Hkv):
                real = [j for j in range(x.shape[-1]) if r[b, h, j]]
                first = set(sorted(real, key=lambda j: (-float(x[b, h, j]), j))[:floor])
                entries += [(j not in first, -float(x[b, h, j]), layer, h, j) for j in real]
        entries.sort()
        for _, _, layer, h, _ in entries[:capacity * Hkv * len(importances)]:
            out[layer][b, h] += 1
    return out


def _random_case(seed, lengths=(9, 13, 6), B=3, Hkv=2, levels=4, per_head_mask=False):
    g = torch.Generator().manual_seed(seed)
    importances, reals = [], []
    for C in lengths:
        # few distinct values: many exact ties, across heads and layers
        importances.append(torch.randint(0, levels, (B, Hkv, C), generator=g).float() / levels)
        shape = (B, Hkv, C) if per_head_mask else (B, C)
        real = torch.rand(shape, generator=g) > 0.25
        real[0] = True                                  # one unpadded row
        reals.append(real)
    return importances, reals


@pytest.mark.parametrize("per_head_mask", [False, True])
@pytest.mark.parametrize("floor", [0, 2])
@pytest.mark.parametrize("capacity", [0, 1, 3, 7, 40])
def test_global_capacities_equal_the_reference(capacity, floor, per_head_mask):
    for seed in range(3):
        importances, reals = _random_case(seed, per_head_mask=per_head_mask)
        got = global_capacities(importances, reals, capacity, floor=floor)
        want = reference_capacities(importances, reals, capacity, floor)
        for layer, (a, b) in enumerate(zip(got, want)):
            assert a.dtype == torch.int32 and torch.equal(a, b), (seed, layer, a, b)
        total = sum(c.sum(1) for c in got)                                   # per row
        real_count = sum((r[:, None, :].expand_as(x) if r.dim() == 2 else r).sum((1, 2))
                         for x, r in zip(importances, reals))
        assert total.tolist() == torch.clamp(real_count, max=capacity * 2 * 3).tolist()


def test_global_capacities_ties_go_to_the_lower_layer_head_and_position():
    equal = [torch.ones(1, 2, 4), torch.ones(1, 2, 4)]
    real = [torch.ones(1, 4, dtype=torch.bool)] * 2
    # 2 x 2 x 2 = 8 of the 16 equal candidates: layer 0's first
    assert [c.tolist() for c in global_capacities(equal, real, 2)] == [[[4, 4]], [[0, 0]]]
    # a floor of 1 gives every head one first, then the rest in (layer, head) order
    assert [c.tolist() for c in global_capacities(equal, real, 2, floor=1)] == \
        [[[4, 2]], [[1, 1]]]
    # a higher score in a later layer wins over the tie
    equal[1][0, 1, 3] = 2.0
    assert [c.tolist() for c in global_capacities(equal, real, 2)] == [[[4, 3]], [[0, 1]]]


def test_global_capacities_refuse_bad_input():
    x = [torch.zeros(1, 2, 5)]
    real = [torch.ones(1, 5, dtype=torch.bool)]
    bad = torch.zeros(1, 2, 5)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=exactly(
            "mixkv: policy 'global': importance of layer 0 is NaN or infinite at a real "
            "candidate")):
        global_capacities([bad], real, 2)
    # NaN at a padded candidate does not count (equal zeros: head 0 first)
    real_padded = [torch.tensor([[True, True, False, True, True]])]
    assert [c.tolist() for c in global_capacities([bad], real_padded, 1)] == [[[2, 0]]]
    with pytest.raises(ValueError, match=exactly(
            "mixkv: policy 'global': capacity must be >= 0, got -1")):
        global_capacities(x, real, -1)
    with pytest.raises(ValueError, match=exactly(
            "mixkv: policy 'global': floor must be an int >= 0, got -2")):
        global_capacities(x, real, 1, floor=-2)
    with pytest.raises(ValueError, match=exactly(
            "mixkv: policy 'global': importance of layer 1 has shape (1, 3, 5), expected "
            "[1, 2, candidates]")):
        global_capacities(x + [torch.zeros(1, 3, 5)], real * 2, 1)
    with pytest.raises(ValueError, match=exactly(
            "mixkv: policy 'global': real-candidate mask of layer 0 has shape (1, 4), "
            "expected (1, 2, 5)")):
        global_capacities(x, [torch.ones(1, 4, dtype=torch.bool)], 1)
    with pytest.raises(ValueError, match=exactly(
            "mixkv: policy 'global': floor must be an int >= 0, got 1.5")):
        M.resolve("global", budget=BUDGET, window=W, floor=1.5)
    with pytest.raises(ValueError, match=exactly(
            "mixkv: budget (4) must be larger than window (4): the budget counts the window")):
        M.resolve("kvzip+global", budget=W, window=W)


# -- in the shim ------------------------------------------------------------------------------

def _batch(B=2, seed=3):
    ids = torch.randint(2, hf_models.TEXT_VOCAB, (B, N), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if B > 1:
        mask[1, :11] = 0
    return ids, mask


def _full(model, ids, mask):
    """A full prefill cache and each layer's window queries (unpatched)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), capture_prefill(model, W) as captured:
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{hf_models.cache_kwarg(): cache})
    return cache, captured.queries


def _kept(full_keys, layer):
    """[b][h] -> sorted kept positions of a HeadwiseLayer (rows matched exactly)."""
    assert isinstance(layer, HeadwiseLayer)
    B, Hkv, n, _ = full_keys.shape
    out = []
    for b in range(B):
        row = []
        for h in range(Hkv):
            s = b * Hkv + h
            start, length = int(layer.starts[s]), int(layer.lengths[s])
            where = {full_keys[b, h, j].numpy().tobytes(): j for j in range(n)}
            assert len(where) == n
            row.append(sorted(where[k.numpy().tobytes()]
                              for k in layer.key_buffer[start:start + length]))
        out.append(row)
    return out


def _reference(method, model, full, queries, mask, reconstruction=None):
    """{layer: [b][h] kept positions} of the global top-k over the method's own importance,
    each head's count filled with its best scores (ties to the lower position), plus the
    window."""
    modules = [layer.self_attn for layer in model.model.layers]
    prefills, scored = {}, {}
    for i, module in enumerate(modules):
        keys, values = full.layers[i].keys, full.layers[i].values
        prefills[i] = M.Prefill(queries=queries[i], keys=keys, values=values,
                                key_mask=mask.bool(), window=W, layer=i,
                                num_layers=len(modules), scaling=float(module.scaling),
                                module=module, reconstruction=(reconstruction or {}).get(i))
        scored[i] = method.scored(prefills[i])
    C = N - W
    counts = reference_capacities([scored[i][0] for i in prefills],
                                  [prefills[i].real_candidates() for i in prefills],
                                  BUDGET - W)
    out = {}
    for i, count in zip(prefills, counts):
        scores = scored[i][1]
        rows = []
        for b in range(mask.shape[0]):
            real = [j for j in range(C) if mask[b, j]]
            rows.append([sorted(sorted(real, key=lambda j: (-float(scores[b, h, j]), j))
                                [:int(count[b, h])]) + list(range(C, N))
                         for h in range(scores.shape[1])])
        out[i] = rows
    return out


def _sharpened(build=hf_models.llama):
    model, _ = build()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


KVZIP = dict(M.kvzip.FORMER, repeat_prompt=PROMPT, chunk_size=16, sinks=2)


@pytest.mark.parametrize("name", ["global", "mixkv+global", "kvzip+global",
                                  "mixkv(kvzip)+global"])
def test_patch_and_compress_cache_keep_the_global_top_k(name):
    model = _sharpened()
    ids, mask = _batch()
    options = KVZIP if "kvzip" in name else {}
    method = M.resolve(name, budget=BUDGET, window=W, **options)
    assert method.spans_layers and method.deferred and method.headwise
    patched = DynamicCache(config=model.config)
    with mixkv.patch(model, name, budget=BUDGET, window=W, **options) as handle, \
            torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True,
              **{hf_models.cache_kwarg(): patched})
        stats = handle.stats()["layers"]
    full, queries = _full(model, ids, mask)
    scores = None
    if "kvzip" in name:
        scores = reconstruct.reconstruction_scores(
            model, full, input_ids=ids, key_mask=mask.bool(), **reconstruct.plan_for(method))
    want = _reference(method, model, full, queries, mask, scores)
    L, Hkv = len(full.layers), full.layers[0].keys.shape[1]
    counts = torch.stack([stats[i]["kept"] for i in range(L)])           # [L, B, Hkv]
    # the whole cache's budget, split unevenly
    assert counts.sum((0, 2)).tolist() == [BUDGET * Hkv * L] * 2
    assert len(set(counts.flatten().tolist())) > 2
    for i in range(L):
        got = _kept(full.layers[i].keys, patched.layers[i])
        if "kvzip" in name:      # the kept sinks: the first 2 real tokens of each row
            assert all(set(head) >= {0, 1} for head in got[0])
            assert all(set(head) >= {11, 12} for head in got[1])
        assert got == want[i], (name, i)
    # the evaluation's path: compress a copy of the full cache
    copied = copy.deepcopy(full)
    with mixkv.patch(model, name, budget=BUDGET, window=W, **options) as handle:
        # the prefill ran without position_ids (0 .. N-1 in every row): so does the pass
        handle.compress_cache(copied, queries, key_mask=mask.bool(), context_ids=ids)
    for i in range(L):
        assert torch.equal(copied.layers[i].key_buffer, patched.layers[i].key_buffer)
        assert torch.equal(copied.layers[i].lengths, patched.layers[i].lengths)


def test_a_mix_keeps_as_many_tokens_per_head_as_its_base():
    """MixKV changes which tokens a head keeps, never how many: kvzip+global and
    mixkv(kvzip)+global split the budget alike, and the mix keeps other tokens."""
    model = _sharpened()
    ids, mask = _batch()
    kept = {}
    for name in ("kvzip+global", "mixkv(kvzip)+global"):
        cache = DynamicCache(config=model.config)
        with mixkv.patch(model, name, budget=BUDGET, window=W, **KVZIP) as handle, \
                torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True,
                  **{hf_models.cache_kwarg(): cache})
            kept[name] = (torch.stack([s["kept"] for s in handle.stats()["layers"].values()]),
                          [layer.key_buffer for layer in cache.layers])
    (a, keys_a), (b, keys_b) = kept.values()
    assert torch.equal(a, b)
    assert any(not torch.equal(x, y) for x, y in zip(keys_a, keys_b))


def test_a_prompt_within_the_budget_changes_nothing_and_generate_runs():
    model = _sharpened()
    ids, mask = _batch()
    want = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    with mixkv.patch(model, "global", budget=N, window=W) as handle:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert all(s["kept"].tolist() == [[N, N], [N, N]]
                   for s in handle.stats()["layers"].values())
    assert torch.equal(got, want)
    with mixkv.patch(model, "mixkv+global", budget=BUDGET, window=W):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, N + 4)


def test_a_budget_above_a_rows_real_tokens_keeps_them_all():
    """Row 1 keeps 8 real tokens (4 candidates per head, then the window): the global share of
    2 layers x 2 heads x 10 would exceed them, so every head keeps its own 4 and no padding;
    row 0 (all real) keeps the whole budget."""
    model = _sharpened()
    ids, mask = _batch()
    mask[1, :40] = 0
    with mixkv.patch(model, "global", budget=BUDGET, window=W) as handle, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True)
        counts = torch.stack([s["kept"] for s in handle.stats()["layers"].values()])
    assert counts[:, 1].tolist() == [[4 + W, 4 + W]] * 2
    assert counts[:, 0].sum().item() == BUDGET * 2 * 2


@pytest.mark.usefixtures("no_plots")
def test_evaluation_runs_global_methods(tmp_path):
    from mixkv.eval.runner import RunConfig, load_records, run
    from hf_models import tiny_eval_model

    methods = ["global", "kvzip+global", "mixkv(kvzip)+global"]
    config = RunConfig(tasks=["passkey"], lengths=[160], samples=1, methods=methods,
                       budgets=[24], window=8, out=str(tmp_path), progress=False, quiet=True)
    summary = run(config, em=tiny_eval_model())
    records = load_records(tmp_path / "results.jsonl")
    assert sorted({r["method"] for r in records}) == sorted(methods + ["full"])
    ratios = {r["method"]: r["kv_ratio"] for r in records}
    assert all(0 < ratios[m] < 1 for m in methods)
    # every method keeps budget x heads x layers: the same ratio
    assert len({round(ratios[m], 9) for m in methods}) == 1
    assert {(r["method"], r["base"]) for r in summary["paired"]} == \
        {("mixkv(kvzip)+global", "kvzip+global")}


@pytest.mark.parametrize("name", ["global", "mixkv+global", "knorm+global"])
def test_compression_during_generation_keeps_the_whole_caches_budget(name):
    model = _sharpened()
    ids, mask = _batch()
    decode_budget, interval = 12, 8
    seen = []
    with mixkv.patch(model, name, budget=BUDGET, decode_budget=decode_budget,
                     interval=interval, window=W) as handle:
        original = handle.decoding._compress_global

        def counted(pending):
            original(pending)
            layers = [layer_of(cache, i) for i, (_, cache) in sorted(pending.items())]
            seen.append(torch.stack([layer.lengths.view(2, -1) for layer in layers]))

        handle.decoding._compress_global = counted
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3 * interval + 2,
                             do_sample=False)
    assert out.shape == (2, N + 3 * interval + 2)
    assert len(seen) == 3 and handle.decoding.compressions == 3 * 2
    for lengths in seen:                                         # [L, B, Hkv] after each
        assert lengths.sum((0, 2)).tolist() == [decode_budget * 2 * 2] * 2
        assert len(set(lengths.flatten().tolist())) > 1          # split unevenly
