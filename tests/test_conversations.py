"""Several conversations on one engine (one llama.cpp context, one unified KV buffer, one
sequence each): each answers exactly as it would alone (a single-slot Session is the
reference), and when the buffer is short the idle conversation used least recently gives its
cells back."""

from __future__ import annotations

import numpy as np
import pytest

from flowmm_edge.app.conversation import Conversation
from flowmm_edge.app.engine import Engine, SessionError
from flowmm_edge.app.session import Session
from flowmm_edge.bindings import kv_cache

A_TURNS = ["the secret key is red and the code is 1234", "what is the code", "and the key"]
B_TURNS = ["dogs are here in the picture of the city", "how many dogs", "what city is it"]


def settings(tiny_models, method):
    return dict(model=tiny_models[0], mmproj=tiny_models[1], method=method, budget=48 if method != "full" else 400,
                max_reply=6, n_threads=2, temperature=0.0, schedule="blocking")


def alone(tiny_models, method, turns) -> list[str]:
    with Session(n_ctx=512, **settings(tiny_models, method)) as s:
        return [s.chat(t) for t in turns]


@pytest.mark.parametrize("method", ["full", "flowmm", "snapkv"])
def test_interleaved_conversations_answer_as_each_would_alone(tiny_models, method):
    with Engine(n_ctx=1024, n_slots=3, **settings(tiny_models, method)) as engine:
        a, b = Conversation(engine), Conversation(engine)
        assert (a.seq_id, b.seq_id) == (0, 1)
        got_a, got_b = [], []
        for ta, tb in zip(A_TURNS, B_TURNS):
            got_a.append(a.chat(ta))
            got_b.append(b.chat(tb))
        if method != "full":
            assert a.stats.merges >= 1 and b.stats.merges >= 1
        assert engine.cells_in_use() == a.cells() + b.cells()
    assert got_a == alone(tiny_models, method, A_TURNS)
    assert got_b == alone(tiny_models, method, B_TURNS)


def test_the_idle_conversation_used_least_recently_is_evicted_for_room(tiny_models):
    # 256 cells, 6 kept for replies: two conversations of ~95 cells (full cache) fit, three do not
    with Engine(n_ctx=256, n_slots=3, **settings(tiny_models, "full")) as engine:
        convs = [Conversation(engine) for _ in range(3)]
        long_turn = " ".join(["the cat sat on the mat"] * 3)  # about 95 cells with system prompt and reply
        for i, c in enumerate(convs):
            c.last_used = engine.tick()
            c.chat(long_turn)
        assert convs[0].cells() == 0 and convs[0].stats.evictions == 1  # the oldest gave way to the third
        assert convs[1].cells() > 0 and convs[2].cells() > 0
        assert convs[0].pos == 0 and convs[0].messages[-1][0] == "system"  # forgotten whole, not half
        convs[1].busy = True  # replying: never evicted, so the next room comes from convs[2]
        convs[0].last_used = engine.tick()
        convs[0].chat(long_turn)
        assert convs[2].cells() == 0 and convs[1].cells() > 0


def test_slots_are_counted(tiny_models):
    with Engine(n_ctx=512, n_slots=2, **settings(tiny_models, "snapkv")) as engine:
        Conversation(engine), Conversation(engine)
        with pytest.raises(SessionError, match="slots"):
            Conversation(engine)
    with pytest.raises(SessionError, match="one conversation"):
        Session(n_ctx=512, n_slots=2, **settings(tiny_models, "snapkv"))


def test_a_merge_repeat_pass_uses_only_the_cells_other_conversations_leave(tiny_models):
    """FlowMM's repeat pass decodes after the sequence's end: in a shared buffer the room it has is
    what all the conversations leave, not what its own sequence leaves."""
    with Engine(n_ctx=512, n_slots=2, **settings(tiny_models, "flowmm")) as engine:
        a, b = Conversation(engine), Conversation(engine)
        long_turn = " ".join(["the cat sat on the mat and the dog"] * 20)  # about 300 tokens
        a.chat(long_turn)
        b.chat(long_turn)  # decodes in what a leaves, then repeats it there before merging
        assert a.cells() <= 48 + 6 and b.cells() <= 48 + 6 and b.stats.merges == 1
        assert a.stats.evictions == 0


