"""The image families (flowmm_edge/evaluation/image_tasks.py): the answer is in a page image and
nowhere in the text, and the eval reads it through mtmd's image chunks.

Pages are read back from their pixels by `Codebook.read` (itself checked against a decoder
written from docs/GLYPH.md in tests/test_glyph.py) and detokenized by llama.cpp."""

from __future__ import annotations

import pytest

from flowmm_edge.evaluation import evaluate, image_tasks
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.evaluation.ruler_tasks import FamilyError
from flowmm_edge.models import glyph


@pytest.fixture(scope="module")
def suite(mmproj, text_model):
    return image_tasks.generate(image_tasks.FAMILIES, [2048], 2, 0, glyph.Codebook.load(mmproj), text_model)


def page_texts(task, mmproj, model) -> list[str]:
    book = glyph.Codebook.load(mmproj)
    return [model.detokenize([t for t in book.read(s.image)]).rstrip("\n") for s in task.segments if s.kind == "image"]


def test_every_answer_is_in_one_page_and_not_in_the_text(suite, mmproj, text_model):
    assert [t.kind for t in suite] == [f for f in image_tasks.FAMILIES for _ in range(2)]
    for task in suite:
        pages = page_texts(task, mmproj, text_model)
        text = "".join(s.text for s in task.segments if s.kind == "text")
        assert len(pages) == image_tasks.PAGES
        assert all(s.modality == "image" for s in task.segments if s.kind == "image")
        (q,) = task.questions
        if task.kind == "image-split":  # one value in the text, the other in one page only
            in_text, answer = q.answers
            assert in_text in text and not any(in_text in p for p in pages), task.id
        else:
            (answer,) = q.answers
        assert answer not in text, task.id
        assert sum(answer in p for p in pages) == 1, task.id
        for other in q.distractors:  # the numbers not asked for are in the pages too
            assert any(other in p for p in pages), task.id
        n = sum(len(text_model.tokenize(s.text, add_special=False)) for s in task.segments if s.kind == "text")
        assert 0.85 * 2048 < n + image_tasks.PAGES * 256 < 1.1 * 2048, task.id
        if task.kind == "image-k":  # image k is the k-th page, named in the text before it
            k = int(q.text.rsplit(" ", 1)[1].rstrip("?"))
            assert answer in pages[k - 1] and f"Image {k}:" in text


def test_the_same_seed_gives_the_same_pages(suite, mmproj, text_model):
    again = image_tasks.generate(["image-k"], [2048], 1, 0, glyph.Codebook.load(mmproj), text_model)
    assert [s.image for s in again[0].segments] == [s.image for s in suite[4].segments]
    with pytest.raises(FamilyError, match="unknown image family"):
        image_tasks.generate(["image-x"], [2048], 1, 0, glyph.Codebook.load(mmproj), text_model)
    with pytest.raises(FamilyError, match="at least 1024 tokens"):
        image_tasks.generate(["image-k"], [512], 1, 0, glyph.Codebook.load(mmproj), text_model)


def test_the_full_cache_reads_the_needle_from_its_page(default_model_path, suite, mmproj):
    """One task through eval's image path (mtmd image chunks, image labels): the full cache's
    answer holds the number that is only in a page, and FlowMM's cache at 50% answers it too."""
    task = suite[0]
    # the shipped policy: FlowMM scores with its predictor, as chat does (the repeat pass would triple the cost)
    shipped = policy_mod.shipped_for(default_model_path)
    rows = evaluate.run(default_model_path, [task], ["full", "flowmm"], [0.5], policy=shipped, n_threads=2,
                        progress=False, mmproj=str(mmproj), mode="after")
    full = next(r for r in rows if r.method == "full")
    assert full.score == 1.0, full.answer
    merged = next(r for r in rows if r.method == "flowmm")
    assert merged.cells < merged.n_prompt and merged.score == 1.0, merged.answer
