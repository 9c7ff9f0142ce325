"""Evaluation samples: RULER-style synthetic tasks generated in-process, and LongBench JSONL files.

Synthetic tasks (Hsieh et al., "RULER", 2024; same needles, questions and answer prefixes):

=============  ==========================================================================
``passkey``     one 5-digit pass key in a repeated "noise" haystack
``niah_single`` one "special magic number" (7 digits) for a key, in an essay-like haystack
``niah_multikey`` the same with 3 distractor needles (other keys) around it
``niah_multivalue`` 4 numbers for the same key; all must be found (partial credit)
``vt``          variable tracking: one chain of 5 variables bound to a 5-digit value (all
                names must be found), statements spread over the noise haystack
``cwe``         common-word extraction: the 10 words that appear most often in a long list
=============  ==========================================================================

Each task is a :class:`Task` in ``TASKS`` (name -> how its samples are built, its metric and
answer length); each LongBench dataset a :class:`LongBenchTask` in ``LONGBENCH``.

Each :class:`Sample` holds a context (the document), a question, an answer prefix (the start of
the assistant's reply, as RULER does), the expected answers, the metric and the gold
continuation used for the fidelity metrics. Lengths are in tokens of the evaluated model's
prompt (chat template included): ``make_samples(..., length=1024, count_tokens=...)`` fills the
haystack until the whole prompt is as close to ``length`` tokens as the sentences allow, never
over. Everything is a function of ``(task, length, seed, index)``: the same arguments give the
same samples.

Haystacks: ``"essay"`` is a built-in generator of varied, digit-free filler sentences; ``"noise"``
is RULER's repeated "The grass is green..." text; ``--haystack-dir`` takes a folder of ``.txt``
files whose sentences are used in order, starting at a seeded offset.

LongBench: :func:`load_jsonl` reads LongBench-format JSONL (``context``, ``input``, ``answers``,
optional ``dataset``, ``all_classes``), with LongBench's prompt for the known datasets and its
metric (qa F1, rouge-L, classification, retrieval, count, code similarity, exact match).

Natural text (:func:`corpus_samples`, ``--corpus DIR`` or the built-in ``mixkv/eval/corpus``):
a document's first ``length`` tokens are compressed and its next tokens teacher-forced, for the
fidelity metrics on real prose (no question, no task score).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional

NIAH_VALUES = 4    # niah_multivalue's numbers for the key
VT_HOPS = 4        # vt's assignments after the first
CWE_WORDS = 10     # cwe's common words

# ---------------------------------------------------------------------------------------------
# Word lists (digit-free, lower case) for keys, the essay generator and common-word extraction.
_ADJECTIVES = """ancient bitter brave bright broad calm careful cheerful clever cold crimson
curious damp dark distant dusty eager early elegant empty faint famous fierce fragile fresh
gentle giant golden graceful grey hidden hollow honest humble icy jolly kind large lazy little
lively lonely loud lucky marble mellow mighty misty modest narrow noble odd pale patient plain
polite proud quiet rapid rare restless rough round rusty sacred scarlet secret shallow sharp
shiny silent silver simple sleepy slow small smooth soft solid sour spare steady sticky stormy
strange sturdy sudden sunny sweet swift tall tender thick thin tiny tired twisted vast velvet
violet warm weary wicked wild windy wise wooden young""".split()
_NOUNS = """anchor apple archive badge balloon banner barrel basket beacon bell bicycle blanket
bottle bracelet bridge bucket cabinet camera candle canoe canyon carpet castle cathedral cellar
chimney clock cloud compass cottage crystal curtain dagger desert diamond dragon drum eagle
engine falcon feather fence fiddle forest fountain garden glacier goblet hammer harbor harp
helmet hill island jacket jungle kettle ladder lantern library lighthouse magnet meadow mirror
monastery mountain needle oasis orchard palace parrot pebble pencil piano pillow planet pocket
pond quilt rabbit raven ribbon river rocket saddle sailboat scarf shadow shell shovel squirrel
statue stone stream tapestry teapot telescope temple thunder tiger tower trumpet tunnel turtle
umbrella valley violin volcano wagon wallet waterfall whistle window wizard""".split()
_VERBS = """admired arranged borrowed built carried chose cleaned collected copied described
discovered drew examined followed found gathered guarded hid imagined inspected kept left
measured mended moved noticed opened painted photographed planted polished praised prepared
protected questioned read remembered repaired sketched sold studied traded visited washed
watched""".split()
_PEOPLE = ["the baker", "the captain", "the carpenter", "the children", "the doctor",
           "the farmer", "the fisherman", "the gardener", "the historian", "the innkeeper",
           "the librarian", "the mayor", "the merchant", "the miller", "the musician",
           "the old sailor", "the painter", "the poet", "the potter", "the scholar",
           "the shepherd", "the student", "the tailor", "the teacher", "the traveler",
           "the weaver"]
_PLACES = """near the river, behind the old mill, at the edge of the forest, in the quiet
village, beside the harbor, under the stone bridge, on the windy hill, inside the great hall,
along the narrow road, across the valley, by the market square, beyond the orchard, in the
dusty attic, at the top of the tower, next to the fountain""".split(",")
_PLACES = [p.strip().replace("\n", " ") for p in _PLACES]
_TIMES = """every morning, late in the autumn, during the long winter, after the storm, before
the festival, at dawn, in the evening, on a rainy afternoon, once a year, for many seasons,
early in the spring, when the bells rang""".split(",")
_TIMES = [t.strip().replace("\n", " ") for t in _TIMES]
_REFLECTIONS = [
    "Nobody could say exactly why it mattered so much.",
    "It was the kind of work that rewards patience more than talent.",
    "Most visitors never noticed the difference.",
    "The story was told again whenever travelers arrived.",
    "Some said it was only a habit, others called it a tradition.",
    "In the end, the small details turned out to be the important ones.",
    "There was always more to learn than anyone expected.",
    "The town remembered it long after the season had changed.",
    "It is easy to overlook what happens slowly.",
    "Good tools, it turned out, were worth the trouble of keeping.",
]
_NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again.")


def _essay_sentence(rng: random.Random) -> str:
    """One digit-free filler sentence from the built-in grammar."""
    kind = rng.random()
    person, verb = rng.choice(_PEOPLE), rng.choice(_VERBS)
    thing = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    if kind < 0.45:
        text = f"{person} {verb} {thing} {rng.choice(_PLACES)}."
    elif kind < 0.75:
        text = f"{rng.choice(_TIMES)}, {person} {verb} {thing}."
    elif kind < 0.9:
        other = f"a {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        text = f"{thing} {rng.choice(_PLACES)} looked like {other}."
    else:
        return rng.choice(_REFLECTIONS)
    return text[0].upper() + text[1:]


class Haystack:
    """An endless, deterministic source of filler sentences."""

    def __init__(self, kind: str = "essay", directory: Optional[str] = None):
        self.kind, self.directory = kind, directory
        self._sentences: Optional[List[str]] = None
        if directory is not None:
            files = sorted(Path(directory).glob("**/*.txt"))
            text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
            sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
            self._sentences = [s for s in sentences if s]
            if not self._sentences:
                raise ValueError(f"mixkv.eval: --haystack-dir {directory} has no .txt text")
            self.kind = "dir"
        elif kind not in ("essay", "noise"):
            raise ValueError(f"mixkv.eval: unknown haystack {kind!r} (essay, noise or a folder)")

    def sentences(self, rng: random.Random, count: int) -> List[str]:
        if self._sentences is not None:
            start = rng.randrange(len(self._sentences))
            return [self._sentences[(start + i) % len(self._sentences)] for i in range(count)]
        if self.kind == "noise":
            return [_NOISE] * count
        return [_essay_sentence(rng) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sample:
    """One evaluation item. The prompt is ``instruction + context + question`` in the user turn,
    and the assistant turn starts with ``answer_prefix``; ``target`` is the gold continuation of
    the answer prefix (teacher-forced for the fidelity metrics)."""

    id: str
    task: str
    context: str
    question: str
    answers: List[str]
    metric: str = "contains_all"
    instruction: str = ""
    answer_prefix: str = ""
    target: str = ""
    max_new_tokens: int = 16
    separator: str = "\n\n"         # between the context and the question
    meta: Dict = dataclasses.field(default_factory=dict)

    def user_parts(self):
        """(text before the question, the question): the query-agnostic split of the user turn."""
        head = (self.instruction + "\n\n" if self.instruction else "") + self.context
        return head + self.separator, self.question

    def to_json(self) -> Dict:
        return dataclasses.asdict(self)


def _seed(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _key(rng: random.Random, taken=()) -> str:
    while True:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in taken:
            return key


def _variable(rng: random.Random, taken=()) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in taken:
            return name


# Each builder returns the fixed parts of a sample: (instruction, needles, question,
# answer_prefix, answers, target, haystack kind, meta); its Task (TASKS) the metric and the
# answer length.
def _passkey(rng):
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return dict(instruction="There is an important info hidden inside a lot of irrelevant text. "
                            "Find it and memorize it. I will quiz you about the important "
                            "information there.",
                needles=[needle], question="What is the pass key?",
                answer_prefix="The pass key is", answers=[key], target=f" {key}.",
                haystack="noise")


_NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure "
                     "to memorize them. I will quiz you about the numbers afterwards.")


def _niah_single(rng):
    key, value = _key(rng), _number(rng, 7)
    return dict(instruction=_NIAH_INSTRUCTION,
                needles=[f"One of the special magic numbers for {key} is: {value}."],
                question=f"What is the special magic number for {key} mentioned in the provided "
                         "text?",
                answer_prefix=f"The special magic number for {key} mentioned in the provided "
                              "text is",
                answers=[value], target=f" {value}.", haystack="essay",
                meta=dict(key=key))


def _niah_multikey(rng, distractors: int = 3):
    keys = []
    for _ in range(distractors + 1):
        keys.append(_key(rng, keys))
    values = [_number(rng, 7) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    return dict(instruction=_NIAH_INSTRUCTION, needles=needles,
                question=f"What is the special magic number for {keys[0]} mentioned in the "
                         "provided text?",
                answer_prefix=f"The special magic number for {keys[0]} mentioned in the "
                              "provided text is",
                answers=[values[0]], target=f" {values[0]}.",
                haystack="essay", meta=dict(key=keys[0], distractors=keys[1:]),
                forbidden=values[1:])


def _niah_multivalue(rng, values: int = NIAH_VALUES):
    key = _key(rng)
    numbers = []
    while len(numbers) < values:
        n = _number(rng, 7)
        if n not in numbers:
            numbers.append(n)
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in numbers]
    return dict(instruction=_NIAH_INSTRUCTION, needles=needles,
                question=f"What are all the special magic numbers for {key} mentioned in the "
                         "provided text?",
                answer_prefix=f"The special magic numbers for {key} mentioned in the provided "
                              "text are",
                answers=numbers, target=" " + ", ".join(numbers) + ".",
                haystack="essay", meta=dict(key=key))


def _vt(rng, hops: int = VT_HOPS):
    value = _number(rng, 5)
    names = []
    for _ in range(hops + 1):
        names.append(_variable(rng, names))
    needles = [f"VAR {names[0]} = {value}."] + \
        [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    return dict(instruction="Memorize and track the chain(s) of variable assignment hidden in "
                            "the following text.",
                needles=needles,
                question=f"Question: Find all variables that are assigned the value {value} in "
                         "the text above.",
                answer_prefix=f"Answer: According to the chain(s) of variable assignment in the "
                              f"text above, {hops + 1} variables are assigned the value {value}, "
                              "they are:",
                answers=names, target=" " + " ".join(names),
                haystack="noise", ordered_needles=True)


def _fit(build: Callable[[int], str], count_tokens: Callable[[str], int], length: int,
         upper: int) -> int:
    """The largest n in [0, upper] with count_tokens(build(n)) <= length (build grows with n)."""
    lo, hi = 0, upper
    if count_tokens(build(hi)) <= length:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _make_needle_sample(task: "Task", index: int, seed: int, length: int,
                        count_tokens: Callable[[str], int], haystack: Optional[Haystack],
                        depth: Optional[float]) -> Sample:
    rng = random.Random(_seed(task.name, length, seed, index))
    spec = task.spec(rng)
    hay = haystack if haystack is not None else Haystack(spec["haystack"])
    # Generous pool of filler sentences, then the largest prefix of it that fits.
    pool = hay.sentences(rng, max(64, length // 3))
    depth = rng.random() if depth is None else depth
    needles = list(spec["needles"])
    ordered = spec.get("ordered_needles", False)
    if not ordered:
        rng.shuffle(needles)
    needle_depths = ([depth] if len(needles) == 1 else
                     sorted(rng.random() for _ in needles) if not ordered else
                     [(i + 0.5) / len(needles) for i in range(len(needles))])
    if len(needles) > 1 and not ordered:
        needle_depths[0] = depth

    def build(n: int) -> str:
        sentences = list(pool[:n])
        # insert from the deepest so earlier insertion points stay valid
        for needle, d in sorted(zip(needles, needle_depths), key=lambda x: -x[1]):
            sentences.insert(int(round(d * len(sentences))), needle)
        return " ".join(sentences)

    def prompt(n: int) -> str:
        head, question = _sample(n).user_parts()
        return head + question + " " + spec["answer_prefix"]

    def _sample(n: int) -> Sample:
        return Sample(id=f"{task.name}-{length}-{seed}-{index}", task=task.name,
                      context=build(n), question=spec["question"],
                      answers=list(spec["answers"]), metric=task.metric,
                      instruction=spec["instruction"], answer_prefix=spec["answer_prefix"],
                      target=spec["target"], max_new_tokens=task.max_new_tokens,
                      meta=dict(spec.get("meta", {}), depth=round(depth, 4), length=length,
                                seed=seed, index=index, haystack=hay.kind,
                                forbidden=spec.get("forbidden", [])))

    while count_tokens(prompt(len(pool))) <= length:  # the pool was too small: grow it
        pool += hay.sentences(rng, len(pool))
    n = _fit(prompt, count_tokens, length, len(pool))
    sample = _sample(n)
    sample.meta["filler_sentences"] = n
    return sample


def _make_cwe_sample(task: "Task", index: int, seed: int, length: int,
                     count_tokens: Callable[[str], int], common: int = CWE_WORDS,
                     freq_common: int = 30, freq_rare: int = 3) -> Sample:
    rng = random.Random(_seed("cwe", length, seed, index))
    words = rng.sample(sorted(set(_NOUNS) | set(_ADJECTIVES)), len(set(_NOUNS) | set(_ADJECTIVES)))
    common_words, rare_pool = words[:common], words[common:]
    prefix = f"Answer: The top {common} words that appear most often in the list are:"
    question = (f"Question: What are the {common} most common words in the above list?")
    instruction = ("Below is a numbered list of words. In these words, some appear more often "
                   "than others. Memorize the ones that appear most often.")

    def build(n_rare: int, freq: int) -> str:
        local = random.Random(_seed("cwe-order", length, seed, index, n_rare, freq))
        items = [w for w in common_words for _ in range(freq)] + \
            [w for w in rare_pool[:n_rare] for _ in range(freq_rare)]
        local.shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    def prompt(text: str) -> str:
        return f"{instruction}\n\n{text}\n\n{question} {prefix}"

    # Common words take at most half the prompt: lower their frequency for short contexts.
    freq = freq_common
    while freq > freq_rare + 2 and count_tokens(prompt(build(0, freq))) > length // 2:
        freq -= 1
    n_rare = _fit(lambda n: prompt(build(n, freq)), count_tokens, length, len(rare_pool))
    context = build(n_rare, freq)
    return Sample(id=f"{task.name}-{length}-{seed}-{index}", task=task.name, context=context,
                  question=question, answers=common_words, metric=task.metric,
                  instruction=instruction, answer_prefix=prefix,
                  target=" " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(common_words)),
                  max_new_tokens=task.max_new_tokens,
                  meta=dict(length=length, seed=seed, index=index, freq_common=freq,
                            freq_rare=freq_rare, rare_words=n_rare))


@dataclasses.dataclass(frozen=True)
class Task:
    """One synthetic task: how its samples are built, scored and how long an answer may be.

    ``spec(rng)`` gives a needle task's fixed parts (instruction, needles, question, answer
    prefix, answers, target, haystack kind, meta), placed in a haystack by depth; ``make``
    (cwe) builds a whole sample instead."""

    name: str
    metric: str
    max_new_tokens: int
    spec: Optional[Callable[[random.Random], Dict]] = None
    make: Optional[Callable[..., Sample]] = None

    def samples(self, n: int, *, length: int, seed: int = 0,
                count_tokens: Optional[Callable[[str], int]] = None,
                haystack: Optional[Haystack] = None) -> List[Sample]:
        """``n`` samples whose prompts count at most ``length`` tokens (``make_samples``)."""
        count = count_tokens or (lambda text: len(text.split()))
        if self.make is not None:
            return [self.make(self, i, seed, length, count) for i in range(n)]
        samples = []
        for i in range(n):
            jitter = random.Random(_seed("depth", self.name, seed, i)).random()
            samples.append(_make_needle_sample(self, i, seed, length, count, haystack,
                                               (i + jitter) / n))
        return samples


# The answer lengths leave room for every answer and its separators (cwe: "1. word" each).
TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("passkey", "contains_all", 10, spec=_passkey),
    Task("niah_single", "contains_all", 12, spec=_niah_single),
    Task("niah_multikey", "contains_all", 12, spec=_niah_multikey),
    Task("niah_multivalue", "contains_all", 12 * NIAH_VALUES + 10, spec=_niah_multivalue),
    Task("vt", "contains_all", 6 * (VT_HOPS + 1) + 4, spec=_vt),
    Task("cwe", "contains_all", 4 * CWE_WORDS + 6, make=_make_cwe_sample),
)}


def make_samples(task: str, n: int, *, length: int, seed: int = 0,
                 count_tokens: Optional[Callable[[str], int]] = None,
                 haystack: Optional[Haystack] = None) -> List[Sample]:
    """``n`` samples of ``task`` whose prompts count at most ``length`` tokens.

    ``count_tokens(text)`` measures a user-turn text as the model will see it (chat template
    included); the default counts whitespace-separated words. Needle depths are spread evenly
    over [0, 1] across the ``n`` samples (jittered by the seed)."""
    if task not in TASKS:
        raise ValueError(f"mixkv.eval: unknown task {task!r}; choose from {', '.join(TASKS)}")
    return TASKS[task].samples(n, length=length, seed=seed, count_tokens=count_tokens,
                               haystack=haystack)


# ---------------------------------------------------------------------------------------------
# LongBench (Bai et al., 2023): prompts and metrics of the official repository for its datasets.
_LONGBENCH_PROMPTS = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a "
                   "question. Answer the question asconcisely as you can, using a single phrase "
                   "if possible. Do not provide any explanation.\n\nStory: {context}\n\nNow, "
                   "answer the question based on the story asconcisely as you can, using a "
                   "single phrase if possible. Do not provide any explanation.\n\nQuestion: "
                   "{input}\n\nAnswer:",
    "qasper": "You are given a scientific article and a question. Answer the question as "
              "concisely as you can, using a single phrase or sentence if possible. If the "
              "question cannot be answered based on the information in the article, write "
              "\"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
              "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer "
              "the question based on the above article as concisely as you can, using a single "
              "phrase or sentence if possible. If the question cannot be answered based on the "
              "information in the article, write \"unanswerable\". If the question is a yes/no "
              "question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.\n\nQuestion: {input}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer "
                       "the following question based on the above text, only give me the "
                       "answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    "hotpotqa": "Answer the question based on the given passages. Only give me the answer and do "
                "not output any other words.\n\nThe following are given passages.\n{context}\n\n"
                "Answer the question based on the given passages. Only give me the answer and do "
                "not output any other words.\n\nQuestion: {input}\nAnswer:",
    "gov_report": "You are given a report by a government agency. Write a one-page summary of "
                  "the report.\n\nReport:\n{context}\n\nNow, write a one-page summary of the "
                  "report.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of "
            "questions.\n\n{context}\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be "
                     "duplicates. Please carefully read these paragraphs and determine how many "
                     "unique paragraphs there are after removing duplicates. In other words, how "
                     "many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease "
                     "enter the final count of unique paragraphs after removing duplicates. The "
                     "output format should only contain the number, such as 1, 2, 3, and so on."
                     "\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. "
                            "Please determine which paragraph the abstract is from.\n\n{context}"
                            "\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
                            "number of the paragraph that the abstract is from. The answer format "
                            "must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\nThe answer "
                            "is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
}
for _name in ("2wikimqa", "musique"):
    _LONGBENCH_PROMPTS[_name] = _LONGBENCH_PROMPTS["hotpotqa"]
for _name in ("qmsum", "multi_news", "samsum", "triviaqa"):
    _LONGBENCH_PROMPTS.setdefault(_name, "{context}\n\n{input}")
_LONGBENCH_PROMPTS["repobench-p"] = "Please complete the code given below. \n{context}{input}" \
                                    "Next line of code:\n"
_GENERIC_PROMPT = ("Read the following text and answer briefly.\n\n{context}\n\nNow, answer the "
                   "following question based on the above text, only give me the answer and do "
                   "not output any other words.\n\nQuestion: {input}\nAnswer:")


@dataclasses.dataclass(frozen=True)
class LongBenchTask:
    """A LongBench dataset: its official prompt template (``{context}``, ``{input}``), metric
    and answer length."""

    name: str
    prompt: str
    metric: str
    max_new_tokens: int


# (dataset, metric, answer tokens), as the official repository's config
LONGBENCH: Dict[str, LongBenchTask] = {
    name: LongBenchTask(name, _LONGBENCH_PROMPTS[name], metric, answer)
    for name, metric, answer in (
    ("narrativeqa", "qa_f1", 128), ("qasper", "qa_f1", 128), ("multifieldqa_en", "qa_f1", 64),
    ("hotpotqa", "qa_f1", 32), ("2wikimqa", "qa_f1", 32), ("musique", "qa_f1", 32),
    ("triviaqa", "qa_f1", 32), ("gov_report", "rouge_l", 512), ("qmsum", "rouge_l", 512),
    ("multi_news", "rouge_l", 512), ("samsum", "rouge_l", 128), ("trec", "classification", 64),
    ("passage_retrieval_en", "retrieval", 32), ("passage_count", "count", 32),
    ("lcc", "code_sim", 64), ("repobench-p", "code_sim", 64))}
GENERIC_LONGBENCH = LongBenchTask("generic", _GENERIC_PROMPT, "qa_f1", 32)  # other datasets

_REPLACED = {"TASK_BUILDERS": "TASKS[name] (Task objects: spec, metric, max_new_tokens)",
             "LONGBENCH_PROMPTS": "LONGBENCH[name].prompt",
             "LONGBENCH_METRICS": "LONGBENCH[name].metric",
             "LONGBENCH_MAX_NEW": "LONGBENCH[name].max_new_tokens"}


def __getattr__(name: str):
    if name in _REPLACED:
        raise AttributeError(f"mixkv.eval.tasks.{name} was replaced by {_REPLACED[name]}")
    raise AttributeError(f"module 'mixkv.eval.tasks' has no attribute {name!r}")


def _truncate_middle(text: str, limit: int, count_tokens: Callable[[str], int]) -> str:
    """LongBench's truncation: keep the first and last halves when the text is too long
    (approximated on characters, refined until the token count fits)."""
    if count_tokens(text) <= limit:
        return text
    keep = len(text)
    while keep > 0:
        keep = int(keep * 0.9)
        candidate = text[: keep // 2] + text[len(text) - keep // 2:]
        if count_tokens(candidate) <= limit:
            return candidate
    return ""


def load_jsonl(path: str, *, limit: Optional[int] = None, length: Optional[int] = None,
               count_tokens: Optional[Callable[[str], int]] = None,
               metric: Optional[str] = None, max_new_tokens: Optional[int] = None,
               dataset: Optional[str] = None) -> List[Sample]:
    """Samples from a LongBench-format JSONL file (one JSON object per line with ``context``,
    ``input``, ``answers``; ``dataset`` picks the official prompt and metric). Contexts longer
    than ``length`` tokens are truncated in the middle, as LongBench does."""
    samples = []
    with open(path, encoding="utf-8") as handle:
        for i, line in enumerate(handle):
            if not line.strip():
                continue
            if limit is not None and len(samples) >= limit:
                break
            row = json.loads(line)
            missing = [k for k in ("context", "answers") if k not in row]
            if missing:
                raise ValueError(f"mixkv.eval: {path}:{i + 1} lacks field(s) {missing} "
                                 "(LongBench format: context, input, answers)")
            name = dataset or row.get("dataset") or Path(path).stem.replace("_e", "")
            task = LONGBENCH.get(name, GENERIC_LONGBENCH)
            template = task.prompt
            answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
            answers = [str(a) for a in answers]
            context = row["context"]
            if length is not None:
                count = count_tokens or (lambda text: len(text.split()))
                overhead = count(template.format(context="", input=row.get("input", "")))
                context = _truncate_middle(context, max(0, length - overhead), count)
            # Split the filled template at the context: the part after it is the "question".
            before, after = template.split("{context}")
            samples.append(Sample(
                id=str(row.get("_id", f"{Path(path).stem}-{i}")), task=name,
                context=before + context, question=after.format(input=row.get("input", "")),
                answers=answers, metric=metric or task.metric,
                instruction="", answer_prefix="", target=" " + answers[0] if answers else "",
                max_new_tokens=max_new_tokens or task.max_new_tokens, separator="",
                meta=dict(dataset=name, all_classes=row.get("all_classes"), line=i + 1)))
    return samples


# ---------------------------------------------------------------------------------------------
# Natural text: fidelity of the continuation of real documents after compressing their prefix.
BUILTIN_CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_TASK = "corpus"
DEFAULT_CONTINUATION = 128


def corpus_files(directory: Optional[str] = None) -> List[Path]:
    """The ``.txt`` documents of ``directory`` (recursively, sorted), or of the built-in corpus
    (``None`` or ``"builtin"``: a few original essays and stories written for mixkv)."""
    folder = BUILTIN_CORPUS if directory in (None, "builtin") else Path(directory).expanduser()
    files = sorted(folder.glob("**/*.txt"))
    if not files:
        raise ValueError(f"mixkv.eval: --corpus {folder} has no .txt documents")
    return files


def _largest(count: int, fits: Callable[[int], bool]) -> int:
    """The largest k in [0, count] with fits(k), for a predicate that holds up to some k."""
    low, high = 0, count
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def corpus_samples(directory: Optional[str], *, length: int,
                   count_tokens: Callable[[str], int], bos: int = 0,
                   continuation: int = DEFAULT_CONTINUATION, passages: int = 1) -> List[Sample]:
    """Up to ``passages`` samples per document of the corpus, consecutive and non-overlapping:
    a passage's first ``length`` tokens (``count_tokens`` of the raw text, plus ``bos`` for a
    prepended BOS) are the prefix that gets compressed, and the next ``continuation`` tokens
    are teacher-forced after it: the fidelity metrics (KL, top-1 agreement, NLL difference
    against the full cache) are those of the continuation of natural text. The next passage
    starts where that continuation ended. Both parts are cut at word boundaries (the
    continuation keeps its leading whitespace), never over the token counts. The prompt is the
    raw text (no chat template, no question); a passage without room for the prefix and at least
    half the continuation gives no sample, and ends that document.
    The task score is not defined (metric ``"none"``): these rows report fidelity only."""
    samples = []
    for path in corpus_files(directory):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        pieces = re.findall(r"\s*\S+", text)
        for passage in range(1, passages + 1):
            k = _largest(len(pieces), lambda n: bos + count_tokens("".join(pieces[:n]).lstrip())
                         <= length)
            rest = pieces[k:]
            m = _largest(len(rest), lambda n: count_tokens("".join(rest[:n])) <= continuation)
            prefix, target = "".join(pieces[:k]).lstrip(), "".join(rest[:m])
            if k == len(pieces) or count_tokens(target) < continuation // 2 or \
                    bos + count_tokens(prefix) < length - 64:
                break
            suffix = "" if passage == 1 else f"-{passage}"  # the first keeps its old id
            samples.append(Sample(
                id=f"{CORPUS_TASK}-{path.stem}-{length}{suffix}", task=CORPUS_TASK,
                context=prefix, question="", answers=[], metric="none", target=target,
                max_new_tokens=1, separator="",
                meta=dict(raw=True, document=path.name, passage=passage, length=length,
                          continuation=continuation)))
            pieces = rest[m:]
    return samples
