"""The evaluation grid: methods x budgets x tasks on one model, resumable, with reports.

Every sample is prefilled once; ``full`` (the reference) and then every (method, budget) is
evaluated from a copy of that cache (see :mod:`mixkv.eval.engine`). Each result is appended to
``<out>/results.jsonl`` as soon as it exists, with the ``settings`` that define it (see
:func:`settings_of`): rerunning skips every result whose settings match (a sample whose results
are all there is not even prefilled). Rows written with other settings stay in the file, are
named in a message and never enter this run's reports: ``summary.json``, ``results.csv``,
``table.md`` and ``plot.png`` hold only results of this configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .. import methods as registry
from ..constants import DEFAULT_WINDOW, FULL
from . import report
from .report import run_title
from .records import Result
from .tasks import (DEFAULT_CONTINUATION, TASKS, Haystack, Sample, corpus_samples,
                    load_jsonl, make_samples)

DEFAULT_TASKS = ("niah_single", "niah_multikey")
DEFAULT_METHODS = ("snapkv", "mixkv", "pyramidkv", "mixkv+pyramidkv", "adakv", "mixkv+adakv")
DEFAULT_BUDGETS = (64, 128, 256, 512)
DEFAULT_LENGTHS = (1024,)
DEFAULT_SAMPLES = 10


@dataclasses.dataclass
class RunConfig:
    model: Optional[str] = None
    tasks: Sequence[str] = DEFAULT_TASKS
    lengths: Sequence[int] = DEFAULT_LENGTHS
    samples: int = DEFAULT_SAMPLES
    methods: Sequence[str] = DEFAULT_METHODS
    budgets: Sequence[int] = DEFAULT_BUDGETS
    ratios: Sequence[float] = ()
    window: int = DEFAULT_WINDOW
    mode: str = "agnostic"
    seed: int = 0
    haystack: str = "task"            # "task" (each task's own), "essay" or "noise"
    haystack_dir: Optional[str] = None
    data: Sequence[str] = ()
    limit: Optional[int] = None
    corpus: Optional[str] = None      # natural-text fidelity: a folder of .txt or "builtin"
    continuation: int = DEFAULT_CONTINUATION
    decode_budget: Optional[int] = None  # compression during generation (every method)
    interval: Optional[int] = None    # its tokens between compressions (None: the shim's 64)
    out: str = "eval-results"
    shortcut: bool = True
    threads: Optional[int] = None
    redundancy: Optional[str] = None  # offline profile file for mixkv methods
    kvzap_weights: Optional[str] = None  # the kvzap methods' surrogate (None: the shipped one)
    dtype: str = "float32"
    engine: str = "hf"                # "hf" (transformers + the shim) or "vllm" (+ mixkv.vllm)
    progress: bool = True
    quiet: bool = False


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_settings(config: RunConfig, em) -> Dict:
    """The settings of a run that change its results besides the sample and the method/budget:
    the model (name and file), dtype, regime, window, answer shortcut, seed (the ``random``
    method draws from it) and the redundancy profile (by content, so an edited file counts)."""
    profile = None
    if config.redundancy:
        profile = _digest(Path(config.redundancy).read_bytes())
    settings = dict(model=em.name, model_source=str(em.source), dtype=config.dtype,
                    mode=config.mode, window=config.window, shortcut=config.shortcut,
                    seed=config.seed, redundancy=profile)
    if config.decode_budget is not None:  # only then: earlier runs' rows keep their keys
        settings.update(decode_budget=config.decode_budget, interval=config.interval)
    if config.engine != "hf":             # likewise
        settings.update(engine=config.engine)
    if any(uses_kvzap(m) for m in config.methods):  # likewise; kept by kvzap's rows only
        settings.update(kvzap=kvzap_digest(config.kvzap_weights, em))
    return settings


def uses_kvzap(method: str) -> bool:
    """Whether a part of `method` takes a kvzap surrogate (``weights``)."""
    return registry.uses_option(method, "weights")


def kvzap_digest(weights: Optional[str], em) -> Optional[str]:
    """The content digest of the surrogate the kvzap methods use: ``weights``, else the file
    shipped for the model (None when there is none: the scorer then says how to train one)."""
    if weights is None:
        from ..hf.model import find_attention_modules
        from ..methods import kvzap

        decoder, _ = find_attention_modules(em.model)
        weights = kvzap.shipped().get(kvzap.fingerprint(decoder.config))
    return None if weights is None else _digest(Path(weights).read_bytes())


def import_plugins(paths: Sequence[str]) -> None:
    """Import each module name or .py file, so that the scorers and policies it registers
    (``mixkv.methods.register_scorer``) can be named in --methods."""
    import importlib
    import importlib.util

    for path in paths:
        if path.endswith(".py"):
            name = "mixkv_plugin_" + _digest(str(Path(path).resolve()).encode())
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or not Path(path).is_file():
                raise FileNotFoundError(f"mixkv.eval: --import {path}: no such file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(path)


def uses_redundancy(method: str) -> bool:
    """Whether --redundancy reaches `method` (a part of it takes a redundancy profile: the
    MixKV mixes; their bases ignore it)."""
    return registry.uses_option(method, "redundancy")


def settings_of(run: Dict, sample: Sample, combo: Dict) -> Dict:
    """Everything that defines one result. The sample is pinned by its content (context,
    question, answers, metric, needle depth...): task, length, sample index, samples count,
    haystack, --data file and truncation length, and any change to the prompt builder's code
    all change that digest, so none can be mistaken for another."""
    content = json.dumps(dataclasses.asdict(sample), sort_keys=True, default=str)
    settings = dict(run, sample_id=sample.id, task=sample.task, prompt=_digest(content.encode()),
                    method=combo["method"], budget=combo["budget"], ratio=combo["ratio"])
    if not uses_redundancy(combo["method"]):
        settings["redundancy"] = None
    if not uses_kvzap(combo["method"]):
        settings.pop("kvzap", None)
    setup = reconstruction_setup(combo["method"])
    if setup is not None:   # only these rows carry it: other methods' rows stay reusable
        settings["reconstruction"] = setup
    return settings


def reconstruction_setup(method: str) -> Optional[str]:
    """How a method's reconstruction pass re-reads the context (its scorer with its options,
    e.g. KVzip's prompts, chunks, kept prefix, softmax), for methods that have one: a change of
    a default is then a change of settings, never a reused row."""
    try:
        scorer, _ = registry.parse(method)
    except (ValueError, TypeError):
        return None
    part = next((p for p in (scorer.parts() if scorer is not None else [])
                 if p.needs_reconstruction), None)
    return None if part is None else repr(part)


def record_key(settings: Optional[Dict]) -> Optional[str]:
    """The resume key of a result's settings; None for rows written before settings existed."""
    return json.dumps(settings, sort_keys=True) if settings else None


