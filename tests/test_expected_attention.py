"""expected_attention against references computed here: the native statistics' mean query equals
the mean of the model's own queries (captured with cb_eval after RoPE), the RoPE geometry read
from the GGUF turns a query back to where llama.cpp's RoPE started (position 0: the query before
RoPE, also captured), and the method's scores equal numpy's softmax of the future query against
the cache's keys, averaged over each KV head's query heads."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.attention_stats import AttentionStats
from flowmm_edge.bindings.native import llama_cpp
from flowmm_edge.methods import registry
from flowmm_edge.compression import compressor as compression
from flowmm_edge.methods.base import Stats
from flowmm_edge.methods.expected_attention import ExpectedAttention, future_query
from conftest import TINY_PROMPT, span_labels
from tensor_capture import Capture


def _prefill(model, flash_attn: bool, window: int, kv_type: str = "f16"):
    n_layer, n_head = llama_n_layer(model), llama_n_head(model)
    cap = Capture([f"Qcur-{l}" for l in range(n_layer)])
    tokens = model.tokenize(TINY_PROMPT)
    n = len(tokens)
    ctx = runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, flash_attn=flash_attn, n_threads=2,
                          cb_eval=cap.callback, kv_type=kv_type)
    with AttentionStats(ctx, prompt_end=n, window=window, labels=span_labels(n), n_labels=2) as stats:
        ctx.decode(tokens, 0)
    hd = kv_cache.layout(ctx).head_dim_k
    # several nodes are named "Qcur-l" per ubatch (llama: projection, reshape, RoPE; qwen2 adds the
    # bias): the last is RoPE's output, the one before it the query RoPE turned
    per = len(cap.calls["Qcur-0"]) // -(-n // 16)
    pre = {l: np.concatenate([q.reshape(-1, n_head, hd) for q in cap.calls[f"Qcur-{l}"][per - 2::per]])
           for l in range(n_layer)}
    post = {l: np.concatenate([q.reshape(-1, n_head, hd) for q in cap.calls[f"Qcur-{l}"][per - 1::per]])
            for l in range(n_layer)}
    assert len(post[0]) == n
    return ctx, stats, pre, post, n


def llama_n_head(model) -> int:
    return llama_cpp.llama_model_n_head(model.ptr)


def llama_n_layer(model) -> int:
    return llama_cpp.llama_model_n_layer(model.ptr)


@pytest.mark.parametrize("flash_attn", [True, False])
def test_the_window_mean_query_is_the_mean_of_the_models_queries(model, flash_attn):
    ctx, stats, _, post, n = _prefill(model, flash_attn, window=8)
    try:
        assert stats.n_rows == 8
        for l in range(llama_n_layer(model)):
            want = post[l][n - 8:n].astype(np.float64).mean(axis=0)
            got = stats.query_mean(l)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), l
    finally:
        ctx.close()


def _geometry_turns_queries_back_to_position_zero(model):
    ctx, stats, pre, post, n = _prefill(model, True, window=8)
    try:
        rope = compression.rope_geometry(model)
        for l in (0, llama_n_layer(model) - 1):
            for t in (1, 7, n - 1):  # position t's query turned t positions back is the query before RoPE
                back = future_query(post[l][t].astype(np.float64), rope, offset=-t, n_future=1)
                np.testing.assert_allclose(back, pre[l][t], rtol=1e-4, atol=1e-4 * np.abs(pre[l][t]).max())
    finally:
        ctx.close()
    return rope


def test_the_rope_geometry_undoes_llama_cpps_rope_on_the_tiny_model(model):
    assert _geometry_turns_queries_back_to_position_zero(model).pairing == "adjacent"  # llama: RoPE NORM


def test_the_rope_geometry_undoes_llama_cpps_rope_on_the_default_model(text_model):
    rope = _geometry_turns_queries_back_to_position_zero(text_model)
    assert rope.pairing == "halves" and rope.freq_base == 1e6  # qwen2: NEOX, its GGUF's base


def _reference_scores(mean_q, keys, rope, window, n_future, group):
    """numpy: turn the mean query by each future step's rotation (explicit 2x2 per pair) and
    average the turned vectors; softmax over the cells per query head; mean over the group."""
    theta = rope.angles()
    first, second = rope.pairs()
    steps = (window + 1) / 2 + np.arange(n_future)
    turned = np.zeros_like(mean_q)
    for step in steps:
        v = mean_q.copy()
        c, s = np.cos(theta * step), np.sin(theta * step)
        v[..., first] = mean_q[..., first] * c - mean_q[..., second] * s
        v[..., second] = mean_q[..., first] * s + mean_q[..., second] * c
        turned += v / len(steps)
    n_head, hd = mean_q.shape
    out = []
    for kh in range(keys.shape[0]):
        acc = 0
        for j in range(group):
            logits = keys[kh] @ turned[kh * group + j] / np.sqrt(hd)
            p = np.exp(logits - logits.max())
            acc = acc + p / p.sum()
        out.append(acc / group)
    return np.stack(out)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_scores_and_kept_cells_equal_numpy(model, kv_type):
    """The scores on the cache's backend (the predictor's graph, quantized K turned back) equal
    numpy's over the keys read from the cache; the merge keeps the protected cells and numpy's best."""
    method, _ = registry.resolve("expected_attention")
    assert isinstance(method, ExpectedAttention)
    method.window = 8
    ctx, stats, _, post, n = _prefill(model, True, window=8, kv_type=kv_type)
    try:
        cells, _ = kv_cache.seq_cells(ctx)
        lay = kv_cache.layout(ctx)
        keys = np.stack([np.stack([kv_cache.read_rows(ctx, l, h, cells, "k") for h in range(lay.n_head_kv)])
                         for l in range(lay.n_layer)]).astype(np.float64)
        rope = compression.rope_geometry(model)
        group = llama_n_head(model) // lay.n_head_kv
        want = np.stack([_reference_scores(post[l][n - 8:n].astype(np.float64).mean(axis=0), keys[l], rope, 8,
                                           method.n_future_positions, group) for l in range(lay.n_layer)])
        native = Stats(query_means=np.stack([stats.query_mean(l) for l in range(lay.n_layer)]), rope=rope,
                       key_scorer=lambda l, w, b: kv_cache.predict_scores(ctx, l, w, b, rope.pairing))
        got = method.score(native, lay.n_layer, lay.n_head_kv, n)
        assert np.abs(got - want).max() <= 2e-3 * want.max()
        np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-5)  # a distribution over the cells per KV head

        comp = compression.Compressor(method, n // 2)
        comp.use_observed(stats)
        report = comp.compress(ctx, span_labels(n))
        assert report.cells_after == n // 2
        kept = report.plan.src[..., 0]  # each slot keeps one cell: per (layer, KV head), the cells kept
        protected = method.protected(n)
        for l in range(lay.n_layer):
            for h in range(lay.n_head_kv):
                rest = np.setdiff1d(np.arange(n), protected)
                best = rest[np.argsort(-want[l, h, rest], kind="stable")][: n // 2 - len(protected)]
                chosen = np.sort(kept[l, h][kept[l, h] >= 0])
                assert np.isin(protected, chosen).all()
                # numpy's best, but for near-ties at the boundary (f16 keys, float32 sums)
                missed = np.setdiff1d(best, chosen)
                assert len(missed) <= 1 and all(abs(want[l, h, m] - want[l, h, np.setdiff1d(chosen, best)]).min()
                                                 <= 1e-3 * want[l, h].max() for m in missed), (l, h)
    finally:
        ctx.close()
