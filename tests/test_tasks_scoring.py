"""Task files (JSONL, MileBench layout, the built-in suite) and the metrics, on hand-worked examples."""

from __future__ import annotations

import json

import pytest

from flowmm_edge.evaluation import scoring, tasks
from flowmm_edge.bindings.prompt import PromptError


def test_jsonl_loader_reports_bad_lines_and_keeps_the_rest(tmp_path):
    f = tmp_path / "t.jsonl"
    good = {"id": "a", "segments": [{"type": "text", "text": "hello", "modality": "image"}, {"type": "image", "path": "x.png"}],
            "question": "q?", "answers": ["1"], "metric": "exact", "extra": 5}
    f.write_text("\n".join([
        json.dumps(good),
        "{broken",
        json.dumps({**good, "id": "b", "metric": "bleu"}),
        json.dumps({**good, "id": "c", "answers": []}),
        json.dumps({**good, "id": "d", "metric": "choice", "choices": ["x"]}),
        "",
        json.dumps({**good, "id": "e", "metric": "choice", "choices": ["red", "blue"], "answers": ["B"]}),
    ]) + "\n")
    warnings = []
    got = tasks.load_tasks(f, warn=warnings.append)
    assert [t.id for t in got] == ["a", "e"]
    assert got[0].segments[0].modality == "image" and got[0].segments[1].image == tmp_path / "x.png"
    assert got[0].questions[0].metric == "exact" and got[1].questions[0].choices == ["red", "blue"]
    assert [w.split(":")[1] for w in warnings] == ["2", "3", "4", "5"]
    assert "not valid JSON" in warnings[0] and "metric 'bleu'" in warnings[1]
    assert "non-empty list" in warnings[2] and "at least two 'choices'" in warnings[3]
    with pytest.raises(PromptError, match="cannot read"):
        tasks.load_tasks(tmp_path / "missing.jsonl")


def test_milebench_layout(tmp_path):
    d = tmp_path / "DATA" / "ActionLocalization"
    (d / "images").mkdir(parents=True)
    data = {"meta_data": {}, "data": [
        {"sample_id": 7, "task_instance": {"context": "First {image#1} then {image#2} what happened?",
                                           "images_path": ["a.jpg", "b.jpg"], "choice_list": ["jump", "run"]},
         "response": "B"},
        {"sample_id": 8, "task_instance": {"context": "Describe {image#1}.", "images_path": ["a.jpg"]}, "response": "a cat"}]}
    (d / "ActionLocalization.json").write_text(json.dumps(data))
    got = tasks.load_milebench(tmp_path / "DATA")
    assert [t.id for t in got] == ["ActionLocalization/7", "ActionLocalization/8"]
    kinds = [(s.kind, s.text if s.kind == "text" else s.image.name) for s in got[0].segments]
    assert kinds == [("text", "First "), ("image", "a.jpg"), ("text", " then "), ("image", "b.jpg"), ("text", " what happened?")]
    q0, q1 = got[0].questions[0], got[1].questions[0]
    assert q0.metric == "choice" and "B. run" in q0.text and q1.metric == "rouge_l"
    with pytest.raises(PromptError, match="no MileBench task files"):
        tasks.load_milebench(tmp_path)


def test_builtin_suite_is_seeded_and_complete():
    a, b = tasks.builtin_suite((512,), 1, seed=3), tasks.builtin_suite((512,), 1, seed=3)
    assert [t.questions for t in a] == [t.questions for t in b]
    assert {t.kind for t in a} == {"fact-in-text", "fact-in-image", "multi-fact", "two-span"}
    for t in a:
        text = " ".join(s.text for s in t.segments)
        assert len(t.questions) == 1 and t.questions[0].answers[0] in text
    image_fact = next(t for t in a if t.kind == "fact-in-image")
    assert any(s.modality == "image" and image_fact.questions[0].answers[0] in s.text for s in image_fact.segments)


