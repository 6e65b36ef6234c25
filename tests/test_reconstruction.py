"""Reconstruction scores (flowmm_edge/reconstruction.py) against numpy: the attention mass that
the rows of a repeat-the-context pass send to each cached cell, from the model's own Q (captured
with cb_eval) and K read from a cache that still holds the repeat (an independent decode), in
float64. Then: the pass leaves the cache and its slot bias exactly as they were, and fails
cleanly when the context has no room for it."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.models import tiny as tm
from conftest import TINY_PROMPT
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.compression import reconstruction
from flowmm_edge.compression.compressor import Compressor
from flowmm_edge.methods.base import MethodError
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.bindings.native import llama_cpp
from tensor_capture import Capture
from state_reference import seq_state_bytes

SPEC = tm.TINY.text
HD = SPEC.n_embd // SPEC.n_head
L, H, NQ = SPEC.n_layer, SPEC.n_head_kv, SPEC.n_head


def _numpy_mass(model, context: list[int], repeat: list[int], flash_attn: bool, hidden=()) -> np.ndarray:
    """[len(repeat), L, H, n]: mass each row of `repeat` (decoded right after `context`) sends to the
    context's cells; the softmax leaves out the context's positions in `hidden`, which the decode
    also hides (a -inf slot bias, itself checked against numpy's attention in test_kv_bias.py), so
    the rows' queries at later layers are those of a pass that cannot read them."""
    n = len(context)
    cap = Capture([f"Qcur-{l}" for l in range(L)])
    with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, flash_attn=flash_attn, n_threads=2,
                         cb_eval=cap.callback) as ctx:
        cap.enabled = False
        ctx.decode(context, 0)
        if len(hidden):
            dead = np.zeros((L, n), np.float32)
            dead[:, list(hidden)] = -np.inf  # cells are in position order in a fresh context
            kv_cache.set_slot_bias(ctx, dead)
        cap.enabled = True
        ctx.decode(repeat, n)
        cells, pos = kv_cache.seq_cells(ctx)
        cells = cells[np.argsort(pos)]
        keys = [[kv_cache.read_rows(ctx, l, h, cells, "k").astype(np.float64) for h in range(H)] for l in range(L)]
    mass = np.zeros((len(repeat), L, H, n))
    for l in range(L):
        q = np.concatenate([c.reshape(-1, NQ, HD) for c in cap.calls[f"Qcur-{l}"][2::3]])  # the RoPE'd Q
        q = q.astype(np.float16).astype(np.float64)  # as ggml's f16 mul_mat rounds it
        assert len(q) == len(repeat)
        for t in range(len(repeat)):
            for qh in range(NQ):
                k = keys[l][qh // (NQ // H)][: n + t + 1]
                z = k @ q[t, qh] / np.sqrt(HD)
                z[list(hidden)] = -np.inf
                p = np.exp(z - z.max())
                mass[t, l, qh // (NQ // H)] += (p / p.sum())[:n]
    return mass


@pytest.mark.parametrize("chunk,rows", [(1000, 1000), (1000, 5), (7, 3), (1000, 8), (7, 4)],
                         ids=["one-group", "groups-of-5", "chunks-of-7", "on-device-groups-of-8", "on-device-chunks-of-7"])
@pytest.mark.parametrize("flash_attn", [True, False])
def test_scores_equal_numpy_attention_of_the_repeat_rows(model, chunk, rows, flash_attn):
    """The score: the max over chunks and over groups of `rows` repeated rows (after the prefix,
    whose rows are not counted) of the group's summed mass.
    Groups of 8 and 4 fit the context's batches of 64 and ubatches of 16, so the maximum over groups
    is taken in the statistics' graph; 5, 3 and 1000 do not, and each group is decoded alone."""
    context = model.tokenize(TINY_PROMPT)
    n = len(context)
    tokens = np.asarray(context, np.int32)
    tokens[5:9] = -1  # as if an image sat there: scored as keys, never repeated
    prefix = reconstruction.repeat_prefix(model)
    text = [t for t in tokens.tolist() if t >= 0]
    groups = []
    for a in range(0, len(text), chunk):
        per_row = _numpy_mass(model, context, prefix + text[a:a + chunk], flash_attn)[len(prefix):]  # the chunk's rows
        groups += [per_row[g:g + rows].sum(axis=0) for g in range(0, len(per_row), rows)]
    want = np.max(groups, axis=0)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, flash_attn=flash_attn, n_threads=2) as ctx:
        ctx.decode(context, 0)
        got = reconstruction.reconstruction_scores(ctx, tokens, prefix, chunk=chunk, rows=rows)
    np.testing.assert_array_equal(got.positions, np.arange(n))
    assert got.scores.shape == (L, H, n)
    np.testing.assert_allclose(got.scores, want, rtol=2e-3, atol=2e-4)
    assert np.all(got.scores[..., 5:9] > 0)  # the unrepeated cells are still scored


@pytest.mark.parametrize("flash_attn", [True, False])
def test_the_kept_tail_is_neither_repeated_nor_read(model, flash_attn):
    """kept_tail=k: the last k cells (a merge's recent window) are hidden from the repeat rows (the
    softmax runs over the other cells) and their tokens are not repeated, so they score 0; a later
    pass repeats them once newer cells have taken their place in the tail."""
    context = model.tokenize(TINY_PROMPT)
    n, k, chunk, rows = len(context), 6, 7, 4
    prefix = reconstruction.repeat_prefix(model)
    text = context[:n - k]
    groups = []
    for a in range(0, len(text), chunk):
        per_row = _numpy_mass(model, context, prefix + text[a:a + chunk], flash_attn, hidden=range(n - k, n))
        per_row = per_row[len(prefix):]
        groups += [per_row[g:g + rows].sum(axis=0) for g in range(0, len(per_row), rows)]
    want = np.max(groups, axis=0)
    assert np.all(want[..., n - k:] == 0)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_ubatch=16, flash_attn=flash_attn, n_threads=2) as ctx:
        ctx.decode(context, 0)
        state = ctx.state()
        got = reconstruction.reconstruction_scores(ctx, np.asarray(context), prefix, chunk=chunk, rows=rows, kept_tail=k)
        np.testing.assert_allclose(got.scores, want, rtol=2e-3, atol=2e-4)
        np.testing.assert_array_equal(got.repeated, np.arange(n - k))
        assert ctx.state() == state
        assert not np.any(kv_cache.get_slot_bias(ctx))
        repeats = reconstruction.RepeatedScores()
        repeats.update(ctx, np.asarray(context), kept_tail=k)
        np.testing.assert_array_equal(repeats.repeated, np.arange(n - k))
        more = model.tokenize(" and then some more", add_special=False)
        ctx.decode(more, n)
        repeats.update(ctx, np.asarray(context + more), kept_tail=k)
        np.testing.assert_array_equal(repeats.repeated, np.arange(n + len(more) - k))


