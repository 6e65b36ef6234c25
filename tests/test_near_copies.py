"""Near-copies, the student's input that counts how many keys of the sequence look like a cell's
own (native/flowmm-predict.cpp, flowmm_kv_near_copies; methods/importance_predictor.near_copies):
the graph's values equal numpy computing the definition from llama.cpp's own state serialisation
(keys turned back by RoPE written out from its formula), exactly and from a strided sample, in
several blocks, after a merge; a predictor with it scores as numpy does; bad requests are refused
and change nothing; a policy carries it; the learner and `calibrate --distill` fit it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY_PROMPT
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.kv_cache import NativeError
from flowmm_edge.calibration import policy
from flowmm_edge.compression.compressor import predicted_scores, rope_geometry, sequence_near_copies
from flowmm_edge.methods.importance_predictor import (NEAR_COPIES, ImportancePredictor, PredictorError, n_features,
                                                      near_copies)
from state_reference import parse_seq_state, seq_state_bytes
from test_importance_predictor import (H, HD, L, _hadamard, _policy_file, _reference, _rope_base, _turned_back,
                                       decode_and_merge_half)

BETA = 20.0


def _keys_turned_back(ctx, layer: int, pairing: str, base: float) -> np.ndarray:
    """[n_head, n, hd] keys of the cells (cell order) from llama.cpp's serialised state, the
    Hadamard rotation of quantized K undone, turned back by RoPE at their positions."""
    lay = kv_cache.layout(ctx)
    st = parse_seq_state(seq_state_bytes(ctx.ptr, 0), lay.n_head_kv * lay.head_dim_k, lay.n_head_kv * lay.head_dim_v)
    k = st.k[layer].reshape(-1, lay.n_head_kv, lay.head_dim_k).astype(np.float64)
    if lay.rot_k:
        block = max(b for b in (64, 128, 256) if lay.head_dim_k % b == 0)
        k = (k.reshape(-1, lay.n_head_kv, lay.head_dim_k // block, block) @ _hadamard(block)).reshape(k.shape)
    return _turned_back(k, st.pos, pairing, base).transpose(1, 0, 2)


def _definition(k: np.ndarray, beta: float, max_reference: int) -> np.ndarray:
    """log mean_j exp(beta cos(k_i, k_j)) over all j, written from the definition: every pair
    when n <= max_reference; else the own term exp(beta) plus (n - 1) times the mean of the
    other sampled keys' terms, the sample every ceil(n / max_reference)-th key."""
    n = len(k)
    u = k / np.linalg.norm(k, axis=1, keepdims=True)
    terms = np.exp(beta * (u @ u.T))
    if n <= max_reference:
        return np.log(terms.mean(1))
    sample = np.arange(0, n, -(-n // max_reference))
    out = np.empty(n)
    for i in range(n):
        others = [j for j in sample if j != i]
        out[i] = np.log((np.exp(beta) + (n - 1) * terms[i, others].mean()) / n)
    return out


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_near_copies_equal_the_definition_over_llama_cpps_keys(model, kv_type):
    """A repeated prompt: its tokens' keys have near-copies, so the values spread over several nats."""
    rope = rope_geometry(model)
    with runtime.Context(model, n_ctx=256, n_batch=64, kv_type=kv_type, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT * 3), 0)
        for layer in range(L):
            want = np.stack([_definition(k, BETA, 10**6) for k in _keys_turned_back(ctx, layer, rope.pairing,
                                                                                       _rope_base(model))])
            got = kv_cache.near_copies(ctx, layer, rope, BETA, 10**6)
            _close(got, want)
            assert np.ptp(want) > 1.0
            np.testing.assert_allclose(near_copies(_keys_turned_back(ctx, layer, rope.pairing, _rope_base(model))[0],
                                                   BETA, 10**6), want[0], rtol=1e-9, atol=1e-9)


def test_a_long_sequence_from_a_strided_sample_in_several_blocks(model):
    """3,000 cells against at most 2,048: every second cell is the reference, and the cosines of
    3,000 x 1,500 x KV heads take more than one graph (FLOWMM_NEAR_COPIES_FLOATS)."""
    rope = rope_geometry(model)
    with runtime.Context(model, n_ctx=4096, n_batch=512, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT * 100)[:3000], 0)
        k = _keys_turned_back(ctx, 1, rope.pairing, _rope_base(model))
        got = kv_cache.near_copies(ctx, 1, rope, BETA, 2048)
        for h in range(H):
            _close(got[h], _definition(k[h], BETA, 2048))
            np.testing.assert_allclose(near_copies(k[h], BETA, 2048), _definition(k[h], BETA, 2048), atol=1e-9)


