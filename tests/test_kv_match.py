"""Key matching on the cache's backend (kv_cache.match_keys, native/flowmm-match.cpp) against
numpy over the keys of llama.cpp's own serialisation of the sequence (state_reference), and
FlowMM planned with it against FlowMM planned by its numpy reference (token_folding.key_matcher)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_PROMPT
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.kv_cache import NativeError
from flowmm_edge.methods.base import Stats, TokenLayout
from flowmm_edge.compression.compressor import Compressor
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.lookm import LookM
from flowmm_edge.models import tiny as tm
from state_reference import parse_seq_state, seq_state_bytes

SPEC = tm.TINY.text
HD = SPEC.n_embd // SPEC.n_head
L, H = SPEC.n_layer, SPEC.n_head_kv


def _filled(model, kv_type):
    ctx = runtime.Context(model, n_ctx=256, n_batch=64, kv_type=kv_type, n_threads=2)
    tokens = model.tokenize(TINY_PROMPT * 2)
    ctx.decode(tokens, 0)
    return ctx, len(tokens)


def _keys_by_cell(ctx) -> dict[int, list[np.ndarray]]:
    """Per layer, [H, kv_size, HD] keys from llama.cpp's state serialisation, by cell."""
    cells, _ = kv_cache.seq_cells(ctx)
    st = parse_seq_state(seq_state_bytes(ctx.ptr, 0), H * HD, H * HD)
    out = {}
    for l in range(L):
        k = np.zeros((H, 256, HD))
        k[:, cells] = st.k[l].reshape(len(cells), H, HD).transpose(1, 0, 2)  # the state lists cells in cell order
        out[l] = k
    return out


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_best_matches_equal_numpy_over_llama_cpps_keys(model, kv_type):
    ctx, n = _filled(model, kv_type)
    with ctx:
        cells, _ = kv_cache.seq_cells(ctx)
        keys = _keys_by_cell(ctx)
        rng = np.random.default_rng(1)
        piv = np.stack([np.sort(rng.choice(cells, 9, replace=False)) for _ in range(H)])
        cand = np.stack([np.setdiff1d(cells, piv[h]) for h in range(H)])
        group = rng.integers(0, 3, cand.shape).astype(np.int32)
        allowed = rng.random((H, 3, 9)) < 0.5
        allowed[0, 2] = False  # candidates of group 2 on head 0 have nowhere to go
        for l in range(L):
            best, cos = kv_cache.match_keys(ctx, l, cand, piv, group, allowed)
            for h in range(H):
                kc, kp = keys[l][h][cand[h]], keys[l][h][piv[h]]
                sim = (kc / np.linalg.norm(kc, axis=1, keepdims=True)) @ (kp / np.linalg.norm(kp, axis=1, keepdims=True)).T
                masked = np.where(allowed[h][group[h]], sim, -np.inf)
                want = np.where(np.isfinite(masked.max(axis=1)), masked.argmax(axis=1), -1)
                np.testing.assert_array_equal(best[h], want)
                ok = want >= 0
                np.testing.assert_allclose(cos[h][ok], sim[np.flatnonzero(ok), want[ok]], atol=1e-5)
            assert np.all(best[0][group[0] == 2] == -1)


def test_many_candidates_are_matched_in_blocks_like_one(model):
    """5,000 candidates against 2,000 pivots: more than one 32 MiB block of similarities (the
    native side matches candidates in blocks to bound its memory); every block's answers equal
    numpy's over the whole matrix."""
    tokens = (model.tokenize(TINY_PROMPT * 200))[:7000]
    with runtime.Context(model, n_ctx=8192, n_batch=512, n_threads=2) as ctx:
        ctx.decode(tokens, 0)
        cells, _ = kv_cache.seq_cells(ctx)
        rng = np.random.default_rng(3)
        piv = np.stack([np.sort(rng.choice(cells, 2000, replace=False)) for _ in range(H)])
        cand = np.stack([np.setdiff1d(cells, piv[h])[:5000] for h in range(H)])
        assert 2000 * H * 4 * 5000 > 32 * 2 ** 20
        group = rng.integers(0, 2, cand.shape).astype(np.int32)
        allowed = rng.random((H, 2, 2000)) < 0.7
        best, cos = kv_cache.match_keys(ctx, 1, cand, piv, group, allowed)
        for h in range(H):
            kc = kv_cache.read_rows(ctx, 1, h, cand[h]).astype(np.float64)
            kp = kv_cache.read_rows(ctx, 1, h, piv[h]).astype(np.float64)
            sim = (kc / np.linalg.norm(kc, axis=1, keepdims=True)) @ (kp / np.linalg.norm(kp, axis=1, keepdims=True)).T
            masked = np.where(allowed[h][group[h]], sim, -np.inf)
            want = masked.argmax(axis=1)
            agree = best[h] == want  # ties at float precision may pick another pivot of the same cosine
            np.testing.assert_allclose(sim[np.arange(len(want)), best[h]], masked.max(axis=1), atol=1e-5)
            assert agree.mean() > 0.999
            np.testing.assert_allclose(cos[h], sim[np.arange(len(want)), best[h]], atol=1e-5)