def describe_other_rows(rows: Sequence[Mapping], run: Dict,
                        wanted: Dict[str, Dict]) -> Optional[str]:
    """A message naming how the rows of results.jsonl (:class:`Result` or their JSON) that
    this run does not use differ from its settings (`wanted`: key -> settings of this run's
    results; None when no row differs)."""
    others = [r for r in rows if record_key(r.get("settings")) not in wanted]
    if not others:
        return None
    legacy = sum(1 for r in others if not r.get("settings"))
    prompts = {s["sample_id"]: s["prompt"] for s in wanted.values()}
    differing, changed_prompts, setups = {}, set(), set()
    for record in others:
        settings = record.get("settings") or {}
        if "method" in settings and settings.get("reconstruction") != \
                reconstruction_setup(settings["method"]):
            setups.add(settings["method"])
        for name, value in settings.items():
            if name in run and value != run[name] and \
                    not (name == "redundancy" and not uses_redundancy(settings["method"])):
                differing.setdefault(name, set()).add(json.dumps(value))
        if prompts.get(settings.get("sample_id"), settings.get("prompt")) != settings.get("prompt"):
            changed_prompts.add(settings["sample_id"])
    parts = [f"{name} {' / '.join(sorted(values))} (this run: {json.dumps(run[name])})"
             for name, values in sorted(differing.items())]
    if setups:
        parts.append(f"the reconstruction setup of {', '.join(sorted(setups))} (its scorer's "
                     "options or defaults changed)")
    if changed_prompts:
        parts.append(f"the prompt of {len(changed_prompts)} sample(s) (samples count, length, "
                     "haystack, data file or prompt builder changed)")
    if legacy:
        parts.append(f"{legacy} written without settings by an older mixkv")
    if not parts:
        parts.append("other samples, methods or budgets")
    return (f"mixkv.eval: {len(others)} row(s) of results.jsonl were written with other "
            f"settings and are left out of this run's reports: {'; '.join(parts)}")


