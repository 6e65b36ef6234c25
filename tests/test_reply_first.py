"""The reply-first schedule on the tiny multimodal pair: a turn that fits the free room is
answered from the whole cache (the same greedy tokens and logits as a session that never
merges), the merge down to the budget runs after the reply on a thread of its own, and every
call that needs the context stops it at a chunk boundary with the cache exactly as llama.cpp
serialised it before (save, load, reset, a new turn, Ctrl-C while waiting), keeping what the
finished chunks scored."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from flowmm_edge.app.session import Session
from flowmm_edge.bindings import kv_cache
from flowmm_edge.compression import reconstruction

DOC = " ".join(f"item{i} is worth {i * 7 % 13}" for i in range(7))  # about 100 tokens: several repeat chunks


def _session(tiny_models, **kw):
    text, mmproj = tiny_models
    args = dict(budget=48, n_ctx=224, max_reply=8, n_threads=2)
    args.update(kw)
    return Session(text, mmproj, **args)


def _wait(s) -> None:
    while s.merging_in_background():
        time.sleep(0.01)
    s.stop_background_merge()  # joins the finished thread and takes its error, if any


@pytest.mark.parametrize("method", ["flowmm", "snapkv"])
def test_a_turn_that_fits_is_answered_from_the_whole_cache_then_merged(tiny_models, method):
    with _session(tiny_models, method=method) as s, _session(tiny_models, method="full") as full:
        s.add_user_turn(DOC)
        full.add_user_turn(DOC)
        np.testing.assert_array_equal(s.last_logits, full.last_logits)  # nothing merged before the reply
        assert s.cells() == full.cells() > 48 and s.stats.merges == 0
        assert list(s.reply()) == list(full.reply())
        _wait(s)
        assert s.merge_error is None
        assert s.cells() == 48 and s.stats.background_merges == 1 and s.stats.merges == 0
        assert kv_cache.used_bound(s.ctx) <= s.cells() + 0  # compacted after the merge
        # the next short turn fits again: answered from the cache as it is, merged after
        s.add_user_turn("which item is worth 3?")
        assert s.stats.merges == 0 and s.cells() > 48
        r = s.report()
        assert r["background_merges"] == 1 and r["schedule"] == "reply_first"


def test_the_blocking_schedule_merges_before_the_reply(tiny_models):
    with _session(tiny_models, schedule="blocking") as s:
        s.add_user_turn(DOC)
        assert s.stats.merges == 1 and s.cells() == 48
        list(s.reply())
        assert not s.merging_in_background() and s.stats.background_merges == 0


def test_a_turn_that_does_not_fit_still_merges_in_chunks_and_says_so(tiny_models):
    notes = []
    with _session(tiny_models, n_ctx=160) as s:
        s.on_progress = lambda what, done, total, note="": notes.append((what, note))
        n = s.add_user_turn(" ".join(f"word{i}" for i in range(150)))
        assert n > 160 and s.stats.merges >= 1 and s.pos == n
        assert any(w == "note" and "does not fit" in note for w, note in notes)
        assert any(w == "prefill" for w, _ in notes)


class Gate:
    """Holds a background merge inside its repeat pass: the `at_check`-th stop check (before that
    chunk) waits until the merge was asked to stop, then lets the chunk start, in flight when the
    stop is asked (Context.interrupt then stops it inside its decode)."""

    def __init__(self, monkeypatch, on_stop_requested=None, at_check: int = 1):
        self.inside = threading.Event()
        self.checks = 0
        real = reconstruction.reconstruction_scores
        gate = self

        def gated(ctx, tokens, prefix, seq_id=0, stop=None, progress=None, **kw):
            def check():
                gate.checks += 1
                if gate.checks == at_check and stop is not None:
                    gate.inside.set()
                    stop.__self__.wait(20)  # stop is the merge's Event.is_set: wait for the request
                    if on_stop_requested is not None:
                        on_stop_requested()
                    return False
                return stop() if stop is not None else False
            return real(ctx, tokens, prefix, seq_id, stop=check, progress=progress, **kw)

        monkeypatch.setattr(reconstruction, "reconstruction_scores", gated)


def _replied(tiny_models):
    """A session whose document turn was answered and whose merge is due, not started."""
    s = _session(tiny_models)
    s.background = False
    s.add_user_turn(DOC)
    list(s.reply())
    s.background = True
    assert s.merge_due()
    return s


def test_a_new_turn_stops_the_merge_keeps_its_progress_and_the_resumed_scores_equal_one_pass(tiny_models, monkeypatch):
    with _session(tiny_models) as ref:  # the uninterrupted pass, on the same conversation
        ref.background = False
        ref.add_user_turn(DOC)
        list(ref.reply())
        want = reconstruction.RepeatedScores().update(ref.ctx, ref.tokens_by_pos, kept_tail=ref.compression.kept_tail)
    gate = Gate(monkeypatch, at_check=2)  # the first chunk finishes, the second is in flight at the stop
    with _replied(tiny_models) as s:
        state = s.ctx.state()
        s.merge_in_background()
        assert gate.inside.wait(20)
        s.stop_background_merge()
        assert s.ctx.state() == state, "a stopped merge leaves llama.cpp's state as it was"
        done = s.compression.repeats.repeated
        assert 0 < len(done) < len(want.positions), "the finished chunk's progress is kept, not all"
        monkeypatch.undo()
        assert s.merge()  # goes on from there, in the foreground
        got = s.compression.repeats.scored
        np.testing.assert_array_equal(got.positions, want.positions)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-9)
        assert s.cells() == 48


@pytest.mark.parametrize("call", ["save", "load", "reset", "turn"])
def test_each_call_during_a_background_merge_leaves_the_cache_consistent(tiny_models, monkeypatch, tmp_path, call):
    saved = tmp_path / "s.flowmm"
    with _session(tiny_models) as other:  # a saved, merged conversation to load
        other.chat("a different conversation, short")
        other.save(saved) if call == "load" else None
        loaded_state = other.ctx.state() if call == "load" else None
    gate = Gate(monkeypatch)
    with _replied(tiny_models) as s:
        before = s.ctx.state()
        messages = list(s.messages)
        s.merge_in_background()
        assert gate.inside.wait(20)
        if call == "save":
            s.save(saved)
            assert s.ctx.state() == before
            monkeypatch.undo()
            with _session(tiny_models) as fresh:
                fresh.load(saved)
                assert fresh.ctx.state() == before and fresh.messages == messages
        elif call == "load":
            s.load(saved)
            assert s.ctx.state() == loaded_state
        elif call == "reset":
            s.reset()
            assert s.cells() == 0 and s.pos == 0
        else:
            with _session(tiny_models, method="full") as full:
                full.chat(DOC)
                full.add_user_turn("which item is worth 5?")
                s.add_user_turn("which item is worth 5?")
                assert s.stats.background_merges == 0, "the merge was stopped, not finished"
                np.testing.assert_array_equal(s.last_logits, full.last_logits)
                assert list(s.reply()) == list(full.reply())
        assert not s.merging_in_background() or call == "turn"


def test_ctrl_c_while_waiting_for_the_merge_drops_the_turn_and_keeps_the_cache(tiny_models, monkeypatch):
    """A real SIGINT while the turn waits for the merge to stop. The merge stays in flight until
    the main thread has taken the signal (not a fixed sleep: under load the main thread may take
    it only after the merge ended, which is not the case under test)."""
    taken = threading.Event()

    def default_int_handler(signum, frame):  # Python's own, and a mark that the main thread ran it
        taken.set()
        raise KeyboardInterrupt

    gate = Gate(monkeypatch, on_stop_requested=lambda: (os.kill(os.getpid(), signal.SIGINT), taken.wait(20)))
    previous = signal.signal(signal.SIGINT, default_int_handler)
    try:
        with _replied(tiny_models) as s:
            before, messages = s.ctx.state(), list(s.messages)
            s.merge_in_background()
            assert gate.inside.wait(20)
            with pytest.raises(KeyboardInterrupt):
                s.add_user_turn("another question")
            assert taken.is_set()
            assert s.ctx.state() == before and s.messages == messages
            monkeypatch.undo()
            s.chat("another question")  # the conversation goes on
    finally:
        signal.signal(signal.SIGINT, previous)