@pytest.mark.parametrize("sensitivity", [False, True])
def test_a_merge_keeps_the_hidden_tail_as_it_was(model, sensitivity):
    """The cells the pass hid score 0; a merge keeps them (the method's window) and folds nothing
    into them: their K and V rows after the merge are the rows llama.cpp held before it, and they
    carry no slot bias. The tau gate's quantile is over the scored pivots: none above it absorbs."""
    context = model.tokenize(TINY_PROMPT)
    n, k = len(context), 8
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.decode(context, 0)
        cells, pos = kv_cache.seq_cells(ctx)
        assert pos.tolist() == list(range(n))  # a fresh context: cell i holds position i
        rows0 = {w: [[kv_cache.read_rows(ctx, l, h, cells, w) for h in range(H)] for l in range(L)] for w in "kv"}
        scored = reconstruction.reconstruction_scores(ctx, np.asarray(context), reconstruction.repeat_prefix(model),
                                                      kept_tail=k)
        assert np.all(scored.scores[..., n - k:] == 0)
        # without the gate every candidate folds into its most similar pivot (no cosine floor)
        method = FlowMM(flow_guidance=False, merge="mass", floor=-1.0, sensitivity=sensitivity, pool=1, window=k,
                        importance="reconstruction")
        comp = Compressor(method, budget=n // 2)
        comp.use_reconstruction(scored)
        plan = comp.compress(ctx, np.zeros(n, np.int32)).plan
        slot_cells, slot_pos = kv_cache.seq_cells(ctx)
        cell_of = dict(zip(slot_pos.tolist(), slot_cells.tolist()))
        bias = kv_cache.get_slot_bias(ctx)
        absorbed = (plan.src[..., 1:] >= 0).any(axis=-1)  # [L, H, B]
        tail_slots = 0
        for l in range(L):
            for h in range(H):
                piv = plan.src[l, h, :, 0]
                for j in np.flatnonzero(piv >= n - k):
                    assert not absorbed[l, h, j]
                    c = cell_of[int(plan.slot_pos[j])]
                    for w in "kv":
                        np.testing.assert_array_equal(kv_cache.read_rows(ctx, l, h, [c], w)[0], rows0[w][l][h][piv[j]])
                    assert bias[l, h, list(slot_cells).index(c)] == 0
                    tail_slots += 1
                if sensitivity:
                    imp = scored.scores[l, h, piv]
                    gate = np.quantile(imp[piv < n - k], method.tau_quantile)
                    assert not np.any(absorbed[l, h] & (imp > gate))
        assert tail_slots > 0 and absorbed.any()


def test_the_pass_leaves_cache_and_bias_as_they_were(model):
    context = model.tokenize(TINY_PROMPT)
    with runtime.Context(model, n_ctx=128, n_batch=64, n_threads=2) as ctx:
        ctx.decode(context, 0)
        cells, _ = kv_cache.seq_cells(ctx)
        bias = np.random.default_rng(3).uniform(-1, 1, (L, H, len(cells))).astype(np.float32)
        kv_cache.set_slot_bias(ctx, bias)
        state, logits = ctx.state(), ctx.decode([7], len(context))
        ctx.truncate(len(context))
        for kept_tail in (0, 5):  # 5: the pass hides the last cells under a bias of its own, then puts this one back
            reconstruction.reconstruction_scores(ctx, np.asarray(context), reconstruction.repeat_prefix(model), chunk=9,
                                                 kept_tail=kept_tail)
            assert ctx.state() == state
            np.testing.assert_array_equal(kv_cache.get_slot_bias(ctx), bias)
            np.testing.assert_array_equal(ctx.decode([7], len(context)), logits)
            ctx.truncate(len(context))


def test_an_interrupted_decode_stops_and_leaves_the_sequence_as_llama_cpp_serialised_it(model, capfd):
    """Context.interrupt() stops a decode inside interruptible() (the native abort callback, read
    on the compute thread); llama.cpp drops the stopped ubatch's positions, so the sequence
    serialises as before. Outside interruptible() the flag changes nothing."""
    context = model.tokenize(TINY_PROMPT)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.decode(context, 0)
        before = seq_state_bytes(ctx.ptr, 0)
        ctx.interrupt()
        capfd.readouterr()
        with ctx.interruptible(), pytest.raises(runtime.DecodeInterrupted):
            ctx.decode(context, len(context))
        assert "fail" not in capfd.readouterr().err  # llama.cpp's report of the stop is not shown as an error
        assert seq_state_bytes(ctx.ptr, 0) == before
        logits = ctx.decode([7], len(context))  # interrupt() still set, no longer armed: runs
        ctx.truncate(len(context))
        ctx.clear_interrupt()
        with ctx.interruptible():
            np.testing.assert_array_equal(ctx.decode([7], len(context)), logits)


def test_a_repeat_pass_interrupted_mid_chunk_keeps_the_chunks_before_it(model):
    """The caller interrupts while the second chunk decodes (here: from the progress listener after
    the first, as the chat's main thread would from its own): the pass raises Interrupted with the
    first chunk's positions as repeated, the cache as it was, and a pass that goes on from there
    scores as one that was never stopped."""
    context = model.tokenize(TINY_PROMPT)
    prefix = reconstruction.repeat_prefix(model)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.decode(context, 0)
        state = ctx.state()
        whole = reconstruction.reconstruction_scores(ctx, np.asarray(context), prefix, chunk=9)
        calls = []

        def progress(done, total):
            calls.append(done)
            ctx.interrupt()

        with pytest.raises(reconstruction.Interrupted) as e:
            reconstruction.reconstruction_scores(ctx, np.asarray(context), prefix, chunk=9, progress=progress)
        ctx.clear_interrupt()
        assert calls == [9] and np.array_equal(e.value.repeated, np.arange(9))
        assert ctx.state() == state
        rest = np.asarray(context).copy()
        rest[:9] = -1  # repeated already
        again = reconstruction.reconstruction_scores(ctx, rest, prefix, chunk=9)
        np.testing.assert_allclose(np.maximum(e.value.partial.scores, again.scores), whole.scores, rtol=1e-5,
                                   atol=1e-7)


def test_no_room_or_missing_tokens_is_a_clear_error_and_changes_nothing(model):
    prefix = reconstruction.repeat_prefix(model)
    with runtime.Context(model, n_ctx=128, n_batch=64, n_threads=2) as ctx:
        context = (model.tokenize(TINY_PROMPT) * 20)[:ctx.n_ctx - 20]  # 20 cells left free
        ctx.decode(context, 0)
        state = ctx.state()
        with pytest.raises(reconstruction.ReconstructionError, match="free cells"):
            reconstruction.reconstruction_scores(ctx, np.asarray(context), prefix)
        with pytest.raises(reconstruction.ReconstructionError, match="tokens cover"):
            reconstruction.reconstruction_scores(ctx, np.asarray(context[:-1]), prefix)
        assert ctx.state() == state
        comp = Compressor(FlowMM(importance="reconstruction", flow_guidance=False), budget=16)
        with pytest.raises(MethodError, match="tokens by position"):
            comp.compress(ctx, np.zeros(len(context), np.int32))
        assert ctx.state() == state


def test_scores_follow_positions_not_cells_after_a_merge(model):
    """After a merge frees cells, the repeat lands in cells below the context's: scores stay with their positions."""
    context = model.tokenize(TINY_PROMPT)
    n = len(context)
    prefix = reconstruction.repeat_prefix(model)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.decode(context, 0)
        keep = np.r_[0:4, 12:n]  # evict positions 4..11: their cells are free for the repeat
        comp = Compressor(FlowMM(flow_guidance=False, merge="mass", floor=2.0, importance="reconstruction"),
                          budget=len(keep))
        stats_like = reconstruction.reconstruction_scores(ctx, np.asarray(context), prefix)
        scores = np.zeros_like(stats_like.scores)
        scores[..., keep] = 1.0  # the plan keeps exactly `keep`
        comp.use_reconstruction(reconstruction.PositionScores(stats_like.positions, scores))
        comp.compress(ctx, np.zeros(n, np.int32))
        cells, pos = kv_cache.seq_cells(ctx)
        assert sorted(pos.tolist()) == keep.tolist()
        assert not np.array_equal(np.sort(cells), np.sort(pos))  # cells no longer stand for positions
        tokens = np.asarray(context, np.int32)
        got = reconstruction.reconstruction_scores(ctx, tokens, prefix)
        np.testing.assert_array_equal(got.positions, keep)
        # the same positions left in their own cells, with a hole where 4..11 were (the repeat lands there)
        with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ref:
            ref.decode(context, 0)
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ref.ptr), 0, 4, 12)
            assert kv_cache.seq_cells(ref)[0].tolist() == keep.tolist()
            want = reconstruction.reconstruction_scores(ref, tokens, prefix)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-2, atol=3e-4)  # f16 sums in another order (0.5% on an EPYC without AVX-512)