def load_records(path: Path) -> List[Dict]:
    """The rows of a results.jsonl, as read (a line cut short by an interrupted run skipped)."""
    records = []
    if path.exists():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by an interrupted run
                    continue
    return records


def load_results(path: Path) -> List[Result]:
    """The rows of a results.jsonl as :class:`Result` (any mixkv version's: see
    :meth:`Result.from_json`)."""
    return [Result.from_json(row) for row in load_records(path)]


def build_samples(config: RunConfig, em) -> List[Sample]:
    samples: List[Sample] = []
    haystack = None
    if config.haystack_dir:
        haystack = Haystack(directory=config.haystack_dir)
    elif config.haystack != "task":
        haystack = Haystack(config.haystack)
    for task in config.tasks:
        for length in config.lengths:
            samples += make_samples(task, config.samples, length=length, seed=config.seed,
                                    count_tokens=em.count_tokens, haystack=haystack)
    if config.corpus:
        def count(text):
            return len(em.encode(text))

        bos = int(bool(em.adds_bos and em.tokenizer.bos_token_id is not None))
        for length in config.lengths:
            found = corpus_samples(config.corpus, length=length, count_tokens=count, bos=bos,
                                   continuation=config.continuation, passages=config.samples)
            if not found:
                print(f"mixkv.eval: no document of --corpus {config.corpus} holds {length} + "
                      f"{config.continuation} tokens", file=sys.stderr, flush=True)
            samples += found
    for path in config.data:
        samples += load_jsonl(path, limit=config.limit,
                              length=max(config.lengths) if config.lengths else None,
                              count_tokens=em.count_tokens)
    return samples


def plan(config: RunConfig) -> List[Dict]:
    """(method, budget, ratio) combinations, ``full`` first."""
    combos = [dict(method=FULL, budget=None, ratio=None)]
    for method in config.methods:
        if method == FULL:
            continue
        combos += [dict(method=method, budget=b, ratio=None) for b in config.budgets]
        combos += [dict(method=method, budget=None, ratio=r) for r in config.ratios]
    return combos


def threads_for(requested: Optional[int]) -> int:
    """CPU threads: as requested, else torch's default (all cores). On an idle 2-core machine
    the second thread halves prefill and cuts the whole default evaluation by ~1.3x; on a
    machine shared with other work, --threads 1 avoids OpenMP threads spin-waiting on a
    busy core."""
    return requested or torch.get_num_threads()


def _log(config: RunConfig, *args):
    if not config.quiet:
        print(*args, file=sys.stderr, flush=True)


REGIMES = ("agnostic", "aware")
ENGINES = ("hf", "vllm")


def run(config: RunConfig, *, em=None) -> Dict:
    """Run (or resume) the grid and write the reports; returns the summary dict.
    ``mode="both"`` runs each regime into its own OUT/<mode>/ folder, then writes the regimes
    side by side in OUT (:func:`write_side_by_side`)."""
    for task in config.tasks:
        if task not in TASKS:
            raise ValueError(f"mixkv.eval: unknown task {task!r}; choose from {', '.join(TASKS)}")
    for method in config.methods:  # a misspelt method fails before the model loads
        registry.parse(method)
    if config.engine not in ENGINES:
        raise ValueError(f"mixkv.eval: unknown engine {config.engine!r}; choose from "
                         f"{', '.join(ENGINES)}")
    if config.engine == "vllm":
        from .vllm_engine import check

        check(config.mode, config.decode_budget, config.interval)
    if config.decode_budget is not None or config.interval is not None:
        from ..hf.decode import DecodeCompression  # so does one decoding cannot run

        for method in config.methods:
            if method != FULL:
                DecodeCompression.resolve(method, config.decode_budget, config.interval,
                                          dict(window=config.window))
    if config.mode == "both":
        em = em if em is not None else _load(config)
        summaries = {}
        for mode in REGIMES:
            _log(config, f"mixkv.eval: regime {mode} -> {Path(config.out) / mode}")
            summaries[mode] = _run_one(dataclasses.replace(
                config, mode=mode, out=str(Path(config.out) / mode)), em=em)
        return write_side_by_side(summaries, Path(config.out), config=config, em=em)
    return _run_one(config, em=em)


