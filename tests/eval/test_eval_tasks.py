"""Task generation: the answers are really in the context, seeds reproduce, lengths are respected,
needles spread over depths, haystack folders and LongBench JSONL files load."""

import collections
import json
import re

import pytest

from mixkv.eval.tasks import TASKS, Haystack, load_jsonl, make_samples


def words(text):
    return len(text.split())


def prompt_of(sample):
    head, question = sample.user_parts()
    return head + question + " " + sample.answer_prefix


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_in_the_context_and_not_in_the_question(task):
    for sample in make_samples(task, 4, length=400, seed=3):
        assert sample.answers and sample.task == task
        for answer in sample.answers:
            assert answer in sample.context, (task, answer)
            if task != "vt":  # vt's question names the value, its answers are variable names
                assert answer not in sample.question + sample.answer_prefix
        for answer in sample.answers:  # the gold continuation holds every answer
            assert answer in sample.target


@pytest.mark.parametrize("task", TASKS)
def test_seeds_reproduce_and_differ(task):
    a = [s.to_json() for s in make_samples(task, 3, length=300, seed=7)]
    b = [s.to_json() for s in make_samples(task, 3, length=300, seed=7)]
    c = [s.to_json() for s in make_samples(task, 3, length=300, seed=8)]
    assert a == b
    assert [s["answers"] for s in a] != [s["answers"] for s in c]
    assert len({s["id"] for s in a}) == 3


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [256, 1000])
def test_prompt_fills_the_length_without_exceeding_it(task, length):
    for sample in make_samples(task, 2, length=length, seed=0, count_tokens=words):
        n = words(prompt_of(sample))
        assert n <= length
        assert n >= length * 0.9, (task, n)


def test_needle_is_unique_and_depths_spread():
    samples = make_samples("niah_single", 5, length=600, seed=1)
    depths = [s.meta["depth"] for s in samples]
    assert depths == sorted(depths) and depths[0] < 0.2 and depths[-1] > 0.8
    for s in samples:
        assert s.context.count(s.answers[0]) == 1
        assert not re.search(r"\d", s.context.replace(s.answers[0], ""))  # filler is digit-free
        position = s.context.index(s.answers[0]) / len(s.context)
        assert abs(position - s.meta["depth"]) < 0.1


def test_multikey_distractors_and_multivalue_values():
    for s in make_samples("niah_multikey", 3, length=500, seed=2):
        assert len(s.meta["forbidden"]) == 3
        for key, value in zip(s.meta["distractors"], s.meta["forbidden"]):
            assert f"for {key} is: {value}." in s.context and value != s.answers[0]
        assert s.meta["key"] in s.question
    for s in make_samples("niah_multivalue", 3, length=500, seed=2):
        assert len(set(s.answers)) == 4
        assert all(f"for {s.meta['key']} is: {v}." in s.context for v in s.answers)


def test_variable_tracking_chain_is_in_order():
    for s in make_samples("vt", 3, length=500, seed=4):
        names = s.answers
        value = re.search(r"value (\d+)", s.question).group(1)
        positions = [s.context.index(f"VAR {names[0]} = {value}.")]
        for a, b in zip(names, names[1:]):
            positions.append(s.context.index(f"VAR {b} = VAR {a}."))
        assert positions == sorted(positions)


def test_common_words_are_the_most_common():
    for s in make_samples("cwe", 2, length=800, seed=5):
        counts = collections.Counter(re.findall(r"\d+\. (\S+)", s.context))
        top = {w for w, _ in counts.most_common(len(s.answers))}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) > max(
            c for w, c in counts.items() if w not in s.answers)


def test_haystack_dir_and_kinds(tmp_path):
    (tmp_path / "a.txt").write_text("Alpha sentence one. Beta sentence two! Gamma three?")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Delta four. Epsilon five.")
    hay = Haystack(directory=str(tmp_path))
    s = make_samples("niah_single", 1, length=200, seed=0, haystack=hay)[0]
    assert "sentence" in s.context and s.meta["haystack"] == "dir" and s.answers[0] in s.context
    noise = make_samples("niah_single", 1, length=200, seed=0, haystack=Haystack("noise"))[0]
    assert "The grass is green." in noise.context
    with pytest.raises(ValueError, match="unknown haystack"):
        Haystack("poetry")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        Haystack(directory=str(empty))
    with pytest.raises(ValueError, match="unknown task"):
        make_samples("qa", 1, length=100)


