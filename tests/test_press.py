"""flowmm_edge.press on llama-cpp-python's own `Llama` (tiny model): presses are the methods'
dataclasses plus a compression ratio; attached, they keep a long completion inside the Llama's
cells. The references are llama-cpp-python itself (no press, or a fresh Llama) and llama.cpp's
own serialisation of the sequence (state_reference)."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
from llama_cpp import Llama

from flowmm_edge.calibration import policy as policy_mod
from flowmm_edge.methods import METHODS
from flowmm_edge.press import PRESSES, FlowMMPress, PressError, SnapKVPress, StreamingLLMPress
from state_reference import parse_seq_state, seq_state_bytes

N_CTX = 256  # llama.cpp rounds a context up to a multiple of 256 cells
LONG = " ".join(f"word{i}" for i in range(200))  # about 610 tokens: more than the cells


@pytest.fixture(scope="module")
def llm(tiny_models):
    m = Llama(model_path=str(tiny_models[0]), n_ctx=N_CTX, n_batch=64, verbose=False, seed=0)
    yield m
    m.close()


def complete(llm, prompt: str, n: int = 6) -> str:
    return llm.create_completion(prompt, max_tokens=n, temperature=0)["choices"][0]["text"]


def test_every_method_but_full_has_a_press_with_its_settings_and_a_ratio():
    assert set(PRESSES) == set(METHODS) - {"full"}
    for name, press in PRESSES.items():
        fields = {f.name for f in dataclasses.fields(press)}
        extra = {"compression_ratio"} | ({"policy"} if name == "flowmm" else set())
        assert fields == {f.name for f in dataclasses.fields(METHODS[name])} | extra, name
        assert press().name == name
    p = SnapKVPress(compression_ratio=0.9, window=16, kernel=5)
    assert (p.compression_ratio, p.window, p.kernel) == (0.9, 16, 5)
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(PressError, match="compression_ratio"):
            SnapKVPress(compression_ratio=bad)
    with pytest.raises(Exception, match="merge rule"):
        FlowMMPress(merge="nonsense")


def test_a_press_that_never_needs_to_compress_changes_nothing(llm):
    prompt = "the cat sat on the mat and the dog"
    llm.reset()
    plain = complete(llm, prompt, 10)
    llm.reset()
    with FlowMMPress().attach(llm) as ap:
        pressed = complete(llm, prompt, 10)
        assert ap.compressions == 0
    assert pressed == plain


def test_a_prompt_longer_than_the_cache_runs_in_its_cells(llm):
    llm.reset()
    with pytest.raises(ValueError, match="exceed context window"):  # llama-cpp-python alone
        complete(llm, LONG)
    llm.reset()
    with StreamingLLMPress(compression_ratio=0.5, sinks=4, window=16).attach(llm) as ap:
        complete(llm, LONG, 6)
        n = llm.n_tokens
        assert n > 2 * ap.n_ctx and ap.compressions >= 2, (n, ap.compressions)
        st = parse_seq_state(seq_state_bytes(llm._ctx.ctx, 0), *_kv_widths(llm))
        pos = np.sort(st.pos)
        assert len(pos) <= ap.n_ctx
        # StreamingLLM keeps the 4 sinks and the most recent positions, up to the last one decoded
        # (the last sampled token is not decoded: Llama decodes a token when it samples the next)
        assert list(pos[:4]) == [0, 1, 2, 3]
        assert np.array_equal(pos[4:], np.arange(pos[4], pos[4] + len(pos) - 4))
        assert pos[-1] == n - 1
    assert llm.n_tokens == 0  # detached with more positions than the Llama indexes: it starts afresh
    assert complete(llm, "the cat", 3) is not None


def test_a_history_cut_inside_merged_cells_is_prefilled_again(llm, tiny_models):
    """A prompt sharing only a short prefix with a compressed history must answer as a fresh Llama
    with the same press does, not from slots that merged the old history's tokens."""
    other = "the cat sat " + " ".join(f"item{i}" for i in range(100))
    llm.reset()
    press = SnapKVPress(compression_ratio=0.5, window=16)
    with press.attach(llm) as ap:
        complete(llm, "the cat sat " + LONG)
        assert ap.compressions >= 1
        after_history = complete(llm, other, 8)
    with contextlib.closing(Llama(model_path=str(tiny_models[0]), n_ctx=N_CTX, n_batch=64, verbose=False, seed=0)) as fresh:
        with press.attach(fresh):
            fresh_answer = complete(fresh, other, 8)
    assert after_history == fresh_answer


