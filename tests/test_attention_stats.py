"""Attention statistics against softmax(QK^T/sqrt(d) + causal mask) computed in numpy.

Q is the model's own (captured with cb_eval after RoPE, every ubatch of the prefill); K is
read from the cache through the API (itself checked against llama.cpp's state). The prompt
is split into several ubatches; flash attention on and off.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.attention_stats import AttentionStats, graph_n_nodes
from flowmm_edge.bindings.kv_cache import NativeError
from conftest import TINY_PROMPT, span_labels
from tensor_capture import Capture

SPEC = tm.TINY.text
HD = SPEC.n_embd // SPEC.n_head
L, H, NQ = SPEC.n_layer, SPEC.n_head_kv, SPEC.n_head
PROMPT = TINY_PROMPT


def _prefill_with_stats(model, flash_attn, window):
    cap = Capture([f"Qcur-{l}" for l in range(L)])
    tokens = model.tokenize(PROMPT)
    n = len(tokens)
    ctx = runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, flash_attn=flash_attn, n_threads=2,
                          cb_eval=cap.callback)
    with AttentionStats(ctx, prompt_end=n, window=window, labels=span_labels(n), n_labels=2) as stats:
        ctx.decode(tokens, 0)
    cells, pos = kv_cache.seq_cells(ctx)
    keys = {(l, h): kv_cache.read_rows(ctx, l, h, cells, "k") for l in range(L) for h in range(H)}
    # llama's graph names three nodes "Qcur-l" per ubatch (projection, reshape, RoPE): keep the RoPE'd one
    qs = {l: np.concatenate([q.reshape(-1, NQ, HD) for q in cap.calls[f"Qcur-{l}"][2::3]]) for l in range(L)}
    ctx.close()
    return stats, pos, keys, qs, n


def _reference(q, keys_l, pos, pos_min, labels):
    """colsum [NQ, n] and flow [NQ, 2, 2] in float64 from Q rounded to f16 (as ggml's f16 mul_mat does)."""
    q = q.astype(np.float16).astype(np.float64)
    n = len(pos)
    colsum = np.zeros((NQ, n))
    flow = np.zeros((NQ, 2, 2))
    for t in range(n):
        if pos[t] < pos_min:
            continue
        for qh in range(NQ):
            k = keys_l[qh // (NQ // H)][: t + 1].astype(np.float64)
            logits = k @ q[t, qh] / np.sqrt(HD)
            p = np.exp(logits - logits.max())
            p /= p.sum()
            colsum[qh, : t + 1] += p
            for b in (0, 1):
                flow[qh, labels[pos[t]], b] += p[labels[pos[: t + 1]] == b].sum()
    return colsum, flow


@pytest.mark.parametrize("portable", [False, True], ids=["repeat_back", "transpose+sum_rows"])
@pytest.mark.parametrize("flash_attn", [True, False])
@pytest.mark.parametrize("window", [8, None], ids=["window8", "all-rows"])
def test_statistics_equal_numpy_softmax(model, flash_attn, window, portable, monkeypatch):
    """Both column-sum paths: repeat_back (CPU, CUDA) and the transpose the cache's device may need (Metal)."""
    monkeypatch.setenv("FLOWMM_STATS_PORTABLE", "1" if portable else "0")
    stats, pos, keys, qs, n = _prefill_with_stats(model, flash_attn, window)
    assert len(qs[0]) == n, "Q of every ubatch captured"
    labels = span_labels(n)
    pos_min = n - window if window else 0
    assert stats.n_rows == n - pos_min
    for l in range(L):
        colsum, flow = _reference(qs[l], [keys[(l, h)] for h in range(H)], pos, pos_min, labels)
        got = stats.column_scores(l)
        assert np.abs(got - colsum).max() / np.abs(colsum).max() <= 1e-4, l
        assert np.abs(stats.flow(l) - flow).max() / np.abs(flow).max() <= 1e-4, l
        # summed per KV head: query heads q and q+1 share KV head q // 2 (GQA groups are consecutive)
        np.testing.assert_allclose(stats.column_scores(l, per_kv_head=True), got.reshape(H, NQ // H, -1).sum(axis=1))
        # every counted row distributes exactly 1 over the cells
        np.testing.assert_allclose(got.sum(axis=1), n - pos_min, rtol=1e-5)
        rho = stats.cross_modal_share(l)
        want = (flow[:, 0, 1] + flow[:, 1, 0]) / flow.sum(axis=(1, 2))
        np.testing.assert_allclose(rho, want, rtol=1e-4)


def test_all_row_scores_are_the_h2o_accumulator(model):
    """H2O's running score: after each decode step add that step's attention row; same totals."""
    stats, pos, keys, qs, n = _prefill_with_stats(model, True, None)
    l = 1
    h2o = np.zeros((NQ, n))
    k = [keys[(l, h)].astype(np.float64) for h in range(H)]
    q = qs[l].astype(np.float16).astype(np.float64)
    for t in range(n):  # one "step" per token, as a decoder that tracked scores token by token would
        for qh in range(NQ):
            logits = k[qh // (NQ // H)][: t + 1] @ q[t, qh] / np.sqrt(HD)
            p = np.exp(logits - logits.max())
            h2o[qh, : t + 1] += p / p.sum()
    assert np.abs(stats.column_scores(l) - h2o).max() / h2o.max() <= 1e-4


@pytest.mark.parametrize("flash_attn", [True, False])
def test_statistics_off_leaves_graph_and_logits_untouched(model, flash_attn):
    tokens, nxt = model.tokenize(PROMPT), model.tokenize("the", add_special=False)
    n = len(tokens)
    kw = dict(n_ctx=256, n_batch=64, flash_attn=flash_attn, n_threads=2)
    with runtime.Context(model, **kw) as never, runtime.Context(model, **kw) as used:
        never.decode(tokens, 0)
        with AttentionStats(used, prompt_end=n, window=8):
            used.decode(tokens, 0)
            nodes_on = graph_n_nodes(used)
        a, b = never.decode(nxt, n), used.decode(nxt, n)
        np.testing.assert_array_equal(a, b)
        assert graph_n_nodes(used) == graph_n_nodes(never) < nodes_on


def test_bad_requests_are_refused_and_change_nothing(model):
    import ctypes

    from flowmm_edge.bindings.kv_cache import NativeError
    from flowmm_edge.bindings.native import lib

    tokens, nxt = model.tokenize(PROMPT), model.tokenize("the", add_special=False)
    n = len(tokens)
    with runtime.Context(model, n_ctx=256, n_threads=2) as ctx, runtime.Context(model, n_ctx=256, n_threads=2) as twin:
        ctx.decode(tokens, 0)
        twin.decode(tokens, 0)
        out = (ctypes.c_float * (NQ * n))()
        assert lib.flowmm_stats_column_scores(ctx.ptr, 0, 0, out, NQ, n) == -1
        assert b"no statistics were requested for sequence 0" in lib.flowmm_last_error()
        with pytest.raises(NativeError, match=f"window {n + 1} is not in"):
            AttentionStats(ctx, prompt_end=n, window=n + 1)
        with pytest.raises(NativeError, match=f"labels cover 5 positions but the sequence already holds position {n - 1}"):
            AttentionStats(ctx, labels=np.zeros(5, np.int32), n_labels=2)
        with pytest.raises(NativeError, match="label 3 at position 2 is out of range"):
            AttentionStats(ctx, labels=np.r_[0, 0, 3, np.zeros(n, np.int32)], n_labels=2)
        # the refused requests changed nothing: the next decode is bit-identical to the twin's
        np.testing.assert_array_equal(ctx.decode(nxt, n), twin.decode(nxt, n))
        stats = AttentionStats(ctx, prompt_end=n + 2, window=1)
        ctx.decode(nxt, n + 1)
        with pytest.raises(NativeError, match=f"layer {L} is out of range"):
            stats.column_scores(L)
        with pytest.raises(NativeError, match="no labels were given"):
            stats.flow(0)
        assert stats.column_scores(0).shape == (NQ, n + 2)
        stats.stop()


@pytest.mark.parametrize("flash_attn", [True, False])
def test_statistics_under_a_per_head_slot_bias_equal_numpy(model, flash_attn):
    """A merged cache carries a per-head bias; the next turn's statistics must see it as attention does."""
    cap = Capture([f"Qcur-{l}" for l in range(L)])
    tokens = model.tokenize(PROMPT)
    n = len(tokens)
    n0 = n // 2
    bias = np.random.default_rng(6).uniform(-2, 2, (L, H, n0)).astype(np.float32)
    ctx = runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, flash_attn=flash_attn, n_threads=2,
                          cb_eval=cap.callback)
    ctx.decode(tokens[:n0], 0)
    kv_cache.set_slot_bias(ctx, bias)
    seen = {l: len(cap.calls[f"Qcur-{l}"]) for l in range(L)}
    with AttentionStats(ctx) as stats:
        ctx.decode(tokens[n0:], n0)
    cells, pos = kv_cache.seq_cells(ctx)
    assert np.array_equal(pos, np.arange(n))
    for l in range(L):
        q = np.concatenate([x.reshape(-1, NQ, HD) for x in cap.calls[f"Qcur-{l}"][seen[l]:][2::3]])
        q = q.astype(np.float16).astype(np.float64)
        keys = [kv_cache.read_rows(ctx, l, h, cells, "k").astype(np.float64) for h in range(H)]
        want = np.zeros((NQ, n))
        for t in range(n0, n):
            for qh in range(NQ):
                h = qh // (NQ // H)
                logits = keys[h][: t + 1] @ q[t - n0, qh] / np.sqrt(HD)
                logits[:n0] += bias[l, h]
                p = np.exp(logits - logits.max())
                want[qh, : t + 1] += p / p.sum()
        got = stats.column_scores(l)
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3, l
    ctx.close()


def test_row_groups_that_straddle_ubatches_are_refused(model):
    """Groups of 16 rows counted from a window that starts mid-ubatch would be cut by the next one."""
    tokens = model.tokenize(PROMPT)
    n = len(tokens)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, n_threads=2) as ctx:
        ctx.decode(tokens, 0)
        ctx.decode([5], n)
        plain_nodes = graph_n_nodes(ctx)
        ctx.truncate(0)
        with pytest.raises(NativeError, match="straddle ubatches"):
            with AttentionStats(ctx, prompt_end=n, window=n - 3, row_groups=16):
                ctx.decode(tokens, 0)
        ctx.decode([5], n)
        assert graph_n_nodes(ctx) == plain_nodes  # the request ended with the error: no statistics nodes


def _decode_entries(ctx, entries):
    """One llama_decode of (token, pos, seq_id) rows in this order (a server's mixed batch)."""
    from flowmm_edge.bindings.native import llama_cpp

    batch = llama_cpp.llama_batch_init(len(entries), 0, 1)
    try:
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, i == len(entries) - 1
            batch.seq_id[i][0] = seq
        assert llama_cpp.llama_decode(ctx.ptr, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


def _reference_by_cells(q, keys, pos, rows_pos, pos_min):
    """colsum [NQ, n_cells] over one sequence's cells (any cell order): row t attends cells with pos <= t."""
    q = q.astype(np.float16).astype(np.float64)
    colsum = np.zeros((NQ, len(pos)))
    for r, t in enumerate(rows_pos):
        if t < pos_min:
            continue
        seen = pos <= t
        for qh in range(NQ):
            logits = keys[qh // (NQ // H)][seen].astype(np.float64) @ q[r, qh] / np.sqrt(HD)
            p = np.exp(logits - logits.max())
            colsum[qh, seen] += p / p.sum()
    return colsum


@pytest.mark.parametrize("flash_attn", [True, False])
def test_a_sequence_observed_in_a_shared_batch_equals_numpy(model, flash_attn):
    """serve's step: one ubatch holds two sequences' prompt chunks and a third's reply row. The
    observed sequence gets the statistics of its own rows (a window of 8), as numpy computes them
    from the captured queries and its keys; a second sequence observed in the same ubatch is not
    counted (its request fails, naming the first), and is counted alone in the next batch."""
    cap = Capture([f"Qcur-{l}" for l in range(L)])
    a = model.tokenize(PROMPT)
    b = model.tokenize("dogs and cats are in the city and the code is 9876 " * 2)
    c = model.tokenize("a third one")
    na0, nb0 = len(a) - 12, len(b) - 9
    ctx = runtime.Context(model, n_ctx=512, n_batch=128, flash_attn=flash_attn, n_threads=2, n_seq_max=3,
                          kv_unified=True, cb_eval=cap.callback)
    ctx.decode(a[:na0], 0, 0)
    ctx.decode(b[:nb0], 0, 1)
    ctx.decode(c, 0, 2)
    window_a = 8
    entries = [(t, na0 + i, 0) for i, t in enumerate(a[na0:])] + [(5, len(c), 2)] + \
              [(t, nb0 + i, 1) for i, t in enumerate(b[nb0:-3])]
    with pytest.raises(NativeError, match="sequence 0's statistics were counted in the same ubatch"):
        with AttentionStats(ctx, prompt_end=len(a), window=window_a, seq_id=0) as sa, \
                AttentionStats(ctx, prompt_end=len(b), window=len(b) - nb0, seq_id=1):
            _decode_entries(ctx, entries)
    q = {l: cap.calls[f"Qcur-{l}"][-1].reshape(-1, NQ, HD) for l in range(L)}
    assert len(q[0]) == len(entries) and sa.n_rows == window_a
    tail = [(t, len(b) - 3 + i, 1) for i, t in enumerate(b[-3:])] + [(7, len(c) + 1, 2)]
    with AttentionStats(ctx, prompt_end=len(b), window=3, seq_id=1) as sb:
        _decode_entries(ctx, tail)
    q_tail = {l: cap.calls[f"Qcur-{l}"][-1].reshape(-1, NQ, HD) for l in range(L)}
    assert sb.n_rows == 3
    for seq, stats, rows_q, rows_pos, pos_min in (
            (0, sa, q, [e[1] for e in entries[:len(a) - na0]], len(a) - window_a),
            (1, sb, q_tail, [e[1] for e in tail[:3]], len(b) - 3)):
        cells, pos = kv_cache.seq_cells(ctx, seq)
        for l in (0, L - 1):
            keys = [kv_cache.read_rows(ctx, l, h, cells, "k", seq_id=seq) for h in range(H)]
            got = stats.column_scores(l)  # (read when each request stopped; its cells have not changed since)
            want = _reference_by_cells(rows_q[l][:len(rows_pos)], keys, pos, np.array(rows_pos), pos_min)
            assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4, (seq, l)
    ctx.close()


def test_rows_a_batch_cannot_count_fail_that_request_alone(model):
    """A sequence whose observed rows are interleaved with another's cannot be counted: its
    getters name why, while the other sequence's request in the same batch stays exact. With one
    stream per sequence, a ubatch of two sequences cannot be counted either."""
    a, b = model.tokenize(PROMPT), model.tokenize("dogs and cats are in the city " * 3)
    with runtime.Context(model, n_ctx=512, n_batch=128, n_threads=2, n_seq_max=2, kv_unified=True) as ctx, \
            runtime.Context(model, n_ctx=512, n_batch=128, n_threads=2) as alone:
        ctx.decode(a[:-4], 0, 0)
        ctx.decode(b[:-4], 0, 1)
        alone.decode(b[:-4], 0, 0)
        with pytest.raises(NativeError, match="rows are not consecutive in the batch"):  # (read as sa stops)
            with AttentionStats(ctx, prompt_end=len(a), window=4, seq_id=0), \
                    AttentionStats(ctx, prompt_end=len(b), window=4, seq_id=1) as sb:
                ia = [(t, len(a) - 4 + i, 0) for i, t in enumerate(a[-4:])]
                ib = [(t, len(b) - 4 + i, 1) for i, t in enumerate(b[-4:])]
                _decode_entries(ctx, ia[:2] + ib + ia[2:])
        with AttentionStats(alone, prompt_end=len(b), window=4) as sb_alone:
            alone.decode(b[-4:], len(b) - 4)
        assert sb.n_rows == 4
        for l in range(L):
            want = sb_alone.column_scores(l)
            assert np.abs(sb.column_scores(l) - want).max() / np.abs(want).max() <= 1e-3, l
    with runtime.Context(model, n_ctx=512, n_batch=128, n_threads=2, n_seq_max=2, kv_unified=False) as ctx:
        ctx.decode(a[:-4], 0, 0)
        ctx.decode(a[:-4], 0, 1)
        with pytest.raises(NativeError, match="need a unified cache"):
            with AttentionStats(ctx, prompt_end=len(a), window=4, seq_id=0):
                _decode_entries(ctx, [(t, len(a) - 4 + i, s) for s in (0, 1) for i, t in enumerate(a[-4:])])