def test_a_chat_merge_repeats_only_the_text_added_since_the_last_one(tiny_models, monkeypatch):
    """Session: the first merge repeats every text position but the recent window it keeps (the
    method's `window` last cells); a later merge repeats only the positions no pass has fed (that
    window, the reply, the new turn) but its own window, and a position scored before is planned
    from max(its old score, what the new pass sends it)."""
    from flowmm_edge.app.session import Session

    passes, used = [], []
    real_pass, real_use = reconstruction.reconstruction_scores, Compressor.use_reconstruction

    def spy_pass(ctx, tokens, prefix, seq_id=0, **kw):
        out = real_pass(ctx, tokens, prefix, seq_id, **kw)
        passes.append((np.asarray(tokens).copy(), out))
        return out

    def spy_use(self, scores):
        used.append(scores)
        real_use(self, scores)

    monkeypatch.setattr(reconstruction, "reconstruction_scores", spy_pass)
    monkeypatch.setattr(Compressor, "use_reconstruction", spy_use)
    text, _ = tiny_models
    with Session(text, budget=40, n_ctx=256, max_reply=4, n_threads=2, method=FlowMM(flow_guidance=False),
                 schedule="blocking") as s:
        s.chat("the secret key is red and the code is 1234 please tell me")
        s.add_user_turn("what color is the cat")
    assert len(passes) == len(used) == 2
    (tok1, out1), (tok2, out2) = passes
    window = FlowMM().window
    assert np.all(tok1[out1.positions] >= 0)  # a text-only cache
    np.testing.assert_array_equal(out1.repeated, out1.positions[:-window])
    not_fed = ~np.isin(out2.positions, out1.repeated)
    np.testing.assert_array_equal(tok2[out2.positions] >= 0, not_fed)
    np.testing.assert_array_equal(out2.repeated, out2.positions[:-window][not_fed[:-window]])
    old = out2.positions <= out1.positions.max()
    new = ~old
    assert old.sum() == 40  # the slots the first merge kept
    assert np.any(old & not_fed)  # the first merge's window, repeated now
    np.testing.assert_array_equal(used[1].positions, out2.positions)
    np.testing.assert_array_equal(used[1].scores[..., new], out2.scores[..., new])
    np.testing.assert_array_equal(used[1].scores[..., old],
                                  np.maximum(out2.scores[..., old], out1.at(out2.positions[old])))