def test_a_reference_of_one_key_still_counts_each_cell_itself(model):
    """max_reference 1 on 2+ cells: the reference is the first cell alone, so for it no other
    sampled key is left; its value is its own term alone, and every value is finite."""
    rope = rope_geometry(model)
    with runtime.Context(model, n_ctx=128, n_batch=64, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT)[:9], 0)
        got = kv_cache.near_copies(ctx, 0, rope, BETA, 1)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got[:, 0], BETA - np.log(9), atol=1e-4)
        k = _keys_turned_back(ctx, 0, rope.pairing, _rope_base(model))
        np.testing.assert_allclose(near_copies(k[0], BETA, 1), got[0], atol=1e-3)


def test_near_copies_follow_the_cells_through_a_merge(model):
    rope = rope_geometry(model)
    tokens = model.tokenize(TINY_PROMPT * 3)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        decode_and_merge_half(ctx, tokens)
        k = _keys_turned_back(ctx, 0, rope.pairing, _rope_base(model))
        _close(kv_cache.near_copies(ctx, 0, rope, BETA, 10**6), np.stack([_definition(kh, BETA, 10**6) for kh in k]))


def _with_near_copies(seed: int = 2) -> ImportancePredictor:
    rng = np.random.default_rng(seed)
    return ImportancePredictor("halves", rng.normal(size=(L, H, n_features(HD, True, True))).astype(np.float32),
                               rng.normal(size=(L, H)).astype(np.float32), relative=True,
                               near_copies={"beta": BETA, "max_reference": 64})


def test_a_near_copies_predictor_scores_as_numpy(model):
    """The key features' scores (the relative predictor's reference) plus the last weight times
    the definition, sampled here (64 of 120 cells)."""
    rope = rope_geometry(model)
    pred = ImportancePredictor(rope.pairing, _with_near_copies().weights, _with_near_copies().bias, relative=True,
                               near_copies={"beta": BETA, "max_reference": 64})
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT * 3)[:120], 0)
        keys_only = ImportancePredictor(rope.pairing, pred.weights[..., :-1], pred.bias, relative=True)
        want = _reference(ctx, keys_only, H, HD, base=_rope_base(model))
        for layer in range(L):
            k = _keys_turned_back(ctx, layer, rope.pairing, _rope_base(model))
            want[layer] += pred.weights[layer, :, -1:] * np.stack([_definition(kh, BETA, 64) for kh in k])
        np.testing.assert_allclose(predicted_scores(pred, ctx), want, rtol=2e-4, atol=2e-3)
        np.testing.assert_allclose(sequence_near_copies(ctx, pred.near_copies)[1],
                                   kv_cache.near_copies(ctx, 1, rope, BETA, 64))


def test_bad_near_copies_requests_are_refused_and_change_nothing(model):
    import dataclasses

    rope = rope_geometry(model)
    with runtime.Context(model, n_ctx=128, n_batch=64, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT), 0)
        before = seq_state_bytes(ctx.ptr, 0)
        for beta in (0.0, -1.0, float("nan"), 200.0):
            with pytest.raises(NativeError, match="beta"):
                kv_cache.near_copies(ctx, 0, rope, beta, 64)
        with pytest.raises(NativeError, match="max_reference"):
            kv_cache.near_copies(ctx, 0, rope, BETA, 0)
        with pytest.raises(NativeError, match="out of range"):
            kv_cache.near_copies(ctx, L, rope, BETA, 64)
        with pytest.raises(NativeError, match="RoPE"):
            kv_cache.near_copies(ctx, 0, dataclasses.replace(rope, n_rot=HD + 2), BETA, 64)
        with pytest.raises(NativeError, match="RoPE"):
            kv_cache.near_copies(ctx, 0, dataclasses.replace(rope, freq_scale=0.0), BETA, 64)
        assert seq_state_bytes(ctx.ptr, 0) == before


def test_a_policy_carries_near_copies_and_refuses_them_broken(tmp_path):
    pred = _with_near_copies()
    loaded = policy.load(_policy_file(tmp_path, pred))
    assert loaded.predictor.near_copies == {"beta": BETA, "max_reference": 64}
    np.testing.assert_allclose(loaded.predictor.weights, pred.weights, atol=1e-6)
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["predictor"]["features"].endswith("+near_copies")
    for broken in ({"beta": 0, "max_reference": 64}, {"beta": BETA}, {"beta": BETA, "max_reference": 1.5}, [20]):
        (tmp_path / "b.json").write_text(json.dumps(dict(data, predictor=dict(data["predictor"], near_copies=broken))))
        with pytest.raises(policy.PolicyError, match="near"):
            policy.load(tmp_path / "b.json")
    missing = {k: v for k, v in data["predictor"].items() if k != "near_copies"}
    (tmp_path / "b.json").write_text(json.dumps(dict(data, predictor=missing)))
    with pytest.raises(policy.PolicyError, match="near_copies"):
        policy.load(tmp_path / "b.json")
    short = ImportancePredictor("halves", pred.weights[..., :-1], pred.bias, relative=True, near_copies=pred.near_copies)
    with pytest.raises(PredictorError, match="features"):  # one weight short of a near-copies predictor
        short.check_layout(kv_cache.KVLayout(L, H, HD, HD, 256, 1, 1, 1, 0, 0, 0))
    with pytest.raises(PredictorError, match="relative"):
        ImportancePredictor("halves", pred.weights, pred.bias, near_copies=pred.near_copies)