def test_jsonl_task_with_several_questions(tmp_path):
    f = tmp_path / "t.jsonl"
    seg = [{"type": "text", "text": "Ann is 4. Bo is 7."}]
    good = {"id": "q", "segments": seg, "questions": [
        {"question": "Ann?", "answers": ["4"]},
        {"question": "Both?", "answers": ["4", "7"], "metric": "all", "answer_prefix": " They are", "max_tokens": 9}]}
    f.write_text("\n".join(json.dumps(x) for x in [
        good,
        {**good, "id": "empty", "questions": []},
        {**good, "id": "long", "questions": [{"question": "x", "answers": ["1"], "max_tokens": 100000}]},
        {**good, "id": "prefix", "questions": [{"question": "x", "answers": ["1"], "answer_prefix": 3}]},
        {**good, "id": "inner", "questions": [{"question": "x", "answers": []}]},
        {**good, "id": "distract", "questions": [{"question": "x", "answers": ["1"], "distractors": "2"}]},
    ]) + "\n")
    warnings = []
    got = tasks.load_tasks(f, warn=warnings.append)
    assert [t.id for t in got] == ["q"]
    q = got[0].questions
    assert (q[0].text, q[0].metric, q[0].answer_prefix, q[0].max_tokens) == ("Ann?", "contains", "", tasks.DEFAULT_MAX_TOKENS)
    assert (q[1].answers, q[1].metric, q[1].answer_prefix, q[1].max_tokens) == (["4", "7"], "all", " They are", 9)
    assert "non-empty list" in warnings[0] and "'max_tokens' must be an integer" in warnings[1]
    assert "'answer_prefix' must be a string" in warnings[2] and "question 0: 'answers'" in warnings[3]
    assert "'distractors' must be a list" in warnings[4]


def test_scoring_on_hand_worked_examples():
    # normalisation: case, punctuation, articles, whitespace
    assert scoring.exact("The  Pacific Ocean.", ["pacific ocean"]) == 1.0
    assert scoring.exact("Pacific", ["pacific ocean"]) == 0.0
    assert scoring.contains("It is 48213, I think", ["48213"]) == 1.0
    assert scoring.contains("4821", ["48213"]) == 0.0
    # ROUGE-L: "cat sat on mat" vs "cat is on mat": LCS 3 (cat on mat); P = 3/4, R = 3/4 -> F1 0.75
    assert scoring.rouge_l("the cat sat on the mat", ["a cat is on a mat"]) == pytest.approx(0.75)
    # "police killed gunman" vs "police kill the gunman": LCS 2; P 2/3, R 2/3 -> 0.667
    assert scoring.rouge_l("police killed the gunman", ["police kill the gunman"]) == pytest.approx(2 / 3)
    assert scoring.rouge_l("nothing alike", ["cat"]) == 0.0
    # choice: a letter in several forms, or the option's text
    opts = ["red", "blue", "green"]
    for answer in ("B", "(B)", "B.", "B) blue", " b", "The answer is blue."):
        want = 0.0 if answer == " b" else 1.0
        assert scoring.choice(answer, ["B"], opts) == want, answer
    assert scoring.choice("red or blue", ["B"], opts) == 0.0  # ambiguous: no pick
    assert scoring.choice("green", ["green"], opts) == 1.0
    # all (RULER's string_match_all): the share of the golds the answer holds
    assert scoring.contains_all("They are 12, 7 and 99.", ["12", "99", "5", "7"]) == 0.75
    assert scoring.score("all", "ABCDE, FGHIJ", ["abcde", "fghij"]) == 1.0 and scoring.contains_all("", ["1"]) == 0.0
    # a distractor in the answer (another key's value) makes it wrong, whatever the metric
    assert scoring.score("contains", "12 or 7", ["12"], distractors=["7", "99"]) == 0.0
    assert scoring.score("contains", "12", ["12"], distractors=["7"]) == 1.0
    assert scoring.score("choice", "C", ["C"], opts) == 1.0 and scoring.score("contains", "x 1 y", ["1"]) == 1.0


def test_paired_interval_keeps_each_contexts_pair_together():
    # contexts far apart, each gaining exactly 0.5 per question: the paired difference is 0.5 in
    # every resample, where either run's own interval is wide
    a = [[0.0], [1.0], [0.0, 0.0], [1.0]]
    b = [[0.5], [1.5], [0.5, 0.5], [1.5]]
    assert scoring.paired_interval(a, b) == pytest.approx((0.5, 0.5, 0.5))
    lo, hi = scoring.context_interval(a)
    assert hi - lo > 0.5
    assert scoring.paired_interval(a, a) == (0.0, 0.0, 0.0)
    # two contexts, one gaining a whole answer: resamples give 0, 0.5 or 1 (probabilities 1/4, 1/2, 1/4)
    diff, lo, hi = scoring.paired_interval([[0.0], [0.0]], [[1.0], [0.0]])
    assert (diff, lo, hi) == (0.5, 0.0, 1.0)
    # means are over questions, not contexts: 3 of 4 questions gained, one context of three questions
    diff, _, _ = scoring.paired_interval([[0.0, 0.0, 0.0], [0.0]], [[1.0, 1.0, 1.0], [0.0]])
    assert diff == 0.75
    with pytest.raises(ValueError, match="same contexts"):
        scoring.paired_interval([[1.0]], [[1.0], [0.0]])
