"""The learned importance (methods/importance_predictor.py, native/flowmm-predict.cpp): the scores
the cache's backend computes equal numpy applying the same weights to the keys of llama.cpp's
own state serialisation (state_reference), with the Hadamard rotation llama.cpp stores quantized
keys in undone by an independent construction; across cache types, flash attention, a merge and a
save/load. Then the policy that carries a predictor, and FlowMM planning from it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import TINY_PROMPT, span_labels
from flowmm_edge.bindings import kv_cache, runtime
from flowmm_edge.bindings.kv_cache import NativeError
from flowmm_edge.methods import METHODS, registry
from flowmm_edge.calibration import policy
from flowmm_edge.methods.base import MethodError
from flowmm_edge.compression.compressor import Compressor, predicted_scores, rope_geometry
from flowmm_edge.methods.flowmm import FlowMM
from flowmm_edge.methods.importance_predictor import ImportancePredictor, fit_ridge, n_features, spearman
from flowmm_edge.models import tiny as tm
from state_reference import parse_seq_state, seq_state_bytes

SPEC = tm.TINY.text
HD = SPEC.n_embd // SPEC.n_head
L, H = SPEC.n_layer, SPEC.n_head_kv


def _predictor(n_layer, n_head, hd, pairing, seed=0) -> ImportancePredictor:
    rng = np.random.default_rng(seed)
    return ImportancePredictor(pairing, rng.normal(size=(n_layer, n_head, n_features(hd))).astype(np.float32),
                               rng.normal(size=(n_layer, n_head)).astype(np.float32))


def _hadamard(n: int) -> np.ndarray:
    """Sylvester's construction by Kronecker products, orthonormal."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return h / np.sqrt(n)


