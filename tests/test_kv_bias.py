"""Per-slot attention bias, checked against attention recomputed in numpy.

The reference takes the layer's own queries (captured with cb_eval after RoPE) and the keys
and values in the cache (read through the API, itself checked against llama.cpp's state),
and computes softmax(QK^T/sqrt(d) + causal mask) V with the dead slot *removed* and log(n)
added where asked; the model's attention output (kqv_out) must match it.
"""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from flowmm_edge.bindings import kv_cache, runtime
from tensor_capture import Capture

SPEC = tm.TINY.text
HD = SPEC.n_embd // SPEC.n_head
L, H, NQ = SPEC.n_layer, SPEC.n_head_kv, SPEC.n_head
GQA = NQ // H
PROMPT = "the secret key is red and the code is 1234 please tell me what color the cat is"
LAYER = 2


def _attention(q, pos_q, keys, vals, pos_k, bias):
    """q [n_q, NQ, HD]; keys/vals [H][n_k, HD]; bias [H, n_k] (-inf removes). Returns [n_q, NQ*HD]."""
    out = np.zeros((len(q), NQ * HD), np.float64)
    for t in range(len(q)):
        for qh in range(NQ):
            h = qh // GQA
            keep = (pos_k <= pos_q[t]) & np.isfinite(bias[h])
            logits = keys[h][keep] @ q[t, qh] / np.sqrt(HD) + bias[h][keep]
            p = np.exp(logits - logits.max())
            out[t, qh * HD:(qh + 1) * HD] = (p / p.sum()) @ vals[h][keep]
    return out


def _run(model, flash_attn, make_bias):
    cap = Capture([f"Qcur-{LAYER}", f"kqv_out-{LAYER}", f"kqv_out-{LAYER - 1}"])
    cap.enabled = False
    tokens = model.tokenize(PROMPT)
    nxt = model.tokenize("the cat", add_special=False)
    with runtime.Context(model, n_ctx=256, n_batch=64, flash_attn=flash_attn, n_threads=2, cb_eval=cap.callback) as ctx:
        ctx.decode(tokens, 0)
        cells, pos = kv_cache.seq_cells(ctx, 0)
        bias = make_bias(len(cells))
        if bias is not None:
            kv_cache.set_slot_bias(ctx, bias)
        cap.enabled = True
        logits = ctx.decode(nxt, len(tokens))
        cells, pos = kv_cache.seq_cells(ctx, 0)
        kv = {(LAYER, h, w): kv_cache.read_rows(ctx, LAYER, h, cells, w) for h in range(H) for w in "kv"}
    q = cap.tensors[f"Qcur-{LAYER}"].reshape(len(nxt), NQ, HD)
    outs = {l: cap.tensors[f"kqv_out-{l}"].reshape(len(nxt), NQ * HD) for l in (LAYER - 1, LAYER)}
    pos_q = pos[-len(nxt):]
    return q, pos_q, pos, kv, outs, logits, bias


def _full_bias(n_new, layer_bias):
    """Bias rows for the reference: the set bias over the prompt cells, 0 for the new tokens."""
    return np.concatenate([layer_bias, np.zeros((H, n_new))], axis=1)