def test_a_method_name_is_resolved_once_per_sequence_not_per_merge(tiny_models, monkeypatch):
    """The registry turns --method into a method object when the sequence's compression is made;
    observing, merging and merging again reuse it (counted at the registry)."""
    from flowmm_edge.methods import registry
    from flowmm_edge.compression import sequence_compressor

    calls = []
    real = registry.resolve
    monkeypatch.setattr(sequence_compressor.registry, "resolve", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, "snapkv")) as engine:
        conv = Conversation(engine)
        before = len(calls)
        for _ in range(3):
            conv.add_user_turn("the cat sat on the mat and " * 12)
            list(conv.reply())
            conv.merge()
        assert conv.stats.merges + conv.stats.background_merges >= 2 and len(calls) == before


def test_a_ratio_budget_is_due_when_the_ratio_would_keep_fewer_cells():
    """One meaning for a float budget in a sequence's compression: a ratio of the cells it finds
    (methods.budget.Budget's), so a merge is due exactly when that ratio keeps fewer than it holds."""
    from flowmm_edge.compression.sequence_compressor import SequenceCompressor

    seq = SequenceCompressor("streaming", 0.5)  # needs no observation window
    assert seq.due(10) and seq.due(3) and not seq.due(1) and not seq.due(0)
    whole = SequenceCompressor("streaming", 1.0)
    assert not whole.due(100)
    assert SequenceCompressor("streaming", 64).due(65) and not SequenceCompressor("streaming", 64).due(64)


def _yielding_turn(engine, cells_for_b):
    """Conversation a, mid-way through a turn that yields between chunks of 16 tokens (serve's
    slots) and holds a claim of 8 cells (an estimate that fell short); at its first boundary
    conversation b decodes `cells_for_b(b)` tokens, as another slot would. Returns (a, b, [the
    cells b took])."""
    a, b = Conversation(engine, prefill_step=16), Conversation(engine)
    engine.claim(a, 8)
    filled = []

    def boundary(what, done, total, note=""):
        if what == "prefill" and not filled:
            n = cells_for_b(b)
            engine.ctx.decode([engine.model.tokenize("the")[-1]] * n, 0, b.seq_id)
            filled.append(n)
    a.listen(boundary)
    return a, b, filled


def test_a_prefill_that_yields_keeps_the_cells_it_took_room_for(tiny_models):
    """A turn decoded in chunks holds the room of the unit it took: another conversation admitted
    at a chunk boundary gets only the rest of the buffer (not llama_decode's "cache full" for the
    turn's next chunk), and the turn's logits are those of the turn decoded alone."""
    turn = "the cat sat on the mat and " * 12
    with Engine(n_ctx=256, n_slots=2, **settings(tiny_models, "full")) as engine:
        a, b, filled = _yielding_turn(engine, lambda b: engine.room(b, reserved=False))  # all b may take
        a.add_user_turn(turn)
        assert filled[0] > 0 and engine.ctx.next_pos(b.seq_id) == filled[0]
        assert a.cells() == a.pos and kv_cache.free_cells(engine.ctx) == 256 - a.pos - filled[0]
        got = a.last_logits
    with Engine(n_ctx=256, n_slots=1, **settings(tiny_models, "full")) as engine:
        alone_ = Conversation(engine)
        alone_.add_user_turn(turn)
        want = alone_.last_logits
    assert int(np.argmax(got)) == int(np.argmax(want))
    np.testing.assert_allclose(got, want, atol=1e-2 * float(np.abs(want).max()))


def test_a_prefill_whose_room_was_taken_stops_as_before_the_turn(tiny_models):
    """If another conversation took the cells anyway (one that grew past its own claim), the
    turn's next chunk is not sent to llama_decode to fail: the turn raises NoRoomError (serve
    queues it until the replies end) and the conversation and its cells are as before it."""
    from flowmm_edge.app.engine import NoRoomError

    turn = "the cat sat on the mat and " * 12
    with Engine(n_ctx=256, n_slots=2, **settings(tiny_models, "full")) as engine:
        def every_free_cell(b):
            b.busy = True  # replying: it may not be evicted to make room
            return kv_cache.free_cells(engine.ctx)
        a, b, filled = _yielding_turn(engine, every_free_cell)
        before = (a.cells(), a.pos, list(a.messages), a.cached_text)
        with pytest.raises(NoRoomError, match="no room for this turn"):
            a.add_user_turn(turn)
        assert filled[0] > 0 and (a.cells(), a.pos, a.messages, a.cached_text) == before
        assert kv_cache.free_cells(engine.ctx) == 256 - filled[0]  # b's cells, and a's first chunk given back
        engine.ctx.truncate(0, b.seq_id)  # the reply ended: its room is back, and the turn goes
        a.add_user_turn(turn)
        assert a.cells() == a.pos > 0