def test_calibrate_distill_collects_near_copies_of_each_whole_document_and_fits_them(model):
    """distillation.collect: each document's near-copies (position order) equal the definition
    over its own keys turned back (here from the float16 keys the samples keep), and the fit's
    predictor carries them."""
    from flowmm_edge.calibration import distillation

    text = " ".join(f"the record {i % 7} holds value {i * 37 % 101} and the cat is red." for i in range(200))
    docs = distillation.documents(model, 3, 160, texts=[("synthetic", text)])
    samples = distillation.collect_documents(model, docs, 160, n_threads=2)
    assert samples.near_copies_params == NEAR_COPIES
    for d in range(3):
        for layer in range(L):
            for h in range(H):
                want = _definition(samples.k[d][layer, h].astype(np.float64), NEAR_COPIES["beta"], NEAR_COPIES["max_reference"])
                np.testing.assert_allclose(samples.near_copies[d][layer, h], want, atol=0.05)
    pred, info = distillation.fit(samples, rope_geometry(model).pairing)
    assert pred.near_copies == samples.near_copies_params and pred.weights.shape == (L, H, n_features(HD, True, True))
    assert np.all(pred.weights[..., -1] != 0)


def test_the_learner_takes_each_span_cells_near_copies_in_its_whole_sequence(tiny_models, tmp_path, monkeypatch):
    """A conversation's first merge: the learner's near-copies input of the repeated span equals
    the definition over every key of the sequence at that moment (llama.cpp's serialisation), not
    over the span's own keys."""
    from flowmm_edge.app.session import Session
    from flowmm_edge.calibration import self_distillation
    from flowmm_edge.models import gguf_file

    monkeypatch.setenv("FLOWMM_POLICY_DIR", str(tmp_path / "policies"))
    copy = gguf_file.renamed_copy(tiny_models[0], tmp_path / "copy.gguf")
    seen = []
    real_observe, real_add = self_distillation.ImportanceLearner.observe, self_distillation.ImportanceLearner.add

    def observe(self, ctx, seq_id, scored, positions):
        rope = rope_geometry(ctx.model)
        base = float(ctx.model.meta("llama.rope.freq_base") or 10000.0)
        lay = kv_cache.layout(ctx)
        st = parse_seq_state(seq_state_bytes(ctx.ptr, seq_id), lay.n_head_kv * lay.head_dim_k,
                             lay.n_head_kv * lay.head_dim_v)
        want = np.stack([np.stack([_definition(kh, BETA, NEAR_COPIES["max_reference"])
                                   for kh in _keys_turned_back(ctx, layer, rope.pairing, base)])
                         for layer in range(lay.n_layer)])  # [L, H, n] in cell order
        seen.append({"want": want, "pos": st.pos, "positions": np.asarray(positions)})
        return real_observe(self, ctx, seq_id, scored, positions)

    def add(self, k, teacher, distance=None, near=None):
        seen[-1]["near"] = near
        return real_add(self, k, teacher, distance, near)

    monkeypatch.setattr(self_distillation.ImportanceLearner, "observe", observe)
    monkeypatch.setattr(self_distillation.ImportanceLearner, "add", add)
    text = " ".join(f"record {i} has the value {1000 + 7 * i}." for i in range(40))
    with Session(copy, method="flowmm", budget=48, n_ctx=512, max_reply=4, n_threads=2) as s:
        s.background = False
        s.add_user_turn(text)
        list(s.reply())
        assert s.merge()
    got = [x for x in seen if x.get("near") is not None]
    assert got
    for x in got:
        where = {p: i for i, p in enumerate(x["pos"].tolist())}
        at = [where[p] for p in x["positions"].tolist() if p in where]
        assert len(at) < len(x["pos"])  # a span, against more keys than its own
        np.testing.assert_allclose(x["near"], x["want"][..., at], rtol=1e-4, atol=1e-3)
