"""Task families whose answers are inside images: glyph pages (`models.glyph`) between text
paragraphs, read by the text model through mtmd's real image path as image chunks.

A page is a rendered image of up to 256 tokens of text; the glyph projector hands the model
exactly those tokens' embeddings, at image positions and with the image label. So the answer is
in an image chunk and nowhere else, and it is known exactly.

Families (the haystack is `ruler_tasks`' generated prose; the needles and questions are RULER's
words where a RULER task has them):
  image-needle  one needle, a 7-digit number, in one of PAGES page images between text
                paragraphs (niah_single_2 with the needle's paragraph an image)
  image-split   a fact split across an image and the text: one key with two values, one in a
                text paragraph and one in a page away from it; both are asked for
                (niah_multivalue across the modalities). A first design, who owns which box
                in the text and each box's label in a page, was answered 0.38 by the full cache
                (chance, 0.5: a two-hop question beyond the default model) and dropped.
  image-k       a multi-image context: PAGES pages, each introduced in the text as "Image k:",
                each holding its own number; the question asks for image k's (the others'
                numbers score 0)

Every family opens with an instruction and keeps the question out of the context, as
`ruler_tasks` does, so `eval --question after` compresses the images before it is asked.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..bindings.prompt import Segment
from .ruler_tasks import FamilyError, MAX_TOKENS, _Writer, _haystack
from .tasks import Question, Task

FAMILIES = ("image-needle", "image-split", "image-k")
PAGES = 3                 # page images per context
PAGE_FILL = 0.8           # of a page's tokens given to haystack sentences (the rest: the needle, padding)

INSTRUCTION = ("Some special magic numbers are hidden within the following text and images. Make sure to "
               "memorize them. I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What are all the special magic numbers for {key} mentioned in the provided text?"
PREFIX = " The special magic numbers for {key} mentioned in the provided text are"
IMAGE_HEAD = "Image {k}:\n"
IMAGE_NEEDLE = "The special magic number in this image is {value}."
K_QUESTION = "What is the special magic number in image {k}?"
K_PREFIX = " The special magic number in image {k} is"


def check_families(families) -> None:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise FamilyError(f"unknown image family {unknown[0]!r} (one of {', '.join(FAMILIES)})")


class _Pages:
    """Pages for one task: sentences that fill a page, a needle planted among them, PNG bytes."""

    def __init__(self, book, model, w: _Writer):
        self.book, self.model, self.w = book, model, w

    def tokens(self, text: str) -> list[int]:
        return self.book.tokenize(text, self.model)

    def page(self, needles: list[str]) -> bytes:
        room = int(self.book.n_patches * PAGE_FILL)
        sentences = [self.w.sentence() for _ in range(40)]
        body: list[str] = []
        for s in sentences:
            if len(self.tokens(" ".join(body + [s] + needles))) > room:
                break
            body.append(s)
        for needle in needles:  # at random depths among the sentences, in order
            body.insert(int(self.w.rng.integers(0, len(body) + 1)), needle)
        tokens = self.tokens(" ".join(body))
        return self.book.render(tokens[:self.book.n_patches])


def _text(w: _Writer, n_tokens: int, count) -> str:
    return " ".join(_haystack(w, max(1, n_tokens), count)) + "\n"


def _interleave(w: _Writer, head: str, pages: list[bytes], text_tokens: int, count,
                page_heads: list[str] | None = None, extra: dict[int, str] | None = None) -> list[Segment]:
    """head, then text paragraphs and pages in turn (a paragraph before each page and one after
    the last); `extra[i]` is a sentence planted at a random place in paragraph i."""
    n_par = len(pages) + 1
    segs = [Segment("text", head)]
    for i in range(n_par):
        par = _haystack(w, max(1, text_tokens // n_par), count)
        if extra and i in extra:
            par.insert(int(w.rng.integers(0, len(par) + 1)), extra[i])
        segs.append(Segment("text", " ".join(par) + "\n"))
        if i < len(pages):
            if page_heads:
                segs.append(Segment("text", page_heads[i]))
            segs.append(Segment("image", image=pages[i], modality="image"))
    return segs


def _needle(w, pg, length, count):
    key = w.keys(1)[0]
    value = w.number()
    at = int(w.rng.integers(PAGES))
    pages = [pg.page([NEEDLE.format(key=key, value=value)] if i == at else []) for i in range(PAGES)]
    segs = _interleave(w, INSTRUCTION, pages, length - PAGES * pg.book.n_patches - count(INSTRUCTION), count)
    return segs, [Question(QUESTION.format(key=key), [value], "contains", answer_prefix=PREFIX.format(key=key),
                           max_tokens=MAX_TOKENS["needle"])]


def _split(w, pg, length, count):
    key = w.keys(1)[0]
    values = [w.number(), w.number()]  # one in the text, one in a page: the answer needs both
    at = int(w.rng.integers(PAGES))
    pages = [pg.page([NEEDLE.format(key=key, value=values[1])]) if i == at else pg.page([]) for i in range(PAGES)]
    par = int(w.rng.choice([i for i in range(PAGES + 1) if i not in (at, at + 1)]))  # away from that page
    segs = _interleave(w, INSTRUCTION, pages, length - PAGES * pg.book.n_patches - count(INSTRUCTION), count,
                       extra={par: NEEDLE.format(key=key, value=values[0])})
    return segs, [Question(QUESTION.format(key=key), values, "all", answer_prefix=PREFIX.format(key=key),
                           max_tokens=MAX_TOKENS["needles"])]


def _image_k(w, pg, length, count):
    values = [w.number() for _ in range(PAGES)]
    pages = [pg.page([IMAGE_NEEDLE.format(value=v)]) for v in values]
    heads = [IMAGE_HEAD.format(k=i + 1) for i in range(PAGES)]
    segs = _interleave(w, INSTRUCTION, pages, length - PAGES * pg.book.n_patches - count(INSTRUCTION), count,
                       page_heads=heads)
    k = int(w.rng.integers(PAGES))
    return segs, [Question(K_QUESTION.format(k=k + 1), [values[k]], "contains", answer_prefix=K_PREFIX.format(k=k + 1),
                           max_tokens=MAX_TOKENS["needle"], distractors=[v for i, v in enumerate(values) if i != k])]


def generate(families, lengths, per_family: int, seed: int, book, model,
             count_tokens: Callable[[str], int] | None = None) -> list[Task]:
    """`per_family` tasks of each family at each length (the context's positions, about, pages
    included), from `seed`. `book`: the glyph mmproj's `Codebook`; `model`: its text model
    (a `bindings.runtime.Model`), whose tokenizer writes the pages."""
    check_families(families)
    count = count_tokens or (lambda text: len(model.tokenize(text, add_special=False)))
    make = {"image-needle": _needle, "image-split": _split, "image-k": _image_k}
    tasks = []
    for length in lengths:
        if length < (PAGES + 1) * book.n_patches:
            raise FamilyError(f"image families need contexts of at least {(PAGES + 1) * book.n_patches} tokens "
                              f"({PAGES} pages of {book.n_patches}), not {length}")
        for family in families:
            for k in range(per_family):
                # one stream per (family, length, sample), apart from ruler_tasks' streams
                w = _Writer(np.random.default_rng([seed, 1000 + FAMILIES.index(family), int(length), k]))
                segs, questions = make[family](w, _Pages(book, model, w), length, count)
                tasks.append(Task(f"{family}-{length}-{k}", segs, questions, family))
    return tasks