@pytest.mark.parametrize("method", ["snapkv", "flowmm"])
def test_an_observed_turn_end_goes_through_the_batcher(tiny_models, method):
    """serve's slots decode their prompt chunks through a batcher (the worker's shared batch);
    a turn whose end is observed for the merge's statistics sends every row through it, the
    window's too (statistics are per sequence). The merge then keeps the same positions, and the
    cache answers as the turn decoded whole by a conversation of its own."""
    turn = "the cat sat on the mat and the dog is red " * 8
    got = {}
    for batched in (False, True):
        with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, method)) as engine:
            conv, sent = Conversation(engine, prefill_step=16), []
            if batched:
                def batcher(tokens, pos0, seq_id):
                    sent.append((pos0, len(tokens)))
                    return engine.ctx.decode(tokens, pos0, seq_id)
                conv.begin_request(lambda *a: None, batcher)
            conv.add_user_turn(turn)
            assert conv.stats.merges == 1 and conv.cells() < conv.pos
            probe = engine.ctx.decode(engine.model.tokenize(" cat", add_special=False), conv.pos, conv.seq_id)
            got[batched] = (np.sort(kv_cache.seq_cells(engine.ctx, conv.seq_id)[1]), probe, sent, conv.pos)
    kept, probe, _, n = got[False]
    kept_b, probe_b, sent, n_b = got[True]
    assert n == n_b and sent and sent[0][0] == 0 and all(len_ <= 16 for _, len_ in sent)
    assert sum(len_ for _, len_ in sent) == n  # every row went through the batcher, the window's too
    np.testing.assert_array_equal(kept, kept_b)
    assert int(np.argmax(probe)) == int(np.argmax(probe_b))
    np.testing.assert_allclose(probe, probe_b, atol=1e-2 * float(np.abs(probe).max()))


def _fresh_logits(tiny_models, method, messages):
    from flowmm_edge.app import chat_api
    with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, method)) as engine:
        conv = Conversation(engine)
        conv.feed(chat_api.parse_messages(messages))
        return conv.last_logits, conv.pos


def test_a_new_conversation_reuses_the_cells_of_the_same_first_tokens(tiny_models):
    """llama-server's cache_prompt: a slot whose next request is another conversation keeps the
    cells of their common first tokens (the template's opening, a shared system prompt) and
    decodes the rest; the cache then answers as the conversation decoded on a fresh context.
    A sequence that was merged keeps nothing (its cells are not the tokens' own)."""
    from flowmm_edge.app import chat_api

    system = {"role": "system", "content": "you answer about cats and the city " * 3}
    first = [system, {"role": "user", "content": "the secret key is red"}]
    second = [system, {"role": "user", "content": "dogs are in the city"}]
    with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, "full")) as engine:
        conv = Conversation(engine)
        conv.feed(chat_api.parse_messages(first))
        held, decoded = conv.feed(chat_api.parse_messages(second))
        common = len(engine.model.tokenize(engine.template.render(engine.model, [("system", system["content"])],
                                                                  add_assistant=False)))
        assert common - 4 <= held < conv.pos and held + decoded == conv.pos  # (the rendering's own seam)
        cells, positions = kv_cache.seq_cells(engine.ctx, conv.seq_id)
        np.testing.assert_array_equal(np.sort(positions), np.arange(conv.pos))
        got = conv.last_logits
    want, n = _fresh_logits(tiny_models, "full", second)
    assert n == conv.pos and int(np.argmax(got)) == int(np.argmax(want))
    np.testing.assert_allclose(got, want, atol=1e-2 * float(np.abs(want).max()))

    with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, "snapkv")) as engine:  # budget 48: merged
        conv = Conversation(engine)
        conv.feed(chat_api.parse_messages([system, {"role": "user", "content": "the cat sat on the mat " * 12}]))
        assert conv.cells() < conv.pos
        held, decoded = conv.feed(chat_api.parse_messages(second))
        assert held == 0 and decoded == conv.pos


