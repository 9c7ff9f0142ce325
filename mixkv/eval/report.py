"""Aggregate result records into a summary, the report's tables and prose, CSV and plots.

Records are results in their JSON form (:meth:`mixkv.eval.records.Result.to_json`, the rows of
results.jsonl: one per sample, method and budget), so a report reads the files of any mixkv
version. :func:`document` writes a run's table.md and :func:`side_by_side_document` that of
``--mode both``, every title and paragraph included; the runner only writes them to files.

The tables have one row per method and one column per budget; each cell is the mean task score
with its bootstrap 95% interval; ``n`` is the number of samples per cell. A second table gives
the paired difference "method minus its base" (e.g. ``mixkv+adakv - adakv``: a mix against its
inner method under the same policy, ``mixkv.methods.base_of``) on the same samples, with a
paired bootstrap interval, and a third the fidelity to the full cache.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ..constants import FULL
from ..methods import base_of, is_mix, order_key
from .metrics import bootstrap_ci
from .tasks import CORPUS_TASK

FIDELITY = ("kl", "top1_agree", "delta_nll")
# Resolution of the PNG reports; the tests lower it (rendering is most of their time).
DPI = 110


def budget_key(record: Dict) -> str:
    if record.get("method") == FULL:
        return FULL
    if record.get("budget") is not None:
        return str(record["budget"])
    return f"ratio={record['ratio']}"


def _budget_order(key: str):
    if key == FULL:
        return (2, 0.0)
    if key.startswith("ratio="):
        return (1, -float(key[6:]))
    return (0, float(key))


def summarize(records: Sequence[Dict], *, seed: int = 0) -> Dict:
    """Per (task, method, budget) and overall (all tasks pooled) means and intervals."""
    cells: Dict = defaultdict(list)
    for r in records:
        # fidelity-only rows (natural text, metric "none") have no score to pool into "all"
        for task in (r["task"],) if r.get("metric") == "none" else (r["task"], "all"):
            cells[(task, r["method"], budget_key(r))].append(r)
    rows = []
    for (task, method, budget), group in sorted(cells.items(),
                                                key=lambda x: (x[0][0], x[0][1],
                                                               _budget_order(x[0][2]))):
        mean, low, high = bootstrap_ci([g["score"] for g in group], seed=seed)
        row = dict(task=task, method=method, budget=budget, n=len(group), score=mean,
                   low=low, high=high)
        for key in FIDELITY:
            values = [g[key] for g in group if g.get(key) is not None]
            row[key], row[key + "_low"], row[key + "_high"] = bootstrap_ci(values, seed=seed)
        row["kv_ratio"] = sum(g.get("kv_ratio", 1.0) for g in group) / len(group)
        rows.append(row)
    scored = [r for r in records if r.get("metric") != "none"]
    fidelity_only = [r for r in records if r.get("metric") == "none"]
    return dict(rows=rows, paired=paired(scored, seed=seed),
                paired_fidelity=paired(fidelity_only, seed=seed))


def summarize_by_length(records: Sequence[Dict], *, seed: int = 0) -> Dict[int, Dict]:
    """{length: summary of that length's scored records} when the records span several prompt
    lengths, else {} (one length: the pooled summary is that length's)."""
    scored = [r for r in records if r.get("metric") != "none" and r.get("length") is not None]
    lengths = sorted({r["length"] for r in scored})
    if len(lengths) < 2:
        return {}
    return {length: summarize([r for r in scored if r["length"] == length], seed=seed)
            for length in lengths}


def paired(records: Sequence[Dict], *, seed: int = 0) -> List[Dict]:
    """Paired differences of each method against its base (same samples, same budget)."""
    by_key = {(r["sample_id"], r["method"], budget_key(r)): r for r in records}
    out = []
    methods = sorted({r["method"] for r in records})
    budgets = sorted({budget_key(r) for r in records if r["method"] != FULL},
                     key=_budget_order)
    for method in methods:
        base = base_of(method)
        if base is None or base not in methods:
            continue
        for budget in budgets:
            diffs, kl_diffs = [], []
            for (sample, m, b), r in by_key.items():
                other = by_key.get((sample, base, b))
                if m == method and b == budget and other is not None:
                    if not (math.isnan(r["score"]) or math.isnan(other["score"])):
                        diffs.append(r["score"] - other["score"])
                    if r.get("kl") is not None and other.get("kl") is not None:
                        kl_diffs.append(r["kl"] - other["kl"])
            if diffs or kl_diffs:   # no score diffs: fidelity-only samples (natural text)
                mean, low, high = bootstrap_ci(diffs, seed=seed)
                kl = bootstrap_ci(kl_diffs, seed=seed) if kl_diffs else (math.nan,) * 3
                out.append(dict(method=method, base=base, budget=budget,
                                n=max(len(diffs), len(kl_diffs)),
                                diff=mean, low=low, high=high, kl_diff=kl[0], kl_low=kl[1],
                                kl_high=kl[2],
                                wins=sum(d > 0 for d in diffs), losses=sum(d < 0 for d in diffs)))
    return out


def _fmt(mean, low, high, digits=2):
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown(summary: Dict, *, task: str = "all", title: Optional[str] = None) -> str:
    """Methods x budgets table of the task score (mean [95% CI]) for one task or "all"."""
    rows = [r for r in summary["rows"] if r["task"] == task]
    if not rows:  # a run with nothing recorded yet still says what it is
        return f"{title}\n\n(no results)\n" if title else ""
    budgets = sorted({r["budget"] for r in rows if r["budget"] != FULL}, key=_budget_order)
    methods = sorted({r["method"] for r in rows}, key=_method_order)
    cell = {(r["method"], r["budget"]): r for r in rows}
    lines = []
    if title:
        lines += [title, ""]
    lines.append("| method | " + " | ".join(f"budget {b}" for b in budgets) + " | n |")
    lines.append("|---|" + "---|" * (len(budgets) + 1))
    for method in methods:
        if method == FULL:
            r = cell.get((FULL, FULL))
            if r is None:
                continue
            text = _fmt(r["score"], r["low"], r["high"])
            lines.append(f"| full cache | " + " | ".join(text for _ in budgets) +
                         f" | {r['n']} |")
            continue
        texts, ns = [], set()
        for b in budgets:
            r = cell.get((method, b))
            texts.append(_fmt(r["score"], r["low"], r["high"]) if r else "–")
            if r:
                ns.add(r["n"])
        lines.append(f"| {method} | " + " | ".join(texts) + " | " +
                     "/".join(str(n) for n in sorted(ns)) + " |")
    return "\n".join(lines) + "\n"


def side_by_side_markdown(summaries: Dict[str, Dict], *, task: str = "all",
                          title: Optional[str] = None) -> str:
    """One methods x (regime, budget) table of the task score (mean [95% CI]): ``summaries``
    maps a regime ("agnostic", "aware") to its :func:`summarize` result."""
    cells, budgets, methods = {}, {}, set()
    for mode, summary in summaries.items():
        rows = [r for r in summary["rows"] if r["task"] == task]
        budgets[mode] = sorted({r["budget"] for r in rows if r["budget"] != FULL},
                               key=_budget_order)
        for r in rows:
            cells[(mode, r["method"], r["budget"])] = r
            methods.add(r["method"])
    if not methods:
        return ""
    columns = [(mode, b) for mode in summaries for b in budgets[mode]]
    lines = [title, ""] if title else []
    lines.append("| method | " + " | ".join(f"{mode} {b}" for mode, b in columns) + " | n |")
    lines.append("|---|" + "---|" * (len(columns) + 1))
    for method in sorted(methods, key=_method_order):
        texts, ns = [], set()
        for mode, b in columns:
            r = cells.get((mode, method, FULL if method == FULL else b))
            texts.append(_fmt(r["score"], r["low"], r["high"]) if r else "–")
            if r:
                ns.add(r["n"])
        label = "full cache" if method == FULL else method
        lines.append(f"| {label} | " + " | ".join(texts) + " | " +
                     "/".join(str(n) for n in sorted(ns)) + " |")
    return "\n".join(lines) + "\n"


def _compressed_grid(summary: Dict, task: str):
    """(budgets, methods, {(method, budget): row}) of the compressed methods' rows of `task`."""
    rows = [r for r in summary["rows"] if r["task"] == task and r["method"] != FULL]
    budgets = sorted({r["budget"] for r in rows}, key=_budget_order)
    methods = sorted({r["method"] for r in rows}, key=_method_order)
    return budgets, methods, {(r["method"], r["budget"]): r for r in rows}


def fidelity_markdown(summary: Dict, *, task: str = "all", key: str = "kl") -> str:
    budgets, methods, cell = _compressed_grid(summary, task)
    if not methods:
        return ""
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for method in methods:
        values = []
        for b in budgets:
            r = cell.get((method, b))
            values.append("–" if r is None or math.isnan(r[key]) else f"{r[key]:.3f}")
        lines.append(f"| {method} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def fidelity_ci_markdown(summary: Dict, *, task: str,
                         keys=(("kl", "KL(full || compressed), nats", 3),
                               ("top1_agree", "top-1 agreement", 3),
                               ("delta_nll", "NLL increase, nats", 3))) -> str:
    """One methods x budgets table per fidelity metric for ``task``, each cell the mean over
    samples with its bootstrap 95% interval."""
    budgets, methods, cell = _compressed_grid(summary, task)
    if not methods:
        return ""
    parts = []
    for key, label, digits in keys:
        lines = [f"| {label} | " + " | ".join(f"budget {b}" for b in budgets) + " | n |",
                 "|---|" + "---|" * (len(budgets) + 1)]
        for method in methods:
            texts, ns = [], set()
            for b in budgets:
                r = cell.get((method, b))
                texts.append(_fmt(r[key], r[key + "_low"], r[key + "_high"], digits)
                             if r else "–")
                if r:
                    ns.add(r["n"])
            lines.append(f"| {method} | " + " | ".join(texts) + " | " +
                         "/".join(str(n) for n in sorted(ns)) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def paired_markdown(summary: Dict, *, key: str = "paired") -> str:
    """The paired differences ``summary[key]``: "paired" (task score, and KL over the answer
    tokens) or "paired_fidelity" (natural text: KL over the continuation, with its interval)."""
    rows = summary.get(key) or []
    if not rows:
        return ""
    if key == "paired_fidelity":
        lines = ["| method - base | budget | n | KL diff [95% CI] |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} - {r['base']} | {r['budget']} | {r['n']} | "
                         f"{r['kl_diff']:+.3f} [{r['kl_low']:+.3f}, {r['kl_high']:+.3f}] |")
        return "\n".join(lines) + "\n"
    lines = ["| method - base | budget | n | score diff [95% CI] | wins/losses | KL diff |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kl = "–" if math.isnan(r["kl_diff"]) else f"{r['kl_diff']:+.3f}"
        lines.append(f"| {r['method']} - {r['base']} | {r['budget']} | {r['n']} | "
                     f"{r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | "
                     f"{r['wins']}/{r['losses']} | {kl} |")
    return "\n".join(lines) + "\n"


_method_order = order_key  # full, then each base method followed by its mixes


# -- the documents: table.md of a run and of both regimes ----------------------------------------
NO_PAIRS = "(no method/base pairs)\n"
HEATMAP_TITLE = "Score by needle depth and budget ({})"


def run_title(config, em=None, *, mode: Optional[str] = None) -> str:
    """What a report's titles say about the run (a :class:`mixkv.eval.runner.RunConfig`; ``em``:
    the loaded model, else the config's model is named): model | engine (when not HF) |
    regime | inputs | lengths | window."""
    inputs = list(config.tasks) + [Path(d).name for d in config.data]
    if config.corpus:
        inputs.append(f"corpus {Path(config.corpus).name}")
    if config.decode_budget is not None:
        inputs.append(f"decode budget {config.decode_budget} every "
                      f"{config.interval or 'default'} tokens")
    parts = [em.name if em is not None else str(config.model)]
    if config.engine != "hf":
        parts.append(f"engine {config.engine}")
    if mode:
        parts.append(f"mode {mode}")
    parts += [", ".join(inputs), f"length {'/'.join(map(str, config.lengths))}",
              f"window {config.window}"]
    return " | ".join(parts)


def _scored_tasks(records: Sequence[Dict]) -> List[str]:
    return sorted({r["task"] for r in records if r.get("metric") != "none"})


def summarize_run(records: Sequence[Dict], *, seed: int = 0) -> Dict:
    """:func:`summarize`, plus ``by_length`` (:func:`summarize_by_length`) when the run has a
    scored task or no record yet: the summary a run's summary.json holds."""
    summary = summarize(records, seed=seed)
    if _scored_tasks(records) or not records:
        summary["by_length"] = summarize_by_length(records, seed=seed)
    return summary


def _paired_section(title: str, summary: Dict) -> str:
    return f"**{title}**\n\n" + (paired_markdown(summary) or NO_PAIRS)


def document(records: Sequence[Dict], summary: Dict, *, title: str, continuation: int,
             layers: Optional[Dict] = None) -> str:
    """A run's table.md: the task score (all tasks, then each task), the paired differences,
    each prompt length's own, the fidelity tables, the natural-text fidelity (``continuation``:
    its teacher-forced tokens per passage) and which layers were left uncompressed
    (``layers``: :func:`mixkv.eval.engine.layers_left_alone`). ``summary``:
    :func:`summarize_run` of ``records``; ``title``: :func:`run_title`."""
    tables = []
    tasks = _scored_tasks(records)
    if tasks or not records:
        tables.append(markdown(summary, title=f"**Task score, all tasks** ({title})"))
        if len(tasks) > 1:
            for task in tasks:
                tables.append(markdown(summary, task=task, title=f"**{task}**"))
        tables.append(_paired_section("Paired difference against the base method "
                                      "(same samples)", summary))
        # Several prompt lengths: the pooled tables above, then each length on its own.
        for length, part in summary["by_length"].items():
            tables.append(markdown(
                part, title=f"**Task score, all tasks, {length:,}-token prompts**"))
            tables.append(_paired_section(f"Paired difference against the base method, "
                                          f"{length:,}-token prompts", part))
        tables.append("**Mean KL(full || compressed) over the answer tokens (nats)**\n\n" +
                      fidelity_markdown(summary, key="kl"))
        tables.append("**Top-1 agreement with the full cache over the answer tokens**\n\n" +
                      fidelity_markdown(summary, key="top1_agree"))
    corpus = [r for r in records if r["task"] == CORPUS_TASK]
    if corpus:
        passages = len({r["sample_id"] for r in corpus})
        documents = len({r.get("document", r["sample_id"]) for r in corpus})
        tables.append(
            f"**Natural-text fidelity** ({title}: {passages} passage(s) of {documents} "
            f"document(s), each prefix compressed and the next {continuation} tokens "
            "teacher-forced; mean over tokens, then passages, [95% CI])\n\n" +
            fidelity_ci_markdown(summary, task=CORPUS_TASK))
        paired_text = paired_markdown(summary, key="paired_fidelity")
        if paired_text:
            tables.append("**Natural text: paired KL difference against the base method**\n\n"
                          + paired_text)
    if layers and layers["sliding_window"]:
        tables.append(
            f"Layers left uncompressed: {len(layers['sliding_window'])} of "
            f"{layers['layers']} use sliding-window attention "
            f"({ranges(layers['sliding_window'])}) and keep their window cache; the "
            f"methods compress the {len(layers['compressed'])} global layers "
            f"({ranges(layers['compressed'])}). KV ratios count the compressed layers "
            "only.\n")
    return "\n".join(t for t in tables if t)


def side_by_side_document(summaries: Dict[str, Dict], *, title: str) -> str:
    """table.md of ``--mode both``: one methods x (regime, budget) table of the task score,
    the regimes' paired differences, each prompt length's table, then each regime's own report
    (``summaries``: regime -> its summary with its ``markdown``)."""
    parts = [side_by_side_markdown(
        summaries, title=f"**Task score, all tasks, both regimes** ({title}; agnostic: the "
                         "context is compressed before the question is appended; aware: the "
                         "question is part of the compressed prompt)")]
    for mode, summary in summaries.items():
        parts.append(_paired_section(f"Paired difference against the base method, {mode}",
                                     summary))
    lengths = sorted({length for summary in summaries.values()
                      for length in summary.get("by_length", {})})
    for length in lengths:
        parts.append(side_by_side_markdown(
            {mode: summary["by_length"][length] for mode, summary in summaries.items()
             if length in summary.get("by_length", {})},
            title=f"**Task score, all tasks, both regimes, {length:,}-token prompts**"))
    for mode, summary in summaries.items():
        parts.append(f"## Regime {mode} (folder `{mode}/`)\n\n" + summary["markdown"])
    return "\n".join(parts)


def ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 4, 6, 7] -> "0-2, 4, 6-7"."""
    parts, run = [], []
    for i in list(indices) + [None]:
        if run and (i is None or i != run[-1] + 1):
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        if i is not None:
            run.append(i)
    return ", ".join(parts)


def write_csv(records: Iterable[Dict], path: str) -> None:
    records = list(records)
    keys: List[str] = []
    for r in records:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for r in records:
            writer.writerow({k: ("|".join(map(str, v)) if isinstance(v, list) else
                                 json.dumps(v) if isinstance(v, dict) else v)
                             for k, v in r.items()})


def _score_panel(ax, rows: List[Dict], *, key: str = "score", band: bool = True) -> None:
    """One line per method of ``key`` against the budget (a base and its "+MixKV" variants
    share a colour; mixes solid, bases dashed), the full cache dotted."""
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget"] for r in rows if r["budget"] != FULL}, key=_budget_order)
    positions = {b: i for i, b in enumerate(budgets)}
    methods = sorted({r["method"] for r in rows if r["method"] != FULL}, key=_method_order)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    families = []
    for method in methods:
        family = base_of(method) or method
        if family not in families:
            families.append(family)
    for method in methods:
        color = palette[families.index(base_of(method) or method) % len(palette)]
        mine = sorted((r for r in rows if r["method"] == method),
                      key=lambda r: _budget_order(r["budget"]))
        x = [positions[r["budget"]] for r in mine]
        style, marker = ("-", "o") if is_mix(method) else ("--", "s")
        ax.plot(x, [r[key] for r in mine], style, marker=marker, label=method, color=color)
        if band:
            ax.fill_between(x, [r[key + "_low" if key != "score" else "low"] for r in mine],
                            [r[key + "_high" if key != "score" else "high"] for r in mine],
                            color=color, alpha=0.08)
    full = [r for r in rows if r["method"] == FULL]
    if full and key == "score":
        ax.axhline(full[0]["score"], color="black", linestyle=":", label="full cache")
    ax.set_xticks(range(len(budgets)))
    ax.set_xticklabels(budgets)
    ratios = [str(b).startswith("ratio=") for b in budgets]
    ax.set_xlabel("ratio: fraction of the prompt removed" if ratios and all(ratios) else
                  "KV budget (tokens per head, window included)" if not any(ratios) else
                  "KV budget (tokens per head) or ratio (fraction removed)")
    ax.grid(alpha=0.3)


def _by_length(summary: Dict) -> List:
    """[(prompt length or None, summary)]: one entry per length of a run over several (the
    runner's ``summary["by_length"]``), else the pooled summary alone."""
    return list(summary.get("by_length", {}).items()) or [(None, summary)]


def plot(summary: Dict, path: str, *, title: str = "") -> None:
    """Score vs budget (one line per method, full cache dotted) and KL vs budget, as a PNG;
    one row of panels per prompt length when the run has several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = _by_length(summary)
    fig, axes = plt.subplots(len(parts), 2, figsize=(11, 4.2 * len(parts)), squeeze=False)
    for (length, part), (score_ax, kl_ax) in zip(parts, axes):
        rows = [r for r in part["rows"] if r["task"] == "all"]
        _score_panel(score_ax, rows)
        _score_panel(kl_ax, rows, key="kl", band=False)
        score_ax.set_ylabel("task score (mean, 95% CI)")
        kl_ax.set_ylabel("KL(full || compressed), nats")
        score_ax.set_ylim(-0.02, 1.02)
        if any(r["kl"] > 0 for r in rows if not math.isnan(r["kl"])):
            kl_ax.set_yscale("log")
        if length is not None:
            score_ax.set_title(f"{length:,}-token prompts", fontsize=10)
            kl_ax.set_title(f"{length:,}-token prompts", fontsize=10)
    _legend_outside(fig, axes[0][0])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _legend_outside(fig, ax) -> None:
    """The methods' legend right of the panels, where it hides no line."""
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8, frameon=False)


def plot_regimes(summaries: Dict[str, Dict], path: str, *, title: str = "") -> None:
    """Score vs budget, one panel per regime on a shared axis (one row per prompt length when
    the runs have several), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {mode: dict(_by_length(summary)) for mode, summary in summaries.items()}
    lengths = sorted({length for part in parts.values() for length in part},
                     key=lambda n: n or 0)
    fig, axes = plt.subplots(len(lengths), len(parts), figsize=(5.6 * len(parts),
                                                              4.2 * len(lengths)),
                             sharey=True, squeeze=False)
    for row, length in zip(axes, lengths):
        for ax, mode in zip(row, parts):
            part = parts[mode].get(length)
            _score_panel(ax, [r for r in part["rows"] if r["task"] == "all"] if part else [])
            ax.set_title(f"query-{mode}" + (f", {length:,}-token prompts" if length else ""),
                         fontsize=10)
            ax.set_ylim(-0.02, 1.02)
        row[0].set_ylabel("task score (mean, 95% CI)")
    _legend_outside(fig, axes[0][-1])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def depth_grid(records: Sequence[Dict], *, bins: int = 5) -> Dict:
    """Mean task score per method, needle-depth bin and budget: where in the prompt each
    method loses the needle. Only records with a needle depth (the RULER needle tasks) count.
    Returns ``dict(methods=[...], budgets=[...], edges=[0, 0.2, ...], cells={method:
    [[(mean, n) or None per budget] per depth bin]})``; the full cache is one column."""
    rows = [r for r in records if r.get("depth") is not None and r.get("score") is not None
            and not (isinstance(r["score"], float) and math.isnan(r["score"]))]
    methods = sorted({r["method"] for r in rows}, key=_method_order)
    budgets = sorted({budget_key(r) for r in rows if r["method"] != FULL}, key=_budget_order)
    edges = [i / bins for i in range(bins + 1)]
    sums: Dict = defaultdict(lambda: [0.0, 0])
    for r in rows:
        depth_bin = min(bins - 1, max(0, int(float(r["depth"]) * bins)))
        cell = sums[(r["method"], depth_bin, budget_key(r))]
        cell[0] += float(r["score"])
        cell[1] += 1
    cells = {}
    for method in methods:
        columns = [FULL] if method == FULL else budgets
        cells[method] = [[(sums[(method, d, b)][0] / sums[(method, d, b)][1],
                           sums[(method, d, b)][1]) if sums.get((method, d, b)) else None
                          for b in columns] for d in range(bins)]
    return dict(methods=methods, budgets=budgets, edges=edges, cells=cells)


def heatmap(records: Sequence[Dict], path: str, *, title: str = "", bins: int = 5) -> bool:
    """Needle depth x budget heatmap per method (one panel each, mean score in every cell with
    its sample count; empty cells blank) as a PNG. Returns False (and writes nothing) when no
    record has a needle depth."""
    grid = depth_grid(records, bins=bins)
    if not grid["methods"]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods, budgets, edges = grid["methods"], grid["budgets"], grid["edges"]
    columns = 4 if len(methods) > 4 else len(methods)
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1.2, 3.0 * rows + 0.6),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, method in zip(axes.flat, methods):
        labels = [FULL] if method == FULL else budgets
        cells = grid["cells"][method]
        values = np.array([[c[0] if c else np.nan for c in row] for row in cells])
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0, vmax=1, cmap="RdYlGn",
                          aspect="auto", origin="upper")
        for d, row in enumerate(cells):
            for b, cell in enumerate(row):
                if cell:
                    ax.text(b, d, f"{cell[0]:.2f}\nn={cell[1]}", ha="center", va="center",
                            fontsize=7)
        ax.set_title(method, fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7, rotation=30 if len(labels) > 4 else 0)
        ax.set_yticks(range(len(cells)))
        first = ax.get_subplotspec().is_first_col()
        ax.set_yticklabels([f"{edges[i]:.0%}-{edges[i + 1]:.0%}" for i in range(len(cells))]
                           if first else [], fontsize=7)
        ax.set_xlabel("budget (tokens per head)" if method != FULL else "", fontsize=8)
        if first:
            ax.set_ylabel("needle depth in the context", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="mean task score")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True