@pytest.mark.parametrize("flash_attn", [True, False])
@pytest.mark.parametrize("per_head", [False, True])
def test_dead_and_weighted_slots_match_numpy_attention(model, flash_attn, per_head):
    dead, heavy = 5, 9

    def make_bias(n):
        b = np.zeros((L, H, n), np.float32)
        if per_head:
            b[LAYER, 0, dead] = -np.inf  # dead for KV head 0 only
            b[LAYER, 1, heavy] = np.log(3.0)
        else:
            b[LAYER, :, dead] = -np.inf
            b[LAYER, :, heavy] = np.log(3.0)
        return b if per_head else b[:, 0, :]

    q, pos_q, pos, kv, outs, _, bias = _run(model, flash_attn, make_bias)
    if flash_attn:  # llama.cpp's CPU flash attention takes Q in f16 (K and V are f16 in the cache)
        q = q.astype(np.float16).astype(np.float32)
    layer_bias = bias[LAYER] if per_head else np.broadcast_to(bias[LAYER], (H, bias.shape[-1]))
    full = _full_bias(len(pos_q), layer_bias)
    keys = [kv[(LAYER, h, "k")] for h in range(H)]
    vals = [kv[(LAYER, h, "v")] for h in range(H)]
    want = _attention(q, pos_q, keys, vals, pos, full)
    unbiased = _attention(q, pos_q, keys, vals, pos, np.zeros_like(full))
    scale = np.abs(want).max()
    err = np.abs(outs[LAYER] - want).max() / scale
    print(f"slot bias vs numpy attention: relative error {err:.2e} (flash_attn={flash_attn}, per_head={per_head})")
    # llama.cpp's attention without any bias is itself 1.2e-3 (flash attention: f16 softmax and
    # V accumulation) and 5.3e-4 (without) away from this float64 reference
    assert err <= (2e-3 if flash_attn else 1e-3)
    assert np.abs(want - unbiased).max() / scale > 1e-2, "the bias must change this layer's attention"
    # the layer below carries no bias: its output equals a run without any bias, bit for bit
    _, _, _, _, outs0, _, _ = _run(model, flash_attn, lambda n: None)
    np.testing.assert_array_equal(outs[LAYER - 1], outs0[LAYER - 1])


@pytest.mark.parametrize("flash_attn", [True, False])
def test_cleared_bias_gives_identical_logits(model, flash_attn):
    from flowmm_edge.bindings.native import llama_cpp

    tokens, nxt = model.tokenize(PROMPT), model.tokenize("the", add_special=False)
    n = len(tokens)
    with runtime.Context(model, n_ctx=256, flash_attn=flash_attn, n_threads=2) as a, \
         runtime.Context(model, n_ctx=256, flash_attn=flash_attn, n_threads=2) as b:
        a.decode(tokens, 0)
        b.decode(tokens, 0)
        kv_cache.set_slot_bias(a, np.full((L, n), 0.5, np.float32))
        reference = b.decode(nxt, n)
        assert not np.array_equal(a.decode(nxt, n), reference)
        # drop the token decoded under the bias, clear the bias: the same decode must match exactly
        assert llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(a.ptr), 0, n, -1)
        kv_cache.clear_slot_bias(a)
        np.testing.assert_array_equal(a.decode(nxt, n), reference)


def test_merge_drops_the_bias_of_the_merged_sequence(model):
    tokens, nxt = model.tokenize(PROMPT), model.tokenize("the", add_special=False)
    n = len(tokens)
    keep = kv_cache.MergePlan.keep(np.broadcast_to(np.arange(n), (L, H, n)), np.arange(n))
    with runtime.Context(model, n_ctx=256, n_threads=2) as a, runtime.Context(model, n_ctx=256, n_threads=2) as b:
        a.decode(tokens, 0)
        b.decode(tokens, 0)
        kv_cache.set_slot_bias(a, np.full((L, n), -1.0, np.float32))
        kv_cache.apply_plan(a, keep)
        np.testing.assert_array_equal(a.decode(nxt, n), b.decode(nxt, n))


def test_bad_bias_is_refused(model):
    tokens = model.tokenize(PROMPT)
    with runtime.Context(model, n_ctx=256, n_threads=2) as ctx:
        ctx.decode(tokens, 0)
        n = len(tokens)
        for bias, message in [
            (np.zeros((L, n + 1), np.float32), f"bias covers {n + 1} cells, sequence 0 has {n}"),
            (np.where(np.arange(n) == 3, np.nan, 0).astype(np.float32)[None].repeat(L, 0), "is NaN or +inf"),
            (np.where(np.arange(n) == 3, np.inf, 0).astype(np.float32)[None].repeat(L, 0), "is NaN or +inf"),
            (np.zeros(n, np.float32), "bias must be"),
        ]:
            with pytest.raises(kv_cache.NativeError, match=message.replace("+", r"\+")):
                kv_cache.set_slot_bias(ctx, bias)