def test_query_agnostic_split_keeps_the_question_out_of_the_context():
    s = make_samples("niah_single", 1, length=300, seed=0)[0]
    head, question = s.user_parts()
    assert question == s.question and question not in head and "?" not in head
    assert head.endswith("\n\n") and head.startswith(s.instruction)


def test_longbench_jsonl(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    rows = [dict(context="Paris is the capital of France. " * 50, input="Capital of France?",
                 answers=["Paris"], dataset="hotpotqa", _id="q1"),
            dict(context="Short.", input="What?", answers="yes", dataset="trec",
                 all_classes=["yes", "no"])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = load_jsonl(str(path))
    assert [s.id for s in samples] == ["q1", "hotpotqa-1"]
    first = samples[0]
    assert first.metric == "qa_f1" and first.answers == ["Paris"] and first.max_new_tokens == 32
    assert first.context.startswith("Answer the question based on the given passages")
    assert "Question: Capital of France?" in first.question and first.separator == ""
    assert samples[1].metric == "classification" and samples[1].meta["all_classes"] == ["yes", "no"]
    short = load_jsonl(str(path), length=120, count_tokens=words, limit=1)
    assert len(short) == 1 and words(short[0].context + short[0].question) <= 120
    assert short[0].context.endswith("France. ") or "Paris" in short[0].context
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(input="x")) + "\n")
    with pytest.raises(ValueError, match="lacks field"):
        load_jsonl(str(bad))


def test_each_task_object_owns_its_metric_and_answer_length(monkeypatch):
    from mixkv.eval import tasks

    for name, task in TASKS.items():
        assert isinstance(task, tasks.Task) and task.name == name
        for sample in task.samples(2, length=300, seed=1):
            assert (sample.metric, sample.max_new_tokens) == (task.metric, task.max_new_tokens)
            # every answer fits the answer length (a token per character is the worst case
            # of these tasks' words and digits, plus one separator each)
            assert sum(len(a) // 3 + 2 for a in sample.answers) <= task.max_new_tokens, name
    # a task added to the registry is a task like the others
    mine = tasks.Task("mine", "contains_any", 7, spec=tasks.TASKS["niah_single"].spec)
    monkeypatch.setitem(tasks.TASKS, "mine", mine)
    sample = make_samples("mine", 1, length=300)[0]
    assert (sample.task, sample.metric, sample.max_new_tokens) == ("mine", "contains_any", 7)
    with pytest.raises(ValueError, match="unknown task 'nope'; choose from passkey"):
        make_samples("nope", 1, length=300)


@pytest.mark.parametrize("old, new", [("TASK_BUILDERS", "TASKS[name]"),
                                      ("LONGBENCH_METRICS", "LONGBENCH[name].metric")])
def test_replaced_names_say_what_replaced_them(old, new):
    from mixkv.eval import tasks

    with pytest.raises(AttributeError, match=re.escape(f"tasks.{old} was replaced by {new}")):
        getattr(tasks, old)


def test_longbench_tasks_give_their_prompt_metric_and_length(tmp_path):
    from mixkv.eval.tasks import GENERIC_LONGBENCH, LONGBENCH

    row = json.dumps(dict(context="word " * 40, input="Who?", answers=["Ann"]))
    for name in ("hotpotqa", "gov_report", "elsewhere"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(row + "\n")
        sample = load_jsonl(str(path))[0]
        task = LONGBENCH.get(name, GENERIC_LONGBENCH)
        assert (sample.metric, sample.max_new_tokens) == (task.metric, task.max_new_tokens)
        assert sample.context.startswith(task.prompt.split("{context}")[0])
    assert LONGBENCH["gov_report"].metric == "rouge_l" and GENERIC_LONGBENCH.metric == "qa_f1"