def test_bad_match_requests_are_refused_and_change_nothing(model):
    ctx, n = _filled(model, "f16")
    with ctx:
        cells, _ = kv_cache.seq_cells(ctx)
        state = ctx.state()
        piv = np.stack([cells[:4]] * H)
        cand = np.stack([cells[4:10]] * H)
        group = np.zeros(cand.shape, np.int32)
        ok = np.ones((H, 1, 4), bool)
        for args, message in [((cand, np.stack([[200, 201, 202, 203]] * H), group, ok), "does not hold"),
                              ((cand, piv, group + 1, ok), "group is out of range"),
                              ((cand[:1], piv[:1], group[:1], ok[:1]), "KV heads")]:
            with pytest.raises(NativeError, match=message):
                kv_cache.match_keys(ctx, 0, *args)
        with pytest.raises(NativeError, match="out of range"):
            kv_cache.match_keys(ctx, L, cand, piv, group, ok)
        assert ctx.state() == state


@pytest.mark.parametrize("method", [FlowMM(flow_guidance=False), FlowMM(orphans="ungated", merge="pivotal"),
                                    FlowMM(importance="window", merge="mean")],
                         ids=["default-merge", "ungated-pivotal", "window-mean"])
def test_flowmm_plans_the_same_on_the_backend_as_with_numpy(model, method):
    method.sinks, method.window = 2, 4
    ctx, n = _filled(model, "f16")
    with ctx:
        labels = np.zeros(n + 8, np.int32)
        labels[10:30] = 1
        rng = np.random.default_rng(2)
        scores = rng.random((L, H, n))
        rho = np.array([0.5, 0.1, 0.6, 0.05])[:L]
        comp = Compressor(method, 0.4, rho=rho)
        from flowmm_edge.compression.reconstruction import PositionScores

        cells, pos = kv_cache.seq_cells(ctx)
        order = np.argsort(pos)
        keys = _keys_by_cell(ctx)
        ref_keys = np.stack([np.stack([keys[l][h][cells[order]] for h in range(H)]) for l in range(L)])
        stats = Stats(reconstruction_scores=scores, window_scores=scores, rho=rho, keys=ref_keys)
        want = method(TokenLayout(pos[order], labels[pos[order]]), stats, L, H, 0.4)  # numpy's key_matcher
        comp.use_reconstruction(PositionScores(pos[order], scores))
        if method.importance == "window":
            comp.use_observed(_FixedWindow(scores, cells, pos))
        report = comp.compress(ctx, labels)
        np.testing.assert_array_equal(report.plan.src, want.src)
        np.testing.assert_allclose(report.plan.weight, want.weight, rtol=1e-6)


class _FixedWindow:
    """Stands for a stopped AttentionStats: column scores in cell order, summed per KV head."""

    def __init__(self, scores_by_pos, cells, pos):
        self.cells, self.positions = cells, pos
        self._by_cell = scores_by_pos[..., np.argsort(np.argsort(pos))]

    def column_scores(self, layer, per_kv_head=False):
        return self._by_cell[layer]


@pytest.mark.parametrize("merge", ["pivotal", "mass"])
def test_lookm_plans_the_same_on_the_backend_as_with_numpy(model, merge):
    """LOOK-M's fold through the backend's matching (as Compressor wires it) against numpy's
    key_matcher over the keys of llama.cpp's own serialisation: the same plan."""
    ctx, n = _filled(model, "f16")
    with ctx:
        labels = np.zeros(n, np.int32)
        labels[10:30] = 1
        scores = np.random.default_rng(3).random((L, H, n))
        cells, pos = kv_cache.seq_cells(ctx)
        by_pos = cells[np.argsort(pos)]
        keys = _keys_by_cell(ctx)
        ref_keys = np.stack([np.stack([keys[l][h][by_pos] for h in range(H)]) for l in range(L)])
        method = LookM(sinks=2, window=4, merge=merge)
        layout = TokenLayout(np.sort(pos), labels)

        def backend(layer, cand, piv, group, allowed):
            return kv_cache.match_keys(ctx, layer, by_pos[cand], by_pos[piv], group, allowed, 0)

        want = method(layout, Stats(prompt_scores=scores, keys=ref_keys), L, H, 0.4)
        got = method(layout, Stats(prompt_scores=scores, matcher=backend), L, H, 0.4)
        assert np.any(got.src[..., 1:] >= 0)  # something was folded
        np.testing.assert_array_equal(got.src, want.src)
        np.testing.assert_allclose(got.weight, want.weight, rtol=1e-6)