def test_get_slot_bias_reads_back_what_was_set_and_forgets_freed_cells(model):
    from flowmm_edge.bindings.native import llama_cpp

    tokens = model.tokenize(PROMPT)
    n = len(tokens)
    rng = np.random.default_rng(3)
    bias = rng.normal(size=(L, H, n)).astype(np.float32)
    with runtime.Context(model, n_ctx=256, n_threads=2) as ctx:
        ctx.decode(tokens, 0)
        np.testing.assert_array_equal(kv_cache.get_slot_bias(ctx), np.zeros((L, H, n), np.float32))
        kv_cache.set_slot_bias(ctx, bias)
        np.testing.assert_array_equal(kv_cache.get_slot_bias(ctx), bias)
        kv_cache.set_slot_bias(ctx, bias[:, 0])  # per layer: every KV head reads the layer's row
        np.testing.assert_array_equal(kv_cache.get_slot_bias(ctx), np.repeat(bias[:, :1], H, axis=1))
        # drop the last 5 positions and decode 5 other tokens into the freed cells: they carry nothing
        assert llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx.ptr), 0, n - 5, -1)
        ctx.decode(tokens[:5], n - 5)
        got = kv_cache.get_slot_bias(ctx)
        cells, pos = kv_cache.seq_cells(ctx)
        want = np.where(pos < n - 5, np.repeat(bias[:, :1], H, axis=1)[..., np.minimum(pos, n - 1)], 0)
        np.testing.assert_array_equal(got, want)


def test_a_merge_through_the_compressor_keeps_each_slots_bias(model):
    from flowmm_edge.compression.compressor import Compressor
    from flowmm_edge.methods import METHODS

    tokens, nxt = model.tokenize(PROMPT), model.tokenize("the", add_special=False)
    n = len(tokens)
    labels = np.zeros(n + 8, np.int32)
    bias = np.random.default_rng(4).uniform(-2, 2, size=(L, H, n)).astype(np.float32)
    with runtime.Context(model, n_ctx=256, n_threads=2) as ctx, runtime.Context(model, n_ctx=256, n_threads=2) as ref:
        comp = Compressor(METHODS["snapkv"](sinks=2, window=4), 0.5)
        with comp.observe(ctx, prompt_end=n, labels=labels):
            ctx.decode(tokens, 0)
        kv_cache.set_slot_bias(ctx, bias)
        report = comp.compress(ctx, labels)
        kept = report.plan.src[..., 0]  # per (layer, head) the positions kept, in slot order
        want = np.take_along_axis(bias, kept, axis=-1)
        np.testing.assert_array_equal(kv_cache.get_slot_bias(ctx), want)
        # the same cache built by hand, the bias set on it directly: the next token's logits agree
        ref.decode(tokens, 0)
        kv_cache.apply_plan(ref, report.plan.to_cells(kv_cache.seq_cells(ref)[0]))
        kv_cache.set_slot_bias(ref, want)
        np.testing.assert_array_equal(ctx.decode(nxt, n), ref.decode(nxt, n))


def test_a_restored_state_does_not_inherit_a_bias_set_since(model):
    """The bias is not part of llama.cpp's state: clearing or restoring the sequence drops it, so
    a second method compressing a restored prefill starts from the cache the first one saw."""
    import numpy as np
    from flowmm_edge.bindings import kv_cache, runtime

    tokens = model.tokenize("the secret key is red and the code is 1234")
    with runtime.Context(model, n_ctx=64, n_threads=2) as ctx:
        ctx.decode(tokens, 0)
        state = ctx.state()
        want = ctx.decode([7], len(tokens))
        lay = kv_cache.layout(ctx)
        n = len(kv_cache.seq_cells(ctx)[0])
        kv_cache.set_slot_bias(ctx, np.full((lay.n_layer, lay.n_head_kv, n), 3.0, np.float32))
        ctx.set_state(state)
        assert not np.any(kv_cache.get_slot_bias(ctx))
        np.testing.assert_array_equal(ctx.decode([7], len(tokens)), want)
