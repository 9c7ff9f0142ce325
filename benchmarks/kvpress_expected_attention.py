"""mixkv's ``expected_attention`` against kvpress's ExpectedAttentionPress on mixkv-eval's prompts,
sample by sample: the answers, the scores, and the tokens each (layer, KV head) keeps.

Runs in kvpress's own virtual environment (kvpress pins transformers < 5.3), from the repository
root::

    PYTHONPATH=. .venv-kvpress/bin/python benchmarks/kvpress_expected_attention.py \\
        --samples 20 --budgets 256,512 --out /tmp/ea-compare

Each sample is prefilled once by mixkv-eval's engine (query-agnostic: the context alone, the
question appended after compression), hidden states captured. Then, per budget:

- ``kvpress``: ``ExpectedAttentionPress(compression_ratio)`` (kvpress's defaults otherwise) runs
  its own ``ScorerPress.compress`` on every layer's (input hidden states, keys, values), what its
  forward hook does after each layer's attention; the compression ratio keeps exactly the budget
  per head (tests/kvpress/peers.ratio_for);
- with ``--leaderboard``, also kvpress's leaderboard entry "expected_attention" (kvpress's
  evaluation/evaluate_registry.py: ``AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))``, masking
  head-wise instead of removing) and its scorer under uniform budgets;
- each ``--variant`` of mixkv (``NAME=METHOD:OPTIONS[@PEER]``: a method label, mixkv.patch
  options as JSON, the kvpress configuration to compare with) compresses a copy of the full
  cache with ``compress_cache``, as mixkv-eval does (head-wise variants are not answered under
  kvpress's transformers, which the shim's head-wise cache does not support);

and the engine answers the question from each compressed cache. Kept positions are recovered by
matching kept key rows against the full cache's rows bit for bit (peers.kept_positions).

Per sample and budget the JSONL output has each variant's score and answer and, against
kvpress: the mean and minimum share of kvpress's kept tokens that the variant keeps (over
layers x heads), the heads keeping exactly kvpress's set, and whether the variant keeps the first
four tokens (kvpress always does) and the needle's tokens (the answer's first token id, found
in the context).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "kvpress"))

from kvpress import AdaKVPress, ExpectedAttentionPress  # noqa: E402

import mixkv  # noqa: E402
from mixkv.eval.engine import Engine  # noqa: E402
from mixkv.eval.models import load_model  # noqa: E402
from mixkv.eval.tasks import make_samples  # noqa: E402
from peers import kept_positions, ratio_for  # noqa: E402

WINDOW = 32
OLD_TRANSFORMERS = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 3)


def kvpress_compress(em, prefilled, press):
    """A copy of the prefill's full cache compressed by ``press`` layer by layer, and its kept
    positions [layer][b][h]. AdaKVPress removes nothing: it sets each attention module's
    ``masked_key_indices``, which kvpress's attention patch applies at every later forward
    (``clear_masks`` ends that)."""
    cache = copy.deepcopy(prefilled.cache)
    language_model = em.model.model
    kept = []
    with torch.no_grad():
        for i, layer in enumerate(language_model.layers):
            attention = layer.self_attn
            attention.rotary_emb = language_model.rotary_emb   # as kvpress's press(model) does
            keys, values = cache.layers[i].keys, cache.layers[i].values
            k, v = press.compress(attention, prefilled.hidden_states[i], keys, values, None, {})
            masked = getattr(attention, "masked_key_indices", None)
            if masked is not None:
                B, H, N, _ = keys.shape
                keep = torch.ones(B, H, N, dtype=torch.bool)
                keep[masked[0].cpu(), masked[1].cpu(), masked[2].cpu()] = False
                kept.append([[keep[b, h].nonzero().flatten().tolist() for h in range(H)]
                             for b in range(B)])
            else:
                kept.append(kept_positions(keys, k))
            cache.layers[i].keys, cache.layers[i].values = k, v
    return cache, kept


def clear_masks(em):
    for layer in em.model.model.layers:
        layer.self_attn.masked_key_indices = None


def layer_kept(full_keys, layer):
    """Kept positions [b][h] of a compressed layer, dense or head-wise (mixkv.hf.HeadwiseLayer:
    each (row, head) segment of its key buffer)."""
    if hasattr(layer, "key_buffer"):
        B, H = full_keys.shape[:2]
        starts, lengths = layer.starts.tolist(), layer.lengths.tolist()
        segments = [layer.key_buffer[s:s + n] for s, n in zip(starts, lengths)]
        return [[kept_positions(full_keys[b:b + 1, h:h + 1], segments[b * H + h][None, None])[0][0]
                 for h in range(H)] for b in range(B)]
    return kept_positions(full_keys, layer.keys)


def mixkv_compress(em, prefilled, method, budget, options):
    cache = copy.deepcopy(prefilled.cache)
    with mixkv.patch(em.model, method, budget=budget, window=WINDOW, **options) as handle:
        handle.compress_cache(cache, prefilled.q_windows, hidden_states=prefilled.hidden_states)
    kept = [layer_kept(prefilled.cache.layers[i].keys, cache.layers[i])
            for i in range(len(cache.layers))]
    return cache, kept, handle.method.headwise


def needle_positions(em, prepared):
    """Positions in the context of the first token of each answer (" 1234567" as the model
    reads it inside the text), or [] where the tokenizer splits it otherwise."""
    ids, found = prepared.prefill_ids, []
    for answer in prepared.sample.answers:
        for text in (" " + answer, answer):
            first = em.encode(text)[:1]
            hits = [j for j, t in enumerate(ids) if first and t == first[0]]
            if hits:
                found.extend(hits)
                break
    return sorted(set(found))


def compare(ours, theirs, needles):
    shares, exact, sinks, needle_kept = [], 0, [], []
    for layer_a, layer_b in zip(ours, theirs):
        for a, b in zip(layer_a[0], layer_b[0]):
            # head-wise budgets: the share of the larger set both keep
            shares.append(len(set(a) & set(b)) / max(len(a), len(b), 1))
            exact += a == b
            sinks.append(all(j in a for j in range(4)))
            if needles:
                needle_kept.append(any(j in a for j in needles))
    return dict(overlap_mean=sum(shares) / len(shares), overlap_min=min(shares),
                heads_equal=exact, heads=len(shares), sinks_kept=sum(sinks) / len(sinks),
                needle_kept=sum(needle_kept) / len(needle_kept) if needle_kept else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="niah_single,niah_multikey")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--budgets", default="256,512")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=METHOD:OPTIONS[@PEER]: a mixkv method label, its "
                             "mixkv.patch options as JSON and the kvpress press its kept tokens "
                             "are compared with (kvpress, or with --leaderboard kvpress_eps or "
                             "kvpress_adakv; default kvpress), e.g. "
                             "'sinks0=expected_attention:{\"sinks\": 0}' (repeatable; default: "
                             "expected_attention with its defaults)")
    parser.add_argument("--leaderboard", action="store_true",
                        help="also kvpress's leaderboard configuration (kvpress's "
                             "evaluation/evaluate_registry.py 'expected_attention'): "
                             "kvpress_adakv = AdaKVPress(ExpectedAttentionPress(epsilon=1e-2)), "
                             "and its scorer under uniform budgets, kvpress_eps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {}
    for spec in args.variant or ["mixkv=expected_attention:{}"]:
        name, rest = spec.split("=", 1)
        rest, _, peer = rest.partition("@")
        method, _, options = rest.partition(":")
        variants[name] = (method, json.loads(options or "{}"), peer or "kvpress")
    os.makedirs(args.out, exist_ok=True)
    em = load_model()
    engine = Engine(em, window=WINDOW, mode="agnostic", hidden_states=True)
    budgets = [int(b) for b in args.budgets.split(",")]
    path = os.path.join(args.out, "compare.jsonl")
    with open(path, "w") as out:
        for task in args.tasks.split(","):
            samples = make_samples(task, args.samples, length=args.length,
                                   count_tokens=em.count_tokens)
            for sample in samples:
                start = time.perf_counter()
                prefilled = engine.prefill(engine.prepare(sample))
                N = len(prefilled.prepared.prefill_ids)
                needles = needle_positions(em, prefilled.prepared)
                full = engine.run(prefilled, "full")
                for budget in budgets:
                    ratio = ratio_for(N, budget)
                    row = dict(task=task, sample=sample.id, tokens=N, budget=budget,
                               full=full["score"], needles=needles)
                    presses = {"kvpress": ExpectedAttentionPress(compression_ratio=ratio)}
                    if args.leaderboard:
                        presses["kvpress_eps"] = ExpectedAttentionPress(
                            compression_ratio=ratio, epsilon=1e-2)
                        presses["kvpress_adakv"] = AdaKVPress(ExpectedAttentionPress(
                            compression_ratio=ratio, epsilon=1e-2))
                    kept = {}
                    for name, press in presses.items():
                        cache, kept[name] = kvpress_compress(em, prefilled, press)
                        answer = engine._answer(prefilled, cache)
                        clear_masks(em)
                        row[name] = dict(score=answer["score"], output=answer["output"],
                                         **compare(kept[name], kept[name], needles))
                    for name, (method, options, peer) in variants.items():
                        cache, ours, headwise = mixkv_compress(em, prefilled, method, budget,
                                                               options)
                        # The shim's head-wise cache needs transformers >= 5.3, newer than
                        # kvpress's: its answers come from mixkv-eval in the main environment.
                        answer = dict(score=None, output=None) if headwise and OLD_TRANSFORMERS \
                            else engine._answer(prefilled, cache)
                        row[name] = dict(score=answer["score"], output=answer["output"],
                                         peer=peer, **compare(ours, kept[peer], needles))
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(task, sample.id, budget, "full", full["score"],
                          " ".join(f"{k} {row[k]['score'] or 0:.2f}"
                                   + (f" (overlap {row[k]['overlap_mean']:.3f})"
                                      if k in variants else "")
                                   for k in [*presses, *variants]),
                          f"{time.perf_counter() - start:.1f}s", flush=True)
    summarize(path, budgets, ["kvpress", *(["kvpress_eps", "kvpress_adakv"]
                                           if args.leaderboard else []), *variants])


def summarize(path, budgets, names):
    rows = [json.loads(line) for line in open(path)]
    print(f"\n| budget | n | full | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for budget in budgets:
        rs = [r for r in rows if r["budget"] == budget]
        cells = []
        for name in names:
            scored = [r for r in rs if r[name]["score"] is not None]
            score = sum(r[name]["score"] for r in scored) / max(len(scored), 1)
            if name.startswith("kvpress"):
                cells.append(f"{score:.2f}")
                continue
            overlap = sum(r[name]["overlap_mean"] for r in rs) / len(rs)
            agree = sum(r[name]["score"] == r[r[name].get("peer", "kvpress")]["score"]
                        for r in scored)
            cells.append((f"{score:.2f}, same score {agree}/{len(scored)}" if scored else
                          "not answered") + f" (overlap {overlap:.3f})")
        full = sum(r["full"] for r in rs) / len(rs)
        print(f"| {budget} | {len(rs)} | {full:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