def _turned_back(k: np.ndarray, pos: np.ndarray, pairing: str, base: float) -> np.ndarray:
    """Keys [n, n_head, hd] cached at `pos`, each pair turned by -pos * base^(-2i/hd) (RoPE's
    rotation, written out here from its definition)."""
    hd = k.shape[-1]
    i = np.arange(hd // 2)
    a, b = (i, i + hd // 2) if pairing == "halves" else (2 * i, 2 * i + 1)
    t = -pos[:, None, None].astype(np.float64) * base ** (-2.0 * i / hd)[None, None, :]
    out = k.copy()
    out[..., a] = k[..., a] * np.cos(t) - k[..., b] * np.sin(t)
    out[..., b] = k[..., a] * np.sin(t) + k[..., b] * np.cos(t)
    return out


def _reference(ctx, pred: ImportancePredictor, n_head: int, hd: int, base: float | None = None) -> np.ndarray:
    """[n_layer, n_head, n_cells] from llama.cpp's serialised keys (cell order), numpy only; with
    `base` (a relative predictor), the keys turned back by RoPE of that base at their positions
    first, and log(1 + distance to the last position) appended."""
    lay = kv_cache.layout(ctx)
    st = parse_seq_state(seq_state_bytes(ctx.ptr, 0), n_head * hd, n_head * lay.head_dim_v)
    out = []
    for l in range(pred.n_layer):
        k = st.k[l].reshape(-1, n_head, hd).astype(np.float64)
        if lay.rot_k:  # stored as H k in blocks of the largest power of two dividing head_dim
            block = max(b for b in (64, 128, 256) if hd % b == 0)
            k = (k.reshape(-1, n_head, hd // block, block) @ _hadamard(block)).reshape(-1, n_head, hd)
        if base is not None:
            k = _turned_back(k, st.pos, pred.rope_pairing, base)
        half = hd // 2
        a, b = (k[..., :half], k[..., half:]) if pred.rope_pairing == "halves" else (k[..., 0::2], k[..., 1::2])
        feat = np.concatenate([k, np.sqrt(a * a + b * b)], axis=-1)  # [n, H, 3hd/2]
        if base is not None:
            dist = np.log1p(st.pos.max() - st.pos).astype(np.float64)
            feat = np.concatenate([feat, np.repeat(dist[:, None, None], n_head, axis=1)], axis=-1)
        out.append(np.einsum("nhf,hf->hn", feat, pred.weights[l].astype(np.float64)) + pred.bias[l][:, None])
    return np.stack(out)


def decode_and_merge_half(ctx, tokens) -> None:
    """Decode `tokens` into sequence 0 and merge them to half with SnapKV, so the kept cells sit
    at scattered positions."""
    comp = Compressor(METHODS["snapkv"](sinks=2, window=4), 0.5)
    with comp.observe(ctx, prompt_end=len(tokens), labels=span_labels(len(tokens))):
        ctx.decode(tokens, 0)
    comp.compress(ctx, span_labels(len(tokens)))
    assert len(kv_cache.seq_cells(ctx)[0]) < len(tokens)


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("kv_type,fa", [("f16", "on"), ("f16", "off"), ("q8_0", "on"), ("q4_0", "on")])
@pytest.mark.parametrize("pairing", ["halves", "adjacent"])
def test_scores_equal_numpy_over_llama_cpps_keys(model, kv_type, fa, pairing):
    pred = _predictor(L, H, HD, pairing)
    with runtime.Context(model, n_ctx=256, n_batch=64, kv_type=kv_type, flash_attn=fa, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT * 2), 0)
        _close(predicted_scores(pred, ctx), _reference(ctx, pred, H, HD))


def _relative(pred: ImportancePredictor, seed: int = 9) -> ImportancePredictor:
    """The same weights, and one for the distance feature."""
    extra = np.random.default_rng(seed).normal(size=pred.weights.shape[:2] + (1,)).astype(np.float32)
    return ImportancePredictor(pred.rope_pairing, np.concatenate([pred.weights, extra], -1), pred.bias, relative=True)


def _rope_base(model) -> float:
    return float(model.meta("llama.rope.freq_base") or 10000.0)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("pairing", ["halves", "adjacent"])
def test_relative_scores_equal_numpy_over_llama_cpps_keys_turned_back(model, kv_type, pairing):
    """A relative predictor: the graph's scores (ggml_rope_ext at -pos, the distance to the last
    position) equal numpy turning llama.cpp's serialised keys back by RoPE's own formula, after a
    merge too (the kept cells sit at scattered positions)."""
    pred = _relative(_predictor(L, H, HD, pairing, seed=5))
    tokens = model.tokenize(TINY_PROMPT * 3)
    with runtime.Context(model, n_ctx=256, n_batch=64, kv_type=kv_type, n_threads=2) as ctx:
        comp = Compressor(METHODS["snapkv"](sinks=2, window=4), 0.5)
        with comp.observe(ctx, prompt_end=len(tokens), labels=span_labels(len(tokens))):
            ctx.decode(tokens, 0)
        _close(predicted_scores(pred, ctx), _reference(ctx, pred, H, HD, base=_rope_base(model)))
        comp.compress(ctx, span_labels(len(tokens)))
        _close(predicted_scores(pred, ctx), _reference(ctx, pred, H, HD, base=_rope_base(model)))


def test_a_relative_predictor_scores_alike_at_any_position_and_one_of_cached_keys_does_not(model):
    """Layer 0's keys depend only on the token and, through RoPE, its position: the same tokens,
    last in the sequence, decoded at positions 0.. and 3000.. score equally with a relative
    predictor (up to f16 storage), and far apart with the keys as cached (predictors before 0.8)."""
    from flowmm_edge.compression.compressor import rope_geometry
    from flowmm_edge.methods.importance_predictor import rope_pairing
    from flowmm_edge.bindings.native import llama_cpp

    pairing = rope_pairing(llama_cpp.llama_model_rope_type(model.ptr))
    assert rope_geometry(model).pairing == pairing
    cached = _predictor(L, H, HD, pairing, seed=6)
    turned = _relative(cached)
    tokens = model.tokenize(TINY_PROMPT * 2)
    filler = model.tokenize("the city " * 2000)[:3000]
    got = {}
    for name, prefix in (("start", []), ("later", filler)):
        with runtime.Context(model, n_ctx=4096, n_batch=512, n_threads=2) as ctx:
            if prefix:
                ctx.decode(prefix, 0)
            ctx.decode(tokens, len(prefix))
            n = len(tokens)
            got[name] = (predicted_scores(turned, ctx)[0, :, -n:], predicted_scores(cached, ctx)[0, :, -n:])
    scale = np.abs(got["start"][0]).max()
    np.testing.assert_allclose(got["later"][0], got["start"][0], atol=5e-3 * scale)
    assert np.abs(got["later"][1] - got["start"][1]).max() > 0.1 * np.abs(got["start"][1]).max()


def test_a_long_sequence_is_scored_in_blocks_like_a_short_one(model):
    """7,000 cells: more than one block of cells per graph (native/flowmm-predict.cpp)."""
    pred = _predictor(L, H, HD, "adjacent", seed=4)
    with runtime.Context(model, n_ctx=8192, n_batch=512, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT * 200)[:7000], 0)
        assert len(kv_cache.seq_cells(ctx)[0]) == 7000
        _close(predicted_scores(pred, ctx), _reference(ctx, pred, H, HD))


def test_quantized_keys_are_rotated_back_on_the_default_model(default_model_path):
    """head_dim 64: llama.cpp stores q8_0 keys Hadamard-rotated; the features are of the keys the
    model computed, so f16 and q8_0 caches score (nearly) alike and both equal numpy."""
    with runtime.Model(default_model_path) as m:
        tokens = m.tokenize("The badge number of the archive room is 7316-K. " * 6)
        got = {}
        for kv_type in ("f16", "q8_0"):
            with runtime.Context(m, n_ctx=256, n_batch=64, kv_type=kv_type, n_threads=2) as ctx:
                ctx.decode(tokens, 0)
                lay = kv_cache.layout(ctx)
                assert lay.rot_k == (kv_type == "q8_0")
                pred = _predictor(lay.n_layer, lay.n_head_kv, lay.head_dim_k, "halves", seed=3)
                got[kv_type] = predicted_scores(pred, ctx)
                _close(got[kv_type], _reference(ctx, pred, lay.n_head_kv, lay.head_dim_k))
        assert np.corrcoef(got["f16"].ravel(), got["q8_0"].ravel())[0, 1] > 0.99


def test_scores_follow_the_cells_through_a_merge_and_a_save_load(model):
    pred = _predictor(L, H, HD, "adjacent", seed=1)
    tokens = model.tokenize(TINY_PROMPT * 2)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        decode_and_merge_half(ctx, tokens)
        merged = predicted_scores(pred, ctx)
        _close(merged, _reference(ctx, pred, H, HD))
        state = ctx.state()
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.set_state(state)
        _close(predicted_scores(pred, ctx), merged)


def test_bad_predictors_are_refused_and_change_nothing(model):
    with runtime.Context(model, n_ctx=128, n_batch=64, n_threads=2) as ctx:
        ctx.decode(model.tokenize(TINY_PROMPT), 0)
        before = seq_state_bytes(ctx.ptr, 0)
        w, b = np.zeros((H, n_features(HD)), np.float32), np.zeros(H, np.float32)
        with pytest.raises(NativeError, match="features"):
            kv_cache.predict_scores(ctx, 0, w[:, 1:], b, "halves")
        with pytest.raises(NativeError, match="out of range"):
            kv_cache.predict_scores(ctx, L, w, b, "halves")
        w[0, 0] = np.nan
        with pytest.raises(NativeError, match="not finite"):
            kv_cache.predict_scores(ctx, 0, w, b, "halves")
        with pytest.raises(NativeError, match="pairing"):
            kv_cache.predict_scores(ctx, 0, w, b, "diagonal")
        w[0, 0] = 0.0
        wr = np.zeros((H, n_features(HD, relative=True)), np.float32)
        with pytest.raises(NativeError, match="features"):  # a relative predictor has one more
            kv_cache.predict_scores(ctx, 0, w, b, "halves", relative=rope_geometry(model))
        with pytest.raises(NativeError, match="RoPE"):
            kv_cache.predict_scores(ctx, 0, wr, b, "halves", relative=dataclasses.replace(rope_geometry(model), n_rot=HD + 2))
        with pytest.raises(NativeError, match="RoPE"):
            kv_cache.predict_scores(ctx, 0, wr, b, "halves", relative=dataclasses.replace(rope_geometry(model), freq_base=0.0))
        assert seq_state_bytes(ctx.ptr, 0) == before


def test_ridge_without_penalty_is_least_squares_and_spearman_is_pearson_of_ranks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * [1, 10, 0.1, 3, 1]
    y = x @ [1, -2, 3, 0.5, 0] + 4 + rng.normal(size=200) * 0.1
    w, b = fit_ridge(x, y, 0.0)
    ref = np.linalg.lstsq(np.c_[x, np.ones(200)], y, rcond=None)[0]
    np.testing.assert_allclose(np.r_[w, b], ref, rtol=1e-6, atol=1e-8)
    a, c = rng.normal(size=50), rng.normal(size=50)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (distinct values: ranks are a permutation)
    assert spearman(a, c) == pytest.approx(np.corrcoef(ranks(a), ranks(c))[0, 1])
    assert spearman(a, np.exp(a)) == pytest.approx(1.0)


def _policy_file(tmp_path, predictor) -> "policy.Policy":
    pol = policy.Policy(model={"name": "x", "architecture": "llama", "n_layer": L, "n_head": SPEC.n_head,
                               "n_head_kv": H, "gguf_header_sha256": "0" * 64},
                        theta=0.25, rho=[0.1, 0.5, 0.2, 0.9], method={"importance": "predicted"}, calibration={},
                        predictor=predictor)
    pol.save(tmp_path / "p.json")
    return tmp_path / "p.json"


def test_a_policy_carries_its_predictor_and_refuses_a_broken_one(tmp_path):
    pred = _predictor(L, H, HD, "adjacent")
    loaded = policy.load(_policy_file(tmp_path, pred))
    np.testing.assert_allclose(loaded.predictor.weights, pred.weights, atol=1e-6)
    method, rho = registry.resolve("flowmm", loaded)
    assert method.importance == "predicted" and method.predictor is loaded.predictor and rho.tolist() == loaded.rho
    assert registry.resolve("flowmm:repeat", loaded)[0].importance == "reconstruction"
    data = json.loads((tmp_path / "p.json").read_text())
    for broken, message in [(dict(data["predictor"], weights=[[[1.0]]]), "do not fit"),
                            (dict(data["predictor"], features="v"), "features"),
                            (dict(data["predictor"], rope_pairing="spiral"), "pairing"),
                            ("weights", "must be an object")]:
        (tmp_path / "b.json").write_text(json.dumps(dict(data, predictor=broken)))
        with pytest.raises(policy.PolicyError, match=message):
            policy.load(tmp_path / "b.json")
    (tmp_path / "b.json").write_text(json.dumps(dict(data, predictor=None, method={})))
    assert policy.load(tmp_path / "b.json").predictor is None
    with pytest.raises(MethodError, match="predictor"):
        registry.resolve("flowmm:predicted")  # no policy, no predictor


def test_flowmm_plans_from_the_predicted_scores(model):
    """The scores FlowMM plans from are exp(numpy's prediction over llama.cpp's keys), by position."""
    pred = _predictor(L, H, HD, "adjacent", seed=2)
    seen = {}

    class Spy(FlowMM):
        def plan(self, layout, stats, n_layer, n_head_kv, slots):
            seen["scores"], seen["positions"] = stats.predicted_scores, layout.positions
            return super().plan(layout, stats, n_layer, n_head_kv, slots)

    tokens = model.tokenize(TINY_PROMPT * 2)
    with runtime.Context(model, n_ctx=256, n_batch=64, n_threads=2) as ctx:
        ctx.decode(tokens, 0)
        _, pos = kv_cache.seq_cells(ctx)
        want = np.exp(_reference(ctx, pred, H, HD))[..., np.argsort(pos)]
        comp = Compressor(Spy(sinks=2, window=4, importance="predicted", predictor=pred, flow_guidance=False), 0.5)
        assert not comp.needs_observation  # nothing to gather while the prompt decodes
        report = comp.compress(ctx, span_labels(len(tokens)))
        assert report.cells_after < len(tokens)
    np.testing.assert_allclose(seen["scores"], want, rtol=1e-3)
    assert np.array_equal(seen["positions"], np.sort(pos))


def test_calibrate_distils_a_predictor_that_ranks_like_the_repeat_pass(tiny_models, tmp_path):
    """On the tiny model: the distilled predictor ranks held-back cells like the teacher (well
    above chance), the policy records its corpus, and a session with that policy merges without
    the repeat pass (no room kept for it) and says nothing about falling back."""
    from flowmm_edge.calibration import calibration_pass
    from flowmm_edge.app.session import Session

    pol = calibration_pass.calibrate(tiny_models[0], progress=False, distill_docs=4, distill_tokens=256)
    info = pol.predictor.info
    assert info["n_documents"] == 4 and 4 * 250 <= info["n_tokens"] <= 4 * 256 and info["n_sources"] > 0
    assert info["held_back_spearman_mean"] > 0.3 and len(info["held_back_spearman_per_layer"]) == L
    assert pol.method["importance"] == "predicted"
    pol.save(tmp_path / "p.json")
    loaded = policy.load(tmp_path / "p.json")
    with Session(tiny_models[0], policy=loaded, budget="48", n_ctx=512, schedule="blocking") as s:
        assert s.compression.room(s.model) == 0 and not s.compression.repeats_context
        s.add_user_turn(TINY_PROMPT * 3)
        "".join(s.reply())
        assert s.cells() <= 48 + s.engine.max_reply
        assert s.stats.merges >= 1 and len(s.compression.repeats.repeated) == 0  # merged, nothing repeated


def test_flowmm_without_a_predictor_says_once_that_it_learns_or_repeats_the_context(tiny_models, capsys):
    from flowmm_edge.app import engine
    from flowmm_edge.app.session import Session

    engine._said.clear()
    for _ in range(2):
        with Session(tiny_models[0], budget="48", n_ctx=512) as s:  # no policy ships for the tiny model
            assert s.policy is None and s.compression.repeats_context and s.engine.importance_state() == "learning"
    err = capsys.readouterr().err
    assert err.count("and learning one from the passes over each conversation") == 1 and "calibrate --distill" in err
    for _ in range(2):
        with Session(tiny_models[0], budget="48", n_ctx=512, policy="none") as s:  # no predictor, no learning
            assert s.policy is None and s.compression.repeats_context and s.engine.importance_state() == "repeat"
    err = capsys.readouterr().err
    assert err.count("no importance predictor") == 1 and "calibrate --distill" in err
    with Session(tiny_models[0], method="snapkv", budget="48", n_ctx=512):
        pass
    assert "no importance predictor" not in capsys.readouterr().err