def test_a_resent_history_reuses_every_turn_it_shares(tiny_models):
    """A history that another conversation held (an OpenAI client resends it to another slot, or
    edits its last turn): every turn it shares is kept whole, an assistant message's too, and
    only the turn that differs is decoded from its first difference; the cache then answers as
    the history decoded on a fresh context (before, only the first turn was kept, short of its
    last token, and every later turn was decoded again)."""
    from flowmm_edge.app import chat_api

    system = {"role": "system", "content": "you answer about cats and the city"}
    head = [system, {"role": "user", "content": "the secret key is red and the code is 1234"},
            {"role": "assistant", "content": "the key is red"}]
    first = head + [{"role": "user", "content": "what is the code"}]
    second = head + [{"role": "user", "content": "what color is the key"}]
    with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, "full")) as engine:
        conv = Conversation(engine)
        conv.feed(chat_api.parse_messages(first))
        shared = len(engine.model.tokenize(engine.template.render(
            engine.model, [(m["role"], m["content"]) for m in head], add_assistant=False)))
        held, decoded = conv.feed(chat_api.parse_messages(second))  # (the last turn differs: afresh, reusing)
        assert shared - 4 <= held < conv.pos and held + decoded == conv.pos
        got = conv.last_logits
    want, n = _fresh_logits(tiny_models, "full", second)
    assert n == conv.pos and int(np.argmax(got)) == int(np.argmax(want))
    np.testing.assert_allclose(got, want, atol=1e-2 * float(np.abs(want).max()))


def test_cells_kept_for_reuse_are_given_back_when_the_request_fails(tiny_models):
    """A request that fails before its first turn decodes (an assistant message first, a turn
    too long for the full cache) leaves the slot empty, not holding the cells kept for reuse."""
    from flowmm_edge.app import chat_api

    with Engine(n_ctx=512, n_slots=1, **settings(tiny_models, "full")) as engine:
        conv = Conversation(engine)
        conv.feed(chat_api.parse_messages([{"role": "user", "content": "the secret key is red"}]))
        assert conv.cells() > 0
        with pytest.raises(SessionError):
            conv.feed(chat_api.parse_messages([{"role": "assistant", "content": "hello"},
                                               {"role": "user", "content": "the secret key is red"}]))
        assert conv.cells() == conv.pos == 0
        conv.feed(chat_api.parse_messages([{"role": "user", "content": "the secret key is red"}]))
        with pytest.raises(SessionError, match="does not fit"):  # its first tokens are held, the rest is too long
            conv.feed(chat_api.parse_messages([{"role": "user", "content": "the secret key is red " * 120}]))
        assert conv.cells() == conv.pos == 0


@pytest.mark.parametrize("method", ["snapkv", "flowmm"])
def test_a_turn_that_fails_after_a_merge_inside_it_puts_the_cache_back(tiny_models, method):
    """A turn keeps no copy of the cache until a merge inside it changes the cells before it
    (Conversation._merge_in_turn); stopped after such a merge (Ctrl-C at a chunk boundary), the
    sequence is again what llama.cpp serialised before the turn, with its slot bias."""
    with Engine(n_ctx=256, n_slots=1, **settings(tiny_models, method)) as engine:
        conv = Conversation(engine, prefill_step=16)
        conv.chat("the secret code is 4821 and the cat sat on the mat " * 6)
        assert conv.cells() < conv.pos  # merged
        state, bias, pos, messages, merges = (engine.ctx.state(conv.seq_id), conv._bias(), conv.pos,
                                              list(conv.messages), conv.stats.merges)

        def stop_after_a_merge(what, done, total, note=""):
            if what == "prefill" and conv.stats.merges > merges:
                raise KeyboardInterrupt
        conv.listen(stop_after_a_merge)
        with pytest.raises(KeyboardInterrupt):
            conv.add_user_turn("the dog is red and the city is big " * 30)  # more than the free cells
        assert engine.ctx.state(conv.seq_id) == state
        got = conv._bias()
        assert (got is None) == (bias is None) and (bias is None or np.array_equal(got, bias))
        assert (conv.pos, conv.messages, conv.stats.merges) == (pos, messages, merges)
