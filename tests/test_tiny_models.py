"""The synthetic LLaVA pair loads through llama.cpp's and mtmd's real code paths."""

from __future__ import annotations

import ctypes
import dataclasses

import numpy as np
import pytest

import gguf
from flowmm_edge.models import tiny as tm
from conftest import write_png
from flowmm_edge.bindings import runtime


def test_text_model_header_matches_its_spec(tiny_models):
    text, _ = tiny_models
    r = gguf.GGUFReader(text)
    spec = tm.TINY.text
    f = lambda k: r.fields[k].contents()  # noqa: E731
    assert f("general.architecture") == "llama"
    assert (f("llama.block_count"), f("llama.embedding_length")) == (spec.n_layer, spec.n_embd)
    assert (f("llama.attention.head_count"), f("llama.attention.head_count_kv")) == (spec.n_head, spec.n_head_kv)
    assert spec.n_head > spec.n_head_kv, "tiny model must use GQA"
    assert f("tokenizer.ggml.model") == "llama" and len(f("tokenizer.ggml.tokens")) == spec.n_vocab


def test_generation_is_reproducible(tmp_path):
    a = tm.write_text_model(tm.TINY.text, tmp_path / "a.gguf")
    b = tm.write_text_model(tm.TINY.text, tmp_path / "b.gguf")
    assert a.read_bytes() == b.read_bytes()


def _decode_logits(path, prompt: str, **ctx_kw) -> np.ndarray:
    with runtime.Model(path) as model, runtime.Context(model, n_ctx=256, **ctx_kw) as ctx:
        tokens = model.tokenize(prompt)
        assert tokens[0] == 1, "BOS expected first"
        return ctx.decode(tokens, 0)


def test_tiny_model_decodes_deterministically(tiny_models):
    text, _ = tiny_models
    a = _decode_logits(text, "hello the secret key is")
    b = _decode_logits(text, "hello the secret key is")
    c = _decode_logits(text, "what color is the cat")
    assert a.shape == (tm.TINY.text.n_vocab,)
    assert np.isfinite(a).all() and a.std() > 0.1
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_tiny_model_tokenizer_round_trips(tiny_models):
    text, _ = tiny_models
    with runtime.Model(text) as model:
        s = "the secret code is 1234, ok? ünïcode"
        toks = model.tokenize(s, add_special=False)
        assert b"".join(model.token_to_piece(t) for t in toks).decode() == " " + s or \
            b"".join(model.token_to_piece(t) for t in toks).decode() == s
        # chatml control tokens are single tokens
        assert model.tokenize("<|im_start|>", add_special=False) == [3]


@pytest.mark.parametrize("width,height", [(40, 30), (64, 64)])
def test_mmproj_turns_an_image_into_an_image_chunk(tiny_models, tmp_path, width, height):
    from llama_cpp import mtmd_cpp as mtmd

    text, mmproj = tiny_models
    png = write_png(tmp_path / "img.png", width, height)
    with runtime.Model(text) as model:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.warmup = False
        ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), model.ptr, params)
        assert ctx, "mtmd could not load the tiny mmproj"
        try:
            bitmap = mtmd.mtmd_helper_bitmap_init_from_file(ctx, str(png).encode(), False)
            assert bitmap and (mtmd.mtmd_bitmap_get_nx(bitmap), mtmd.mtmd_bitmap_get_ny(bitmap)) == (width, height)
            chunks = mtmd.mtmd_input_chunks_init()
            prompt = b"describe " + mtmd.mtmd_default_marker() + b" please"
            inp = mtmd.mtmd_input_text(text=prompt, text_len=len(prompt), add_special=True, parse_special=True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) == 0
            kinds = [(mtmd.mtmd_input_chunk_get_type(c), mtmd.mtmd_input_chunk_get_n_tokens(c))
                     for c in (mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks)))]
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
        finally:
            mtmd.mtmd_free(ctx)
    image = [n for kind, n in kinds if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
    # LLaVA-1.5: the image is resized to image_size, one token per patch, class token dropped
    assert image == [tm.TINY.vision.n_patches]
    assert [k for k, _ in kinds] == [mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT, mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE,
                                     mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT]


def test_llava_shaped_q4_0_weights_give_finite_logits(tmp_path):
    """The LLaVA-1.5-7B-shaped generator's random Q4_0 blocks, at one layer to stay small."""
    spec = dataclasses.replace(tm.LLAVA_15_7B.text, n_layer=1)
    path = tm.write_text_model(spec, tmp_path / "llava-1layer.gguf")
    r = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert r.fields["llama.embedding_length"].contents() == 4096
    logits = _decode_logits(path, "hello the")
    assert logits.shape == (32000,) and np.isfinite(logits).all()
