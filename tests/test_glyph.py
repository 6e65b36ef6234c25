"""Glyph pages (flowmm_edge/models/glyph.py) on the default model: a rendered page goes through
llama.cpp's real mtmd image path and arrives as exactly the token embeddings of its text.

The references are independent of the code under test: token ids from llama.cpp's own
tokenizer, the vocabulary rule and the page layout re-derived here from docs/GLYPH.md, pixels
decoded here with numpy, embeddings dequantized here from the text GGUF's token_embd.weight
(located by the repository's header scan, gguf_file, and dequantized by gguf-py)."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

import gguf
from PIL import Image

from flowmm_edge import cli
from flowmm_edge.models import glyph, gguf_file
from flowmm_edge.bindings import multimodal, runtime
from flowmm_edge.bindings.multimodal import mtmd_cpp

N_EMBD = 896
N_CODES = 4096       # 2**12
GRID, PATCH, BLOCK = 16, 16, 4
CLI_TEXT = "This is the first page, with 42 items."
TEXT = "The first line of the new file has 12 values in 2024. Is it true? It is: for all of them!"


@pytest.fixture(scope="module")
def projector(mmproj, text_model):
    with multimodal.Projector(mmproj, text_model, n_threads=2) as p:
        yield p


@pytest.fixture(scope="module")
def embedding_rows(default_model_path):
    """ids -> their rows of token_embd.weight, dequantized with numpy/gguf-py [len(ids), n_embd]."""
    header = gguf_file.open_gguf(default_model_path)
    t = next(t for t in header.tensors if t.name == "token_embd.weight")
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    n_rows = t.shape[1]
    raw = np.memmap(default_model_path, np.uint8, "r", t.data_offset, t.n_bytes).reshape(n_rows, -1)
    return lambda ids: gguf.quants.dequantize(np.asarray(raw[np.asarray(ids)]), qtype).reshape(len(ids), N_EMBD)


@pytest.fixture(scope="module")
def vocabulary(text_model):
    """The documented rule for the default model (whose ids 0..4095 are all normal tokens): code 0
    is the newline token, codes 1.. the other ids below 4096 in order."""
    (newline,) = text_model.tokenize("\n", add_special=False)
    return [newline] + [i for i in range(N_CODES) if i != newline]


def decode_page(png: bytes, vocabulary) -> list[int]:
    """The token ids a page encodes, read from its pixels: patch p at row p // 16, column p % 16;
    bit i of its code is the 4x4 block at block row i // 4, block column i % 4, black meaning 1."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int64)
    assert a.shape == (GRID * PATCH, GRID * PATCH, 3)
    ids = []
    for p in range(GRID * GRID):
        y0, x0 = (p // GRID) * PATCH, (p % GRID) * PATCH
        code = 0
        for i in range(12):
            y, x = y0 + (i // 4) * BLOCK, x0 + (i % 4) * BLOCK
            block = a[y:y + BLOCK, x:x + BLOCK]
            assert np.all(block == block[0, 0, 0]), "a bit block is one flat colour"
            code |= int(block[0, 0, 0] == 0) << i
        assert np.all(a[y0 + 12:y0 + 16, x0:x0 + 16] == 255), "the fourth block row stays white"
        ids.append(vocabulary[code])
    return ids


def mtmd_embeddings(projector, png: bytes) -> np.ndarray:
    """The image embeddings mtmd makes for a page: mtmd_tokenize, mtmd_encode_chunk, mtmd_get_output_embd."""
    prepared = projector.prepare(png)
    try:
        ((n, is_image),) = prepared.spans
        assert is_image
        assert mtmd_cpp.mtmd_encode_chunk(projector.ptr, prepared.chunks[0]) == 0
        ptr = mtmd_cpp.mtmd_get_output_embd(projector.ptr)
        return np.ctypeslib.as_array(ptr, shape=(n * N_EMBD,)).reshape(n, N_EMBD).copy()
    finally:
        prepared.close()


def test_a_rendered_page_reaches_the_model_as_its_token_embeddings(mmproj, text_model, projector,
                                                                  embedding_rows, vocabulary):
    ids = text_model.tokenize(TEXT, add_special=False)
    assert max(ids) < N_CODES, "this text tokenizes inside the vocabulary as it is"
    png = glyph.render(TEXT, mmproj, text_model)
    expected = ids + [vocabulary[0]] * (GRID * GRID - len(ids))  # padded with the filler (newline)
    assert decode_page(png, vocabulary) == expected
    assert glyph.Codebook.load(mmproj).read(png) == expected

    got = mtmd_embeddings(projector, png)
    want = embedding_rows(expected)
    assert got.shape == (GRID * GRID, N_EMBD)
    err = np.abs(got - want).max(axis=1)
    # within f16 tolerance per patch (measured: bit for bit on the CPU backend)
    tol = 2.0 ** -11 * np.abs(want).max(axis=1) + 1e-6
    assert np.all(err <= tol), f"worst patch {int(err.argmax())}: {err.max()}"
    # each patch is nearest to its own token's embedding among the whole vocabulary
    table = embedding_rows(vocabulary)
    nearest = ((got[:, None, :] - table[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    assert [vocabulary[c] for c in nearest] == expected


def test_text_outside_the_vocabulary_is_split_into_tokens_inside_it(mmproj, text_model, projector, embedding_rows):
    book = glyph.Codebook.load(mmproj)
    text = "Tokenization of flowmm-edge: naïve café, 東京, emoji \U0001F600 and llama.cpp."
    own = text_model.tokenize(text, add_special=False)
    assert any(t >= N_CODES for t in own), "the model's own tokens include some outside the vocabulary"
    ids = book.tokenize(text, text_model)
    assert all(t < N_CODES for t in ids)
    assert b"".join(text_model.token_to_piece(t) for t in ids) == text.encode()
    # the split uses merges, not bytes alone: a long out-of-vocabulary word becomes a few tokens
    word = next(t for t in own if t >= N_CODES and len(text_model.token_to_piece(t)) >= 6)
    piece = text_model.token_to_piece(word)
    parts = book.split(word, piece)
    assert 1 < len(parts) < len(piece) and b"".join(text_model.token_to_piece(t) for t in parts) == piece
    # and the page carries exactly those tokens
    got = mtmd_embeddings(projector, book.render(ids))[:len(ids)]
    want = embedding_rows(ids)
    assert np.all(np.abs(got - want) <= 2.0 ** -11 * np.abs(want).max() + 1e-6)


def test_pages_and_errors(mmproj, text_model):
    book = glyph.Codebook.load(mmproj)
    text = ("All work and no play makes Jack a dull boy. " * 60).strip()
    tokens = book.tokenize(text, text_model)
    split = glyph.pages(text, mmproj, text_model)
    assert len(split) == -(-len(tokens) // 256) and all(len(p) <= 256 for p in split)
    assert sum(split, []) == tokens
    with pytest.raises(glyph.GlyphError, match="use pages"):
        book.render(tokens)
    with pytest.raises(glyph.GlyphError, match="outside the glyph vocabulary: \\[151645\\]"):
        book.render([15, 151645])
    for missing in (None, "model.gguf"):  # the opened model, never a path: models/ does not load llama.cpp
        with pytest.raises(glyph.GlyphError, match="needs its opened text model"):
            glyph.render("hello", mmproj, missing)


@pytest.mark.parametrize("digits,prompt", [
    ("4815162342", "Repeat the digits in the image exactly, with nothing else."),
    pytest.param("3141592653", "Repeat the digits in the image exactly, with nothing else.", marks=pytest.mark.slow),
    pytest.param("9081726354", "Repeat the digits in the image exactly, with nothing else.", marks=pytest.mark.slow),
    pytest.param("73019", "Repeat the digits in the image exactly, with nothing else.", marks=pytest.mark.slow),
])
def test_a_page_of_digits_is_read_back_through_the_chat(default_model_path, mmproj, text_model, tmp_path,
                                                         digits, prompt):
    from flowmm_edge.app.session import Session

    png = tmp_path / "digits.png"
    png.write_bytes(glyph.render(digits, mmproj, text_model))
    with Session(default_model_path, mmproj, method="full", n_ctx=1024, n_threads=2, max_reply=24) as s:
        answer = s.chat(prompt, images=[png])  # greedy: temperature 0 is the default
    assert answer.strip() == digits


def test_a_photo_goes_through_the_glyph_projector(projector, text_model):
    rng = np.random.default_rng(7)
    h, w = 360, 480
    coarse = rng.random((4, 5, 3))
    yy, xx = np.meshgrid(np.linspace(0, 3, h), np.linspace(0, 4, w), indexing="ij")
    y0, x0 = np.floor(yy).astype(int).clip(0, 2), np.floor(xx).astype(int).clip(0, 3)
    fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
    img = ((1 - fy) * (1 - fx) * coarse[y0, x0] + (1 - fy) * fx * coarse[y0, x0 + 1]
           + fy * (1 - fx) * coarse[y0 + 1, x0] + fy * fx * coarse[y0 + 1, x0 + 1])
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8), "RGB").save(buf, format="PNG")
    emb = mtmd_embeddings(projector, buf.getvalue())
    assert emb.shape == (GRID * GRID, N_EMBD) and np.all(np.isfinite(emb))
    with runtime.Context(text_model, n_ctx=512, n_threads=2) as ctx:
        prepared = projector.prepare(buf.getvalue())
        try:
            assert prepared.eval(ctx, 0) == GRID * GRID
        finally:
            prepared.close()
        # the text after the image attends to its 256 cells: finite logits, a finite decoded reply
        logits = ctx.decode(text_model.tokenize(" What is in the image?", add_special=False), GRID * GRID)
        assert logits.shape == (text_model.n_vocab,) and np.all(np.isfinite(logits))


def test_the_mmproj_is_deterministic_and_the_cli_renders(default_model_path, mmproj, text_model, tmp_path):
    out = tmp_path / "glyph.gguf"
    assert cli.main(["glyph", "--text-model", str(default_model_path), "--out", str(out)]) == 0
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out) == digest(mmproj), "the same bytes every run"
    assert out.stat().st_size < 32 << 20
    page = tmp_path / "page.png"
    assert cli.main(["glyph", "--text-model", str(default_model_path), "--mmproj", str(out),
                       "--render", CLI_TEXT, "--png", str(page)]) == 0
    ids = text_model.tokenize(CLI_TEXT, add_special=False)
    assert glyph.Codebook.load(out).read(page.read_bytes())[:len(ids)] == ids
