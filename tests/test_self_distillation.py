"""Self-distillation (calibration/self_distillation.py): a model with no predictor learns one from its
own merges' repeat passes. References: the closed-form ridge of importance_predictor.fit_ridge on
the concatenated data (numpy), and the repeat pass itself (the learning merges must run it; the
merges after the switch must not)."""

from __future__ import annotations


import numpy as np
import pytest

from flowmm_edge.app.session import Session
from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.compression import reconstruction
from flowmm_edge.calibration import self_distillation
from flowmm_edge.methods.importance_predictor import NEAR_COPIES, fit_ridge
from flowmm_edge.models import gguf_file


def test_ridge_from_moments_equals_the_closed_form_on_all_the_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) * rng.uniform(0.1, 5, 12) + rng.normal(size=12)
    y = x @ rng.normal(size=12) + rng.normal(size=500)
    m = self_distillation.RidgeMoments(1, 1, 12)
    for a in range(0, 500, 97):  # in uneven pieces, as spans come
        m.add(0, 0, x[a:a + 97], y[a:a + 97])
    w, b = m.solve(0, 0, ridge=1e-3)
    w_ref, b_ref = fit_ridge(x, y, 1e-3)
    np.testing.assert_allclose(w, w_ref, rtol=1e-6, atol=1e-9)
    assert b == pytest.approx(b_ref, rel=1e-6, abs=1e-9)