def test_one_modality_is_not_observed_and_plans_as_either_mode(model):
    """rho picks cross- or intra-modal matching per layer; over one modality both plan alike, so a
    sequence of one modality is decoded without attention statistics and merged as numpy plans it
    in either mode. Two modalities are observed and take rho from the prompt's flow."""
    from flowmm_edge.compression.reconstruction import PositionScores

    method = FlowMM(orphans="ungated", merge="pivotal", sinks=2, window=4)
    tokens = model.tokenize(TINY_PROMPT * 2)
    n = len(tokens)
    scores = np.random.default_rng(3).random((L, H, n))
    for two in (False, True):
        labels = np.zeros(n + 8, np.int32)
        labels[10:30] = 1 if two else 0
        with runtime.Context(model, n_ctx=256, n_batch=64, kv_type="f16", n_threads=2) as ctx:
            comp = Compressor(method, 0.4)  # no policy: rho would come from the prompt
            with comp.observe(ctx, prompt_end=n, labels=labels) as observed:
                ctx.decode(tokens, 0)
            assert (observed is not None) == two
            cells, pos = kv_cache.seq_cells(ctx)
            order = np.argsort(pos)
            keys = _keys_by_cell(ctx)
            ref_keys = np.stack([np.stack([keys[l][h][cells[order]] for h in range(H)]) for l in range(L)])
            comp.use_reconstruction(PositionScores(pos[order], scores))
            report = comp.compress(ctx, labels)
        assert report.rho_source == ("prompt" if two else "one modality")
        if not two:
            for rho in (np.zeros(L), np.ones(L)):  # intra-modal everywhere (one label's flow: 0), cross everywhere
                stats = Stats(reconstruction_scores=scores, rho=rho, keys=ref_keys)
                want = method(TokenLayout(pos[order], labels[pos[order]]), stats, L, H, 0.4)
                np.testing.assert_array_equal(report.plan.src, want.src)
                np.testing.assert_allclose(report.plan.weight, want.weight, rtol=1e-6)


def test_a_conversation_measures_rho_once_on_its_first_turn_of_two_modalities(model):
    """Without a policy, rho comes from the first turn that holds two modalities and stays for the
    conversation: later turns decode without statistics, and their merge plans with that rho. A
    turn of one modality measures nothing; a reset, or a restore from before, forgets it."""
    from flowmm_edge.compression.compressor import rho_from_flow
    from flowmm_edge.compression.sequence_compressor import SequenceCompressor

    tokens = model.tokenize(TINY_PROMPT * 2)
    n, m = len(tokens), 12
    labels = np.zeros(n + 3 * m, np.int32)
    with runtime.Context(model, n_ctx=256, n_batch=64, kv_type="f16", n_threads=2) as ctx:
        seq = SequenceCompressor(FlowMM(sinks=2, window=4), 0.5)
        with seq.observing(ctx, prompt_end=n, labels=labels) as st:
            ctx.decode(tokens, 0)
        assert st is None and seq.needs_observation, "one modality: nothing observed, the next turn is"
        labels[10:30] = 1
        snap = seq.snapshot()
        with seq.observing(ctx, prompt_end=n + m, labels=labels) as st:
            ctx.decode(tokens[:m], n)
        assert st is not None
        want = np.array([rho_from_flow([st.flow(l)]) for l in range(L)])
        assert not seq.needs_observation
        with seq.observing(ctx, prompt_end=n + 2 * m, labels=labels) as later:
            ctx.decode(tokens[m:2 * m], n + m)
        assert later is None, "rho measured: a later turn needs no statistics"
        by_pos = np.concatenate([tokens, tokens[:2 * m]])
        report = seq.merge(ctx, by_pos, labels[:n + 2 * m])
        assert report.rho_source == "conversation"
        np.testing.assert_array_equal(report.rho, want)
        seq.restore(snap)
        assert seq.needs_observation, "restored to before the measuring turn: measured again"
        with seq.observing(ctx, prompt_end=n + 3 * m, labels=labels) as st:
            ctx.decode(tokens[2 * m:3 * m], n + 2 * m)
        assert st is not None and not seq.needs_observation
        seq.reset()
        assert seq.needs_observation, "a new conversation measures its own"
