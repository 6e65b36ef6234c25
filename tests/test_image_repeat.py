"""The repeat pass re-feeds images (compression/reconstruction.py, `images`): an image cell is
scored by the rows that re-read the image, as a text cell is by the rows that re-read its token.

The reference is the same context with the page's tokens decoded as text: a glyph page reaches
the model as exactly those tokens' embeddings through mtmd's image path (docs/GLYPH.md), so a pass
that repeats the page where it sits must score every cell as the all-text pass does, chunked the
same way. Without `images` the page's cells get only what the repeated text sends them."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.multimodal import Projector
from flowmm_edge.bindings.prompt import feed_pieces
from flowmm_edge.compression import reconstruction
from flowmm_edge.models import glyph

RUN = 256  # tokens before the page, in it (one page: 16 x 16 patches) and after it


@pytest.fixture(scope="module")
def page_context(mmproj, text_model):
    book = glyph.Codebook.load(mmproj)
    assert book.n_patches == RUN
    words = ("The ledger lists record {i}: the courier from harbour {j} carries crate {k} to the mill. "
             .format(i=i, j=i * 7 % 13, k=i * 31 % 97) for i in range(200))
    ids = book.tokenize("".join(words), text_model)
    before = ids[:RUN]
    page, after = ids[RUN:2 * RUN], ids[2 * RUN:3 * RUN]
    return book, before, page, after


def _scores(model, pieces, tokens_by_pos, images, rows):
    with runtime.Context(model, n_ctx=3 * RUN + reconstruction.ROOM, n_batch=512, n_ubatch=512, n_threads=2) as ctx:
        feed_pieces(ctx, pieces, 0)
        before = ctx.state()
        got = reconstruction.reconstruction_scores(ctx, tokens_by_pos, reconstruction.repeat_prefix(model), chunk=RUN,
                                                   rows=rows, images=images)
        assert ctx.state() == before  # the pass leaves the cache as it was
        return got


@pytest.mark.parametrize("rows", [1, 64])
def test_a_repeated_page_scores_its_cells_as_the_same_text_repeated(page_context, mmproj, text_model, rows):
    book, before, page, after = page_context
    as_text = np.asarray(before + page + after, np.int32)
    ref = _scores(text_model, [before + page + after], as_text, None, rows)
    with Projector(mmproj, text_model) as proj, proj.prepare(book.render(page)) as image:
        assert image.spans == [(RUN, True)]
        tokens = np.r_[np.asarray(before, np.int32), np.full(RUN, -1, np.int32), np.asarray(after, np.int32)]
        got = _scores(text_model, [before, image, after], tokens, {RUN: image}, rows)
        blind = _scores(text_model, [before, image, after], tokens, None, rows)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=2e-2, atol=1e-3)
    assert np.array_equal(np.sort(got.repeated), np.arange(3 * RUN))  # text and the page, each once
    assert np.array_equal(np.sort(blind.repeated), np.r_[0:RUN, 2 * RUN:3 * RUN])
    # blind to the page, the pass gives its cells a fraction of what re-reading it sends them
    def share_top(s):  # the page's share of the cells in each (layer, head)'s top fifth
        top = np.argsort(-s, axis=-1)[..., : 3 * RUN // 5]
        return np.mean((top >= RUN) & (top < 2 * RUN))
    assert share_top(blind.scores) < 0.8 * share_top(ref.scores)


def test_repeated_scores_feed_each_image_once_and_keep_it_when_stopped(page_context, mmproj, text_model):
    book, before, page, after = page_context
    tokens = np.r_[np.asarray(before, np.int32), np.full(RUN, -1, np.int32), np.asarray(after, np.int32)]
    with Projector(mmproj, text_model) as proj, proj.prepare(book.render(page)) as image, \
            runtime.Context(text_model, n_ctx=3 * RUN + reconstruction.ROOM, n_threads=2) as ctx:
        feed_pieces(ctx, [before, image, after], 0)
        rep = reconstruction.RepeatedScores()
        calls = []
        with pytest.raises(reconstruction.Interrupted):  # stopped after the first text chunk
            rep.update(ctx, tokens, stop=lambda: len(calls) > 0, progress=lambda d, t: calls.append((d, t)),
                       images={RUN: image})
        assert calls == [(RUN, 3 * RUN)] and np.array_equal(rep.repeated, np.arange(RUN))
        rep.update(ctx, tokens, images={RUN: image})
        assert np.array_equal(rep.repeated, np.arange(3 * RUN))
        fed = []
        image_eval = image.eval
        image.eval = lambda *a: fed.append(a) or image_eval(*a)
        rep.update(ctx, tokens, images={RUN: image})  # nothing new: the page is not fed again
        assert fed == [] and kv_cache.used_bound(ctx) >= 3 * RUN


def test_a_chat_repeats_its_images_once_then_lets_them_go(page_context, default_model_path, mmproj):
    """Session (chat's code path): a turn's image is held only while a merge of the conversation
    may repeat it; the merge's repeat pass re-reads it, then it is closed."""
    from flowmm_edge.app.session import Session

    book, before, page, after = page_context
    png = book.render(page)
    with Session(default_model_path, mmproj, method="flowmm:repeat", budget=128, n_ctx=2048, n_threads=2) as s:
        s.add_user_turn("What does the page say?", images=[png])
        (start,) = s.images
        image = s.images[start]
        assert s.tokens_by_pos[start] == -1 and image.n_pos == RUN
        assert s.merge()
        assert s.images == {} and image.ptr is None  # closed once re-read
        assert set(range(start, start + RUN)) <= set(s.compression.repeats.repeated.tolist())
    with Session(default_model_path, mmproj, method="snapkv", budget=128, n_ctx=2048, n_threads=2) as s:
        s.add_user_turn("What does the page say?", images=[png])
        assert s.images == {}  # nothing would repeat it: not held


def test_distillation_documents_hold_pages_and_pictures_the_teacher_re_reads(mmproj, text_model):
    """calibrate --distill with a projector: every third document holds a page of its own text and a
    generated picture; the samples cover their cells, and the page's cells hold its text's keys."""
    from flowmm_edge.calibration import distillation

    book = glyph.Codebook.load(mmproj)
    texts = [("a", " ".join(f"Record {i} of the harbour ledger lists crate {i * 7 % 31}." for i in range(400)))]
    with Projector(mmproj, text_model) as proj:
        docs = distillation.documents(text_model, 3, 700, texts=texts, projector=proj)
        assert [len(d.images) for d in docs] == [0, 0, 2]
        doc = docs[2]
        # the page: the image whose PNG header (width, height at bytes 16-24) is a page's
        (page_at, page_png), = [(i, png) for i, png in doc.images if png[16:24] == book.render([])[16:24]]
        page = book.read(page_png)
        picture_before = sum(RUN for i, png in doc.images if png is not page_png and i <= page_at)
        with runtime.Context(text_model, n_ctx=700 + 2 * RUN + reconstruction.ROOM, n_threads=2) as ctx:
            samples = distillation.collect(ctx, [doc], projector=proj, relative=False)  # keys as cached
            # the reference: the same pieces with the page's tokens decoded as text in its place
            as_text = distillation.Document("ref", doc.tokens[:page_at] + page + doc.tokens[page_at:],
                                            tuple((i if i <= page_at else i + len(page), png)
                                                  for i, png in doc.images if png is not page_png))
            ctx.clear()
            pieces = as_text.pieces(proj)
            feed_pieces(ctx, pieces, 0)
            for piece in pieces:
                if not isinstance(piece, list):
                    piece.close()
            _, k_text, _ = distillation.cache_rows(ctx)
    assert samples.teacher[0].shape[-1] == len(doc.tokens) + 2 * RUN  # the glyph projector: 256 positions an image
    cells = slice(page_at + picture_before, page_at + picture_before + len(page))
    got, want = samples.k[0][..., cells, :].astype(np.float32), k_text[..., cells, :]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-2, atol=2e-2)  # layer 0: the tokens' own keys
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999  # deeper: the same context, other batches
    assert np.all(samples.teacher[0] >= 0) and np.all(samples.teacher[0][..., cells].max(axis=-1) > 0)