def _load(config: RunConfig):
    from .models import load_model

    _log(config, f"mixkv.eval: loading {config.model or 'the packaged default model'} ...")
    em = load_model(config.model, dtype=getattr(torch, config.dtype))
    _log(config, f"mixkv.eval: loaded {em.name} in {em.load_seconds:.1f} s"
         + (f"; tokenizer fixes: {'; '.join(em.fixes)}" if em.fixes else ""))
    return em


def _run_one(config: RunConfig, *, em=None) -> Dict:
    from .engine import Engine

    torch.set_num_threads(threads_for(config.threads))
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if em is None:
        em = _load(config)
    samples = build_samples(config, em)
    combos = plan(config)
    settings = run_settings(config, em)
    results_path = out / "results.jsonl"
    existing = load_results(results_path)
    done = {record_key(r.settings) for r in existing}

    # Each result's settings and key, computed once (settings_of hashes the sample's content).
    planned = {(i, j): settings_of(settings, sample, combo)
               for i, sample in enumerate(samples) for j, combo in enumerate(combos)}
    key = {ij: record_key(value) for ij, value in planned.items()}
    wanted = {key[ij]: value for ij, value in planned.items()}
    message = describe_other_rows(existing, settings, wanted)
    if message:
        print(message, file=sys.stderr, flush=True)

    total = len(samples) * len(combos)
    already = sum(k in done for k in key.values())
    options = {}
    if config.redundancy:
        options["redundancy"] = config.redundancy
    decoding = {}
    if config.decode_budget is not None or config.interval is not None:
        decoding = dict(decode_budget=config.decode_budget, interval=config.interval)

    def extra(method: str) -> Dict:
        """The method's options beyond its name: the redundancy profile, the kvzap surrogate,
        decode-time budget."""
        chosen = dict(options if uses_redundancy(method) else {})
        if config.kvzap_weights and uses_kvzap(method):
            chosen["weights"] = config.kvzap_weights
        if method != FULL:
            chosen.update(decoding)
        return chosen

    def hf_results():
        """(i, j, result, prefill seconds), sample by sample: one prefill each, then ``full``
        (the fidelity reference, redone even when recorded) and every pending combination."""
        engine = Engine(em, window=config.window, mode=config.mode, shortcut=config.shortcut,
                        hidden_states=any(registry.needs_hidden_states(m)
                                          for m in config.methods))
        for i, sample in enumerate(samples):
            pending = [j for j in range(len(combos)) if key[i, j] not in done]
            if not pending:
                continue
            prefilled = engine.prefill(engine.prepare(sample))
            for j, combo in enumerate(combos):
                if j in pending or combo["method"] == FULL:
                    yield i, j, engine.run(prefilled, combo["method"], combo["budget"],
                                           combo["ratio"], **extra(combo["method"])), \
                        prefilled.seconds

    def vllm_results():
        """(i, j, result, None), combination by combination: one vLLM engine each, serving
        every pending sample as one batch (the prefill is inside the engine's steps)."""
        from .vllm_engine import VLLMEngine

        engine = VLLMEngine(em, window=config.window, mode=config.mode, dtype=config.dtype)
        for j, combo in enumerate(combos):
            todo = [i for i in range(len(samples)) if key[i, j] not in done]
            if todo:
                results = engine.run([engine.prepare(samples[i]) for i in todo], combo["method"],
                                     combo["budget"], combo["ratio"], **extra(combo["method"]))
                for i, result in zip(todo, results):
                    yield i, j, result, None

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=already, desc="mixkv.eval", unit="eval",
                   dynamic_ncols=True)
    prefill_seconds = eval_seconds = 0.0
    prefilled_samples = set()
    ran = 0
    with open(results_path, "a+b") as tail:  # a run killed mid-line left no newline: add it
        if tail.tell() > 0:
            tail.seek(-1, os.SEEK_END)
            if tail.read(1) != b"\n":
                tail.write(b"\n")
    with open(results_path, "a", encoding="utf-8") as sink:
        for i, j, result, prefill in (vllm_results() if config.engine == "vllm"
                                      else hf_results()):
            sample, combo = samples[i], combos[j]
            if prefill is not None and i not in prefilled_samples:
                prefilled_samples.add(i)
                prefill_seconds += prefill
            eval_seconds += result.seconds
            if key[i, j] in done:
                continue
            result = result.of_run(
                model=em.name, haystack=config.haystack_dir or config.haystack,
                prefill_seconds=prefill, seed=config.seed, length=sample.meta.get("length"),
                settings=planned[i, j], document=sample.meta.get("document"))
            sink.write(json.dumps(result.to_json()) + "\n")
            sink.flush()
            done.add(key[i, j])
            ran += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{sample.task} {combo['method']} "
                                    f"{combo['budget'] or combo['ratio'] or ''}".strip())
    if bar is not None:
        bar.close()
    results = [r for r in load_results(results_path) if record_key(r.settings) in wanted]
    # This invocation's seconds, and the recorded ones: a resumed run, or a rebuild that ran
    # nothing, would otherwise report its own few seconds as the cost of the whole table.
    prefills = {(r.sample_id, r.mode): r.prefill_seconds or 0.0 for r in results}
    timing = dict(total_seconds=time.perf_counter() - started, load_seconds=em.load_seconds,
                  prefill_seconds=prefill_seconds, eval_seconds=eval_seconds,
                  evaluations_run=ran,
                  recorded_prefill_seconds=sum(prefills.values()),
                  recorded_eval_seconds=sum(r.seconds for r in results))
    return write_reports([r.to_json() for r in results], out, config=config, em=em,
                         timing=timing)


