"""Distilling the repeat pass into an ImportancePredictor (importance_predictor.py).

    samples = collect(ctx, documents(model, n_docs, n_tokens))   # prefill + repeat pass, per document
    predictor, info = fit(samples, pairing)                      # ridge per (layer, KV head), held-back ranks

The teacher is reconstruction.reconstruction_scores: for every (layer, KV head, cell), the largest
attention mass a group of the repeat pass's rows sent the cell. The student sees only that cell's
cached key, turned back by RoPE at its position (importance_predictor.unrope), the cell's
distance to the document's end and how many keys of the document look like its own
(importance_predictor.near_copies, computed on the cache's backend as a merge computes it), and
regresses log(teacher + LOG_FLOOR): a `relative` predictor with near-copies.

The corpus is not the evaluation suite and not its generators' haystacks:
- natural text the machine has: the descriptions and licences of the Python packages installed
  beside flowmm_edge (`*.dist-info/METADATA`, `LICENSE*`), read in sorted order;
- documents of this module's own design with planted facts: the same natural text with records
  ("The badge number of the archive room is 7316-K.") set into it at random places, so the
  teacher sees the spans a later question would need among prose that no question asks about.
- with a projector, every third document also holds images, so the student sees keys that are
  not text's: with a glyph projector (docs/GLYPH.md) a span of the document's own text becomes a
  page image in its place, and with any projector a generated picture (bindings/images.pattern)
  is set in at a random place. The teacher re-reads them (reconstruction's `images`).
The policy records which sources and how many tokens.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np

from ..bindings import kv_cache, runtime
from ..bindings.prompt import feed_pieces
from ..methods.importance_predictor import (LOG_FLOOR, NEAR_COPIES, ImportancePredictor, distance_to_end, features,
                                            fit_ridge, spearman, unrope)
from ..compression import reconstruction
from ..compression.compressor import rope_geometry, sequence_near_copies

RIDGE = 1e-3  # of the standardised features' scale, per sample
_THINGS = ["archive room", "north gate", "blue locker", "server rack", "night shift", "west wing", "supply van",
           "reading room", "cold store", "back office", "test bench", "loading dock", "clock tower", "boat house"]
_WHATS = ["badge number", "door code", "account name", "pass phrase", "serial number", "room number", "pin", "tag"]
_WORDS = ["amber", "falcon", "quartz", "meadow", "cobalt", "ember", "willow", "harbor", "tundra", "violet", "saffron"]


def natural_texts(roots: list[Path] | None = None) -> list[tuple[str, str]]:
    """(name, text) of the package descriptions and licences under `roots` (default: the
    site-packages this module is installed in), sorted by name, each at least 2,000 characters."""
    if roots is None:
        roots = [Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    out = {}
    for root in roots:
        for pattern in ("*.dist-info/METADATA", "*.dist-info/LICENSE*", "*.dist-info/licenses/LICENSE*"):
            for f in root.glob(pattern):
                try:
                    text = f.read_text(errors="replace")
                except OSError:
                    continue
                if len(text) >= 2000:
                    out[str(f.relative_to(root))] = text
    return sorted(out.items())


def _record(rng: np.random.Generator) -> str:
    what, thing = rng.choice(_WHATS), rng.choice(_THINGS)
    value = rng.choice([f"{rng.integers(1000, 9999)}-{chr(65 + rng.integers(26))}",
                        f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}-{rng.integers(10, 99)}"])
    return f" The {what} of the {thing} is {value}. "


def record_spans(model, doc) -> list[tuple[int, int]]:
    """The token ranges [a, b) of the records planted in a document's text (`_record`)."""
    record = re.compile(r" The (%s) of the (%s) is (\S+)\. " % ("|".join(_WHATS), "|".join(_THINGS)))
    pieces = [model.token_to_piece(t).decode("utf-8", "replace") for t in doc.tokens]
    ends, text = np.cumsum([len(p) for p in pieces]), "".join(pieces)
    return [(int(np.searchsorted(ends, m.start(), side="right")), int(np.searchsorted(ends, m.end(3))) + 1)
            for m in record.finditer(text)]


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    tokens: list[int]
    images: tuple = ()  # (token index it comes before, PNG bytes), by index

    def pieces(self, projector) -> list:
        """The document as prompt pieces: token lists and prepared images, in order."""
        out, at = [], 0
        for index, png in self.images:
            if index > at:
                out.append(self.tokens[at:index])
            out.append(projector.prepare(png))
            at = index
        if at < len(self.tokens):
            out.append(self.tokens[at:])
        return out


