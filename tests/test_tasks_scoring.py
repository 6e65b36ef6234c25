"""Task files (JSONL, MileBench layout, the built-in suite) and the metrics, on hand-worked examples."""

from __future__ import annotations

import json

import pytest

from flowmm_edge import scoring, tasks
from flowmm_edge.prompt import PromptError


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
    assert got[0].metric == "exact" and got[1].choices == ["red", "blue"]
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
    assert got[0].metric == "choice" and "B. run" in got[0].question and got[1].metric == "rouge_l"
    with pytest.raises(PromptError, match="no MileBench task files"):
        tasks.load_milebench(tmp_path)


def test_builtin_suite_is_seeded_and_complete():
    a, b = tasks.builtin_suite((512,), 1, seed=3), tasks.builtin_suite((512,), 1, seed=3)
    assert [t.answers for t in a] == [t.answers for t in b]
    assert {t.kind for t in a} == {"fact-in-text", "fact-in-image", "multi-fact", "two-span"}
    for t in a:
        text = " ".join(s.text for s in t.segments)
        assert t.answers[0] in text
    image_fact = next(t for t in a if t.kind == "fact-in-image")
    assert any(s.modality == "image" and image_fact.answers[0] in s.text for s in image_fact.segments)


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
    assert scoring.score("choice", "C", ["C"], opts) == 1.0 and scoring.score("contains", "x 1 y", ["1"]) == 1.0