def test_a_continued_history_decodes_only_the_new_tokens(llm):
    llm.reset()
    with SnapKVPress(compression_ratio=0.5, window=16).attach(llm) as ap:
        first = LONG + " and then"
        out = complete(llm, first, 4)
        evaluated = []
        real = ap._orig_eval
        ap._orig_eval = lambda batch: evaluated.append(len(batch)) or real(batch)
        follow = " the end"
        complete(llm, first + out + follow, 2)
        # the new text (and at most the last reply token, never decoded) plus one sampled token
        assert 0 < sum(evaluated) <= len(llm.tokenize(follow.encode(), add_bos=False)) + 4


def test_refused_setups_name_the_problem(tiny_models):
    with contextlib.closing(Llama(model_path=str(tiny_models[0]), n_ctx=128, logits_all=True, verbose=False)) as m:
        with pytest.raises(PressError, match="logits_all"):
            SnapKVPress().attach(m)
    with contextlib.closing(Llama(model_path=str(tiny_models[0]), n_ctx=64, verbose=False)) as m:
        with pytest.raises(PressError, match="no room"):
            FlowMMPress(window=128).attach(m)  # 256 cells (the smallest llama.cpp makes) < 2 x 132 kept


def _kv_widths(llm):
    from flowmm_edge.bindings import kv_cache

    lay = kv_cache.layout(llm._ctx.ctx)
    return lay.n_head_kv * lay.head_dim_k, lay.n_head_kv * lay.head_dim_v


def test_flowmm_press_scores_with_the_policys_predictor_where_the_model_has_one(default_model_path, monkeypatch, tmp_path):
    """As chat and serve do: on the default model (whose policy ships with a predictor) the press
    merges without ever running the repeat pass; `policy=None` keeps the repeat pass."""
    from flowmm_edge.compression import reconstruction

    calls = []
    real = reconstruction.reconstruction_scores
    monkeypatch.setattr(reconstruction, "reconstruction_scores", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    m = Llama(model_path=str(default_model_path), n_ctx=N_CTX, n_batch=64, verbose=False, seed=0)
    try:
        with FlowMMPress(compression_ratio=0.5).attach(m) as ap:
            assert ap.seq.method.importance == "predicted" and ap.seq.policy is not None
            # chat's settings for the predictor, where the press left FlowMM's defaults
            assert (ap.seq.method.window, ap.seq.method.pool, ap.seq.method.value_norm) == (8, 3, True)
            complete(m, " ".join(f"item {i} is red." for i in range(60)), 4)
            assert ap.compressions >= 1 and not calls
        m.reset()
        with FlowMMPress(compression_ratio=0.5, policy=None).attach(m) as ap:
            assert ap.seq.method.importance == "reconstruction" and ap.seq.policy is None
            assert ap.seq.method.value_norm  # chat's setting for the repeat pass
        with FlowMMPress(compression_ratio=0.5, window=16).attach(m) as ap:
            assert (ap.seq.method.window, ap.seq.method.pool) == (16, 3)  # what the caller set is kept
        # a policy's own settings and theta, as chat runs them, not the shipped policy's constants
        shipped = policy_mod.shipped_for(default_model_path)
        mine = tmp_path / "mine.json"
        dataclasses.replace(shipped, theta=0.4, method={**shipped.method, "window": 12, "pool": 5,
                                                        "max_absorb": 6}).save(mine)
        with FlowMMPress(compression_ratio=0.5, policy=str(mine), pool=9).attach(m) as ap:
            got = ap.seq.method
            assert (got.theta, got.window, got.max_absorb, got.importance) == (0.4, 12, 6, "predicted")
            assert got.pool == 9 and got.predictor is not None  # the caller's setting over the policy's
            np.testing.assert_array_equal(ap.seq.policy.rho, shipped.rho)
    finally:
        m.close()