def _with_images(doc: Document, model, rng: np.random.Generator, book, seed: int) -> Document:
    """`doc` with a generated picture set in and, given a glyph codebook, a span of its text as a
    page in its place (the span's text spelled in the page's vocabulary, at most one page)."""
    from ..bindings import images

    tokens, placed = list(doc.tokens), []
    if book is not None:
        at = int(rng.integers(1, max(2, len(tokens) - book.n_patches)))
        span = tokens[at:at + book.n_patches]
        page = book.tokenize(model.detokenize(span), model)[:book.n_patches]
        tokens = tokens[:at] + tokens[at + len(span):]
        placed.append((at, book.render(page)))
    at = int(rng.integers(1, len(tokens)))
    placed.append((at, images.pattern(seed, size=96)))
    return Document(doc.name + ", with images", tokens, tuple(sorted(placed, key=lambda p: p[0])))


def documents(model, n_docs: int, n_tokens: int, seed: int = 0, texts=None, projector=None) -> list[Document]:
    """n_docs documents of n_tokens each (BOS first): natural text cut in order from the corpus,
    every second one with planted records (one per ~150 tokens); with a `projector`, every third
    also holds images (see the module docstring)."""
    texts = natural_texts() if texts is None else texts
    if not texts:
        raise reconstruction.ReconstructionError("no natural text found for the distillation corpus")
    rng = np.random.default_rng(seed)
    stream = model.tokenize("\n\n".join(t for _, t in texts), add_special=False)
    bos = model.tokenize("", add_special=True)[:1]  # the model's BOS, if it has one
    docs, at = [], 0
    for d in range(n_docs):
        if at + n_tokens > len(stream):
            at = 0
        start, body = at, stream[at:at + n_tokens]
        at += n_tokens
        if d % 2 == 1:
            text = model.detokenize(body)
            cuts = sorted(rng.integers(0, len(text), size=max(1, n_tokens // 150)))
            text = "".join(text[a:b] + _record(rng) for a, b in zip([0, *cuts], [*cuts, len(text)]))
            body = model.tokenize(text, add_special=False)
        doc = Document(f"{'planted' if d % 2 else 'natural'}: corpus tokens {start}-{start + n_tokens}",
                       bos + body[:n_tokens - 1])
        if projector is not None and d % 3 == 2:
            doc = _with_images(doc, model, rng, _codebook(projector), seed * 1000 + d)
        docs.append(doc)
    return docs


def _codebook(projector):
    """The glyph codebook of a glyph projector, None for any other."""
    from ..models import glyph

    try:
        return glyph.Codebook.load(projector.facts.path)
    except glyph.GlyphError:
        return None


@dataclasses.dataclass
class Samples:
    """Per document: k, v [n_layer, n_head_kv, n, d] (float16), the teacher [n_layer, n_head_kv, n]
    and each cell's distance to the document's last position [n]; where `relative`, k is turned
    back by RoPE at each cell's position; with `near_copies_params`, each cell's near-copies
    [n_layer, n_head_kv, n] too."""

    k: list[np.ndarray]
    v: list[np.ndarray]
    teacher: list[np.ndarray]
    names: list[str]
    distance: list[np.ndarray] = dataclasses.field(default_factory=list)
    relative: bool = True
    near_copies: list[np.ndarray] = dataclasses.field(default_factory=list)
    near_copies_params: dict | None = None

    def features(self, d: int, layer: int, head: int, pairing: str) -> np.ndarray:
        """The student's input rows of document d's cells for (layer, head)."""
        return features(self.k[d][layer, head].astype(np.float32), pairing,
                        self.distance[d] if self.relative else None,
                        self.near_copies[d][layer, head] if self.near_copies_params else None)

    @property
    def n_tokens(self) -> int:
        return sum(t.shape[-1] for t in self.teacher)


def cache_rows(ctx, seq_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, k, v) of the sequence's cells in position order; k, v [n_layer, n_head_kv, n, d]."""
    cells, pos = kv_cache.seq_cells(ctx, seq_id)
    order = np.argsort(pos, kind="stable")
    cells = cells[order]
    lay = kv_cache.layout(ctx)
    k = np.stack([np.stack([kv_cache.read_rows(ctx, l, h, cells, "k", seq_id) for h in range(lay.n_head_kv)])
                  for l in range(lay.n_layer)])
    v = np.stack([np.stack([kv_cache.read_rows(ctx, l, h, cells, "v", seq_id) for h in range(lay.n_head_kv)])
                  for l in range(lay.n_layer)])
    return pos[order], k, v


def collect(ctx, docs: list[Document], progress=None, projector=None, relative: bool = True,
            near_copies: dict | None = NEAR_COPIES) -> Samples:
    """Prefill each document alone in sequence 0, run the repeat pass (re-reading its images),
    keep its scores and rows (the keys turned back by RoPE where `relative`, and with
    `near_copies` (a predictor's parameters; relative only) each cell's near-copies). A document
    with images needs the `projector`."""
    near_copies = near_copies if relative else None
    out = Samples([], [], [], [], relative=relative, near_copies_params=near_copies)
    rope = rope_geometry(ctx.model)
    prefix = reconstruction.repeat_prefix(ctx.model)
    for i, doc in enumerate(docs):
        ctx.clear()
        pieces = doc.pieces(projector) if doc.images else [doc.tokens]
        try:
            feed_pieces(ctx, pieces, 0)
            scored = reconstruction.reconstruction_scores(ctx, reconstruction.tokens_by_position(pieces), prefix,
                                                          images=reconstruction.images_by_position(pieces))
        finally:
            for p in pieces:
                if not isinstance(p, list):
                    p.close()
        pos, k, v = cache_rows(ctx)
        assert np.array_equal(pos, scored.positions)
        if near_copies is not None:
            order = np.argsort(kv_cache.seq_cells(ctx, 0)[1], kind="stable")  # cache_rows' position order
            out.near_copies.append(sequence_near_copies(ctx, near_copies)[..., order].astype(np.float32))
        if relative:
            k = unrope(k, pos, rope)
        out.k.append(k.astype(np.float16))
        out.distance.append(distance_to_end(pos, ctx.next_pos(0)))
        out.v.append(v.astype(np.float16))
        out.teacher.append(scored.scores.astype(np.float32))
        out.names.append(doc.name)
        ctx.clear()
        if progress is not None:
            progress(i + 1, len(docs))
    return out


def collect_documents(model, docs: list[Document], n_tokens: int, n_threads=None, progress=None,
                      projector=None, relative: bool = True, near_copies: dict | None = NEAR_COPIES) -> Samples:
    """`collect` in a context of its own, sized for documents of n_tokens (and their images' extra
    positions) with the repeat pass's room beside them."""
    image_pos = max([_image_positions(projector, d) for d in docs if d.images] or [0])
    with runtime.Context(model, n_ctx=n_tokens + image_pos + reconstruction.ROOM, n_batch=512,
                         n_threads=n_threads) as ctx:
        return collect(ctx, docs, progress=progress, projector=projector, relative=relative, near_copies=near_copies)


def _image_positions(projector, doc: Document) -> int:
    """The positions a document's images take beyond the tokens they replace (at most: a page's)."""
    total = 0
    for _, png in doc.images:
        with projector.prepare(png) as image:
            total += image.n_pos
    return total


def fit_head(keys: list[np.ndarray], teachers: list[np.ndarray], docs: list[int], layer: int, head: int,
             pairing: str, ridge: float = RIDGE, weight=None, distances: list[np.ndarray] | None = None,
             near_copies: list[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """(w, b) of one (layer, KV head) fitted on the given documents' keys [n_layer, n_head_kv, n, d]
    and teacher scores [n_layer, n_head_kv, n] (with `distances`, each document's cells' distances
    to its end: a relative predictor's features; with `near_copies` [n_layer, n_head_kv, n] per
    document, that input too); `weight(teacher [n]) -> [n]` weighs each document's cells (None:
    alike)."""
    x = np.concatenate([features(keys[d][layer, head].astype(np.float32), pairing,
                                 None if distances is None else distances[d],
                                 None if near_copies is None else near_copies[d][layer, head]) for d in docs])
    y = np.concatenate([np.log(teachers[d][layer, head] + LOG_FLOOR) for d in docs])
    wt = None if weight is None else np.concatenate([weight(teachers[d][layer, head]) for d in docs])
    return fit_ridge(x, y, ridge, wt)


def fit(samples: Samples, pairing: str, held_back: int = 1, ridge: float = RIDGE):
    """A predictor fitted on all documents but the last `held_back`, and the mean Spearman rank
    correlation with the teacher on those held back, per layer (averaged over KV heads and
    documents). Then refitted on every document for the weights it returns."""
    n_doc = len(samples.teacher)
    train, test = list(range(n_doc - held_back)), list(range(n_doc - held_back, n_doc))
    n_layer, n_head = samples.teacher[0].shape[:2]
    distances = samples.distance if samples.relative else None
    near = samples.near_copies if samples.near_copies_params else None
    rank = np.zeros((n_layer, n_head))
    weights, bias = [], []
    for l in range(n_layer):
        wl, bl = [], []
        for h in range(n_head):
            w, b = fit_head(samples.k, samples.teacher, train, l, h, pairing, ridge, distances=distances,
                            near_copies=near)
            rank[l, h] = np.mean([spearman(samples.features(d, l, h, pairing) @ w + b, samples.teacher[d][l, h])
                                  for d in test])
            w, b = fit_head(samples.k, samples.teacher, list(range(n_doc)), l, h, pairing, ridge, distances=distances,
                            near_copies=near)
            wl.append(w)
            bl.append(b)
        weights.append(wl)
        bias.append(bl)
    per_layer = rank.mean(1)
    info = {"held_back_spearman_per_layer": [round(float(r), 4) for r in per_layer],
            "held_back_spearman_mean": round(float(per_layer.mean()), 4), "ridge": ridge}
    return ImportancePredictor(pairing, np.asarray(weights, np.float32), np.asarray(bias, np.float32),
                               info, relative=samples.relative, near_copies=samples.near_copies_params), info