def test_an_unseen_model_learns_its_predictor_saves_it_and_then_merges_without_the_repeat_pass(
        tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMM_POLICY_DIR", str(tmp_path / "policies"))
    monkeypatch.setattr(self_distillation, "MIN_TOKENS", 200)
    monkeypatch.setattr(self_distillation, "FIT_EVERY", 100)
    monkeypatch.setattr(self_distillation, "GOOD_SPEARMAN", -1.0)  # the tiny model's ranks mean little: any fit
    model = gguf_file.renamed_copy(tiny_models[0], tmp_path / "copy.gguf")
    a, b = tiny_models[0].read_bytes(), model.read_bytes()  # one byte of the header differs, nothing else
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert gguf_file.read_text_model(model).name[1:] == gguf_file.read_text_model(tiny_models[0]).name[1:]
    assert policy_mod.choose("auto", model) is None
    passes = []
    real = reconstruction.reconstruction_scores
    monkeypatch.setattr(reconstruction, "reconstruction_scores", lambda *a, **kw: passes.append(1) or real(*a, **kw))
    text = " ".join(f"record {i} has the value {1000 + 7 * i}." for i in range(40))
    settings = dict(method="flowmm", budget=48, n_ctx=512, max_reply=4, n_threads=2)
    with Session(model, **settings) as s:
        assert s.engine.importance_state() == "learning"
        s.background = False
        turns = 0
        while s.engine.importance_state() == "learning" and turns < 12:
            s.reset()  # each turn begins a conversation: the learner takes text merged for the first time
            s.add_user_turn(text)
            list(s.reply())
            assert s.merge()
            turns += 1
        assert s.engine.importance_state() == "predicted", s.engine.learner.progress
        learned = s.engine.policy
        info = learned.calibration
        assert info["source"] == "self-distillation" and info["n_tokens"] >= 200 and info["n_documents"] >= 4
        assert learned.predictor.weights.shape[:2] == (4, 2) and learned.model == policy_mod.fingerprint(model)
        assert learned.predictor.near_copies == NEAR_COPIES  # every new fit counts each key's near-copies
        assert learned.rho is None  # text alone: no cross-modal flow seen, so rho stays estimated per prompt
        assert s.compression._fresh().rho is None
        # the same session goes on with the predictor: its next merge runs no repeat pass
        n = len(passes)
        s.add_user_turn(text)
        list(s.reply())
        assert s.merge() and len(passes) == n
    # the next start finds the learned policy for this very model, not for the original
    assert self_distillation.learned_path(policy_mod.fingerprint(model)).is_file()
    with Session(model, **settings) as s2:
        assert s2.engine.importance_state() == "predicted"
    assert policy_mod.choose("auto", tiny_models[0]) is None
    with Session(model, policy="none", **settings) as s3:  # --policy none: no predictor, no learning
        assert s3.engine.importance_state() == "repeat"


def test_the_learner_takes_a_conversations_text_up_to_its_first_merge_and_not_after(tiny_models, tmp_path, monkeypatch,
                                                                                   capsys):
    """A span repeated on a sequence merged before feeds the merge (the repeat pass still scores
    it) but not the learner; the next conversation's first merge does."""
    monkeypatch.setenv("FLOWMM_POLICY_DIR", str(tmp_path / "policies"))
    model = gguf_file.renamed_copy(tiny_models[0], tmp_path / "copy.gguf")
    passes = []
    real = reconstruction.reconstruction_scores
    monkeypatch.setattr(reconstruction, "reconstruction_scores", lambda *a, **kw: passes.append(1) or real(*a, **kw))
    text = " ".join(f"record {i} has the value {1000 + 7 * i}." for i in range(40))
    with Session(model, method="flowmm", budget=48, n_ctx=512, max_reply=4, n_threads=2) as s:
        s.background = False
        learner = s.engine.learner

        def turn():
            s.add_user_turn(text)
            list(s.reply())
            assert s.merge()

        turn()  # (its prompt is longer than the free room: merged once while it prefills, then after the reply)
        first, skipped = learner.moments.n.copy(), learner.progress.skipped_tokens
        assert learner.progress.n_documents == 1 and first.min() >= self_distillation.MIN_SPAN
        said = capsys.readouterr().err  # the progress, said once per conversation start learned from
        assert f"learning importance from {learner.progress.n_tokens:,} of at least" in said and "(1 conversation" in said
        n = len(passes)
        turn()  # the same conversation, merged before
        assert len(passes) > n  # the teacher scored this merge
        assert learner.progress.n_documents == 1 and np.array_equal(learner.moments.n, first)
        assert learner.progress.skipped_tokens >= skipped + self_distillation.MIN_SPAN
        assert "learning importance" not in capsys.readouterr().err  # nothing new learned, nothing said
        s.reset()
        turn()  # a new conversation
        assert learner.progress.n_documents == 2 and np.all(learner.moments.n > first)


def _span(rng, w, n=1024, noise=0.2, d=8):
    k = rng.normal(size=(1, 1, n, d)).astype(np.float32)
    signal = k[0, 0] @ w
    teacher = np.exp(signal + noise * rng.normal(size=n))[None, None].astype(np.float32)
    return k, teacher


@pytest.mark.parametrize("predictable", [True, False])
def test_a_fit_counts_once_it_has_seen_enough_tokens_and_ranks_above_the_floor(predictable):
    """The switch rule on spans made with numpy: a teacher log-linear in the keys is learned, and
    its fit is good at the first fit after MIN_TOKENS (not before); a teacher the keys do not
    predict is never taken, however many tokens it saw."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=8)
    learner = self_distillation.ImportanceLearner({"name": "synthetic"}, "halves", 1, 1, 8)
    took_at = None
    for span in range(16):
        k, teacher = _span(rng, w if predictable else np.zeros(8))
        learner.add(k, teacher)
        if learner.ready() is not None:
            took_at = learner.progress.n_tokens
            break
    rank = learner.progress.spearman
    if predictable:
        assert took_at is not None and self_distillation.MIN_TOKENS <= took_at < self_distillation.MIN_TOKENS + 2048
        assert rank >= self_distillation.GOOD_SPEARMAN
    else:
        assert took_at is None and learner.progress.n_tokens >= 2 * self_distillation.MIN_TOKENS
        assert rank < self_distillation.GOOD_SPEARMAN
