"""The RULER-style families: seeded, as long as asked, and every gold answer recomputed from the
generated text by an independent reading of it (regular expressions, a word counter)."""

from __future__ import annotations

import collections
import re

import pytest

from flowmm_edge.evaluation import ruler_tasks


def _text(task) -> str:
    return "".join(s.text for s in task.segments)


def _words(text: str) -> int:
    return len(text.split())


def test_families_are_seeded_and_independent_of_each_other():
    a = ruler_tasks.generate(ruler_tasks.FAMILIES, (1024,), 2, seed=5)
    b = ruler_tasks.generate(ruler_tasks.FAMILIES, (1024,), 2, seed=5)
    assert [(t.id, _text(t), t.questions) for t in a] == [(t.id, _text(t), t.questions) for t in b]
    alone = ruler_tasks.generate(("multi-key",), (1024,), 2, seed=5)
    assert [_text(t) for t in alone] == [_text(t) for t in a if t.kind == "multi-key"]
    assert _text(ruler_tasks.generate(("single-number",), (1024,), 1, seed=6)[0]) != _text(a[0])
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        ruler_tasks.generate(("nope",))


@pytest.mark.parametrize("length", [1024, 4096])
def test_lengths_follow_the_callers_tokenizer(length):
    for t in ruler_tasks.generate(ruler_tasks.FAMILIES, (length,), 1, seed=1, count_tokens=_words):
        assert 0.85 * length <= _words(_text(t)) <= 1.1 * length, (t.id, _words(_text(t)))


def _needles(text: str) -> dict[str, list[str]]:
    out = collections.defaultdict(list)
    for key, value in re.findall(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.", text):
        out[key].append(value)
    return out


def test_needle_families_ask_for_what_the_text_holds():
    for t in ruler_tasks.generate(("single-number", "single-code", "multi-key", "multi-value", "multi-query"),
                                  (2048,), 3, seed=2):
        needles = _needles(_text(t))
        n_keys, n_values = {"multi-key": (4, 1), "multi-query": (4, 1), "multi-value": (1, 4)}.get(t.kind, (1, 1))
        assert len(needles) == n_keys and all(len(v) == n_values for v in needles.values()), t.id
        assert len(t.questions) == (2 if t.kind == "multi-key" else 1)
        for q in t.questions:
            asked = re.search(r"for (.+) mentioned", q.text).group(1).split(" and ")
            assert sorted(q.answers) == sorted(v for k in asked for v in needles[k])
            assert sorted(q.distractors) == sorted(v for k in needles if k not in asked for v in needles[k])
            assert len(asked) == (2 if t.kind == "multi-query" else 1)
            assert q.answer_prefix.startswith(" The special magic") and asked[-1] in q.answer_prefix
            assert q.metric == ("all" if t.kind in ("multi-value", "multi-query") else "contains")
        if t.kind == "single-code":
            assert re.fullmatch(r"\d\d-[A-Z]\d{3}", t.questions[0].answers[0])
        else:
            assert all(re.fullmatch(r"\d{7}", v) for vs in needles.values() for v in vs)
        if t.kind == "multi-key":
            assert t.questions[0].answers != t.questions[1].answers


def test_variable_tracking_answer_is_the_chain_that_reaches_the_value():
    for t in ruler_tasks.generate(("variable-tracking",), (2048,), 3, seed=3):
        text, q = _text(t), t.questions[0]
        value = re.search(r"assigned the value (\d+)", q.text).group(1)
        assigned = dict(re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", text))

        def resolve(name):
            v = assigned[name]
            return resolve(v[4:]) if v.startswith("VAR ") else v

        want = sorted(n for n in assigned if resolve(n) == value)
        assert len(want) == 5 and sorted(q.answers) == want and q.metric == "all"
        # the chain appears in assignment order, as RULER writes it
        assert [text.index(f"VAR {n} =") for n in q.answers] == sorted(text.index(f"VAR {n} =") for n in q.answers)


def test_common_words_answer_is_the_ten_most_frequent():
    for length in (2048, 8192):
        t = ruler_tasks.generate(("common-words",), (length,), 1, seed=4, count_tokens=_words)[0]
        entries = re.findall(r"(\d+)\. ([a-z]+)", _text(t))
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = collections.Counter(w for _, w in entries)
        top = counts.most_common()
        assert sorted(w for w, _ in top[:10]) == sorted(t.questions[0].answers)
        assert top[9][1] > top[10][1]  # no tie at the cut
        assert len(entries) > 0.5 * length / 2  # long lists really are long: made-up words fill them
        # the real words are whole words of the haystack's lists (made-up ones are three syllables)
        real = [w for w in counts if w in ruler_tasks._WORDS]
        assert all(re.search(rf"\b{w}\b", " ".join(ruler_tasks._OBJECTS + ruler_tasks._SUBJECTS + ruler_tasks._VERBS
                                                   + ruler_tasks._TAILS + ruler_tasks._KEY_ADJ + ruler_tasks._KEY_NOUN).lower())
                   for w in real) and len(real) > 20


def test_a_share_of_each_context_is_labelled_as_another_modality():
    tasks = ruler_tasks.generate(ruler_tasks.FAMILIES, (2048,), 2, seed=7)
    for t in tasks:
        image = [s for s in t.segments if s.modality == "image"]
        assert image and all(s.text.startswith("Picture: ") for s in image) and len(image) < len(t.segments)
    # some needles land in "image" spans
    assert any(s.modality == "image" and "special magic" in s.text for t in tasks for s in t.segments)


def test_near_records_differ_in_one_key_character_and_ask_for_one_of_them():
    (task,) = ruler_tasks.generate(["near-records"], [2048], 1, seed=3)
    text = "".join(s.text for s in task.segments)
    records = re.findall(r"Locker (\d[A-D]) in the north hall holds crate (\d+)\.", text)
    keys = [k for k, _ in records]
    assert len(records) == ruler_tasks.NR_RECORDS == len(set(keys))
    assert all(sum(a != b for a, b in zip(k, keys[0])) <= 2 for k in keys)  # neighbours: one or two characters
    (q,) = task.questions
    asked = re.search(r"locker (\d[A-D])", q.text).group(1)
    (gold,) = q.answers
    assert dict(records)[asked] == gold and text.count(gold) == 1
    assert sorted(q.distractors) == sorted(v for k, v in records if k != asked)
    assert q.score(f"crate {gold}.") == 1 and q.score(f"crate {q.distractors[0]}.") == 0