def write_reports(records: List[Dict], out: Path, *, config: RunConfig, em=None,
                  timing: Optional[Dict] = None) -> Dict:
    """OUT/table.md, results.csv, plot.png, heatmap.png and summary.json of ``records`` (in
    their JSON form, :meth:`Result.to_json`); returns the summary, with the table's text as
    ``markdown``. Every table and its prose comes from :mod:`mixkv.eval.report`."""
    out.mkdir(parents=True, exist_ok=True)
    summary = report.summarize_run(records, seed=config.seed)
    title = run_title(config, em, mode=config.mode)
    layers = None
    if em is not None:
        from . import engine

        layers = engine.layers_left_alone(em.model)
    text = report.document(records, summary, title=title, continuation=config.continuation,
                           layers=layers)
    (out / "table.md").write_text(text, encoding="utf-8")
    report.write_csv(records, str(out / "results.csv"))
    if any(r["task"] == "all" for r in summary["rows"]):
        report.plot(summary, str(out / "plot.png"), title=title)
    stale = out / "heatmap.png"
    if not (records and report.heatmap(records, str(stale),
                                       title=report.HEATMAP_TITLE.format(title))) \
            and stale.exists():
        stale.unlink()   # an earlier run's heatmap would not describe these results
    payload = dict(config=dataclasses.asdict(config), summary=summary, timing=timing or {},
                   records=len(records),
                   model=dict(name=em.name, source=em.source, fixes=em.fixes,
                              stop_ids=em.stop_ids, adds_bos=em.adds_bos, chat=em.chat,
                              layers=layers) if em else None,
                   machine=dict(platform=platform.platform(), torch=torch.__version__,
                                threads=torch.get_num_threads(), cpus=os.cpu_count()))
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=str),
                                      encoding="utf-8")
    summary["markdown"] = text
    return summary


def write_side_by_side(summaries: Dict[str, Dict], out: Path, *, config: RunConfig,
                       em=None) -> Dict:
    """OUT/table.md, plot.png and summary.json comparing the regimes
    (:func:`report.side_by_side_document`); each regime's folder holds its own report."""
    title = run_title(config, em)
    text = report.side_by_side_document(summaries, title=title)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text, encoding="utf-8")
    report.plot_regimes(summaries, str(out / "plot.png"), title=title)
    payload = dict(config=dataclasses.asdict(config),
                   regimes={mode: dict(folder=mode, rows=summary["rows"],
                                       paired=summary["paired"],
                                       by_length=summary.get("by_length", {}))
                            for mode, summary in summaries.items()})
    (out / "summary.json").write_text(json.dumps(payload, indent=1, default=str),
                                      encoding="utf-8")
    return dict(regimes=summaries, markdown=text)
