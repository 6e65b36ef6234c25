"""Reading the KV cache through the FlowMM C API, checked against llama.cpp's own sequence state."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from flowmm_edge.bindings import kv_cache, runtime
from state_reference import parse_seq_state, seq_state_bytes

SPEC = tm.TINY.text
HEAD_DIM = SPEC.n_embd // SPEC.n_head
PROMPTS = ["the secret key is red and the code is 1234 please tell me what color the cat is",
           "hello how many dogs are here"]

CONFIGS = [("f16", True), ("f16", False), ("q8_0", True), ("q4_0", True)]


def _filled_context(model, kv_type, flash_attn, n_seq=1, unified=False):
    ctx = runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, kv_type=kv_type, flash_attn=flash_attn,
                          n_seq_max=n_seq, n_threads=2, kv_unified=unified)
    for seq in range(n_seq):
        ctx.decode(model.tokenize(PROMPTS[seq]), 0, seq_id=seq)
    return ctx


@pytest.mark.parametrize("kv_type,flash_attn", CONFIGS)
def test_layout_reports_the_cache(model, kv_type, flash_attn):
    with _filled_context(model, kv_type, flash_attn) as ctx:
        lay = kv_cache.layout(ctx)
        assert (lay.n_layer, lay.n_head_kv, lay.head_dim_k, lay.head_dim_v) == (SPEC.n_layer, SPEC.n_head_kv, HEAD_DIM, HEAD_DIM)
        assert lay.kv_size == ctx.n_ctx and lay.n_stream == 1
        assert lay.type_k == runtime.KV_TYPES[kv_type] == lay.type_v
        assert lay.v_trans == (not flash_attn)


@pytest.mark.parametrize("kv_type,flash_attn", CONFIGS)
def test_rows_equal_llama_cpp_state(model, kv_type, flash_attn):
    with _filled_context(model, kv_type, flash_attn) as ctx:
        ref = parse_seq_state(seq_state_bytes(ctx.ptr, 0), SPEC.n_head_kv * HEAD_DIM, SPEC.n_head_kv * HEAD_DIM)
        cells, pos = kv_cache.seq_cells(ctx, 0)
        assert np.array_equal(pos, ref.pos)
        assert np.array_equal(pos, np.arange(len(model.tokenize(PROMPTS[0]))))
        for layer in range(SPEC.n_layer):
            for head in range(SPEC.n_head_kv):
                cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
                k = kv_cache.read_rows(ctx, layer, head, cells, "k")
                v = kv_cache.read_rows(ctx, layer, head, cells, "v")
                np.testing.assert_allclose(k, ref.k[layer][:, cols], rtol=1e-6, atol=1e-7)
                np.testing.assert_allclose(v, ref.v[layer][:, cols], rtol=1e-6, atol=1e-7)
                assert np.abs(k).max() > 0
        # any subset, in any order
        pick = cells[[5, 0, 17, 3]]
        np.testing.assert_allclose(kv_cache.read_rows(ctx, 2, 1, pick, "v"), ref.v[2][[5, 0, 17, 3], HEAD_DIM:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("unified", [False, True])
def test_second_sequence_reads_its_own_cells(model, unified):
    with _filled_context(model, "f16", True, n_seq=2, unified=unified) as ctx:
        assert kv_cache.layout(ctx).n_stream == (1 if unified else 2)
        ref = parse_seq_state(seq_state_bytes(ctx.ptr, 1), SPEC.n_head_kv * HEAD_DIM, SPEC.n_head_kv * HEAD_DIM)
        cells, pos = kv_cache.seq_cells(ctx, 1)
        assert np.array_equal(pos, ref.pos) and len(pos) == len(model.tokenize(PROMPTS[1]))
        if unified:  # one stream: the second sequence's cells follow the first's
            assert cells[0] == len(kv_cache.seq_cells(ctx, 0)[0])
        np.testing.assert_array_equal(kv_cache.read_rows(ctx, 3, 0, cells, "k", seq_id=1), ref.k[3][:, :HEAD_DIM])
        np.testing.assert_array_equal(kv_cache.read_rows(ctx, 1, 1, cells, "v", seq_id=1), ref.v[1][:, HEAD_DIM:])


@pytest.mark.parametrize("unified", [False, True])
def test_free_cells_are_the_streams_cells_no_sequence_holds(model, unified):
    """Counted against llama.cpp's own serialisation of each sequence: one stream shared by both
    sequences leaves its size less both; a stream each leaves its size less its own."""
    with _filled_context(model, "f16", True, n_seq=2, unified=unified) as ctx:
        held = [len(parse_seq_state(seq_state_bytes(ctx.ptr, s), SPEC.n_head_kv * HEAD_DIM,
                                    SPEC.n_head_kv * HEAD_DIM).pos) for s in (0, 1)]
        stream = kv_cache.layout(ctx).kv_size
        for s in (0, 1):
            assert kv_cache.free_cells(ctx, s) == stream - (sum(held) if unified else held[s])
        ctx.truncate(3, seq_id=1)
        assert kv_cache.free_cells(ctx, 1) == stream - (held[0] if unified else 0) - 3


def test_bad_requests_are_refused_with_a_message(model):
    with _filled_context(model, "f16", True, n_seq=2, unified=True) as ctx:
        cells0, _ = kv_cache.seq_cells(ctx, 0)
        cells1, _ = kv_cache.seq_cells(ctx, 1)
        cases = [
            (dict(layer=SPEC.n_layer, head=0, cells=cells0), "layer 4 is out of range [0, 4)"),
            (dict(layer=0, head=SPEC.n_head_kv, cells=cells0), "KV head 2 is out of range [0, 2)"),
            (dict(layer=0, head=0, cells=[ctx.n_ctx + 3]), f"cell {ctx.n_ctx + 3} is out of range"),
            (dict(layer=0, head=0, cells=[-1]), "cell -1 is out of range"),
            (dict(layer=0, head=0, cells=[ctx.n_ctx - 1]), f"cell {ctx.n_ctx - 1} does not hold sequence 0"),
            (dict(layer=0, head=0, cells=[0], seq_id=7), "seq_id 7 is out of range [0, 2)"),
        ]
        cases.append((dict(layer=0, head=0, cells=cells1[:1]), f"cell {cells1[0]} does not hold sequence 0"))
        for kwargs, message in cases:
            with pytest.raises(kv_cache.NativeError) as e:
                kv_cache.read_rows(ctx, **kwargs)
            assert message in str(e.value) and e.value.status == -1
        # the cache is unchanged by refused calls
        assert np.array_equal(kv_cache.seq_cells(ctx, 0)[0], cells0)


@pytest.mark.parametrize("kv_type,flash_attn", CONFIGS)
def test_value_norms_are_the_norms_of_llama_cpp_state(model, kv_type, flash_attn):
    """|v| per cell and KV head, computed on the cache's backend (V gathered by rows, or turned back
    from its transposed layout), against the rows of llama.cpp's own serialisation; a second
    sequence's cells are its own."""
    with _filled_context(model, kv_type, flash_attn, n_seq=2, unified=True) as ctx:
        for seq in (0, 1):
            ref = parse_seq_state(seq_state_bytes(ctx.ptr, seq), SPEC.n_head_kv * HEAD_DIM, SPEC.n_head_kv * HEAD_DIM)
            for layer in range(SPEC.n_layer):
                want = np.linalg.norm(ref.v[layer].reshape(len(ref.pos), SPEC.n_head_kv, HEAD_DIM), axis=2).T
                got = kv_cache.value_norms(ctx, layer, seq_id=seq)
                assert got.shape == (SPEC.n_head_kv, len(ref.pos))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        with pytest.raises(kv_cache.NativeError, match="layer 4 is out of range"):
            kv_cache.value_norms(ctx, SPEC.n_layer)
