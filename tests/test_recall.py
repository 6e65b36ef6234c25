"""Recall (compression/recall.py): which sentences a turn re-reads, checked against documents built
here whose sentences and records are known by construction; then the chat's own path on the tiny
model, where the quoted text is read back from the conversation's messages and llama.cpp's cells."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from flowmm_edge.app.session import Session, SessionError
from flowmm_edge.bindings import kv_cache
from flowmm_edge.compression import recall

# a toy vocabulary: token id -> its text; 0 is a control token (no text), 1 ends sentences
VOCAB = ["", ".", "\n", " the", " sky", " is", " blue", " grass", " green", " locker", " 4", "A", "B", "C", "D",
         " holds", " crate", " 1", " 2", " 3", " 5", " 6", " 7", " 8", " 9", " door", " code", " west", " wing", " ",
         " in", " north", " south", " hall", " and", " VAR", " =", " QX", " KP", " WM", " RT", " LB", "JZ", "TY"]
ID = {t: i for i, t in enumerate(VOCAB)}
FILLER = [[ID[w] for w in (" the", " sky", " is", " blue", ".")], [ID[w] for w in (" the", " grass", " is", " green", ".")]]


def piece(token: int) -> bytes:
    return VOCAB[token].encode()


def words(*ws: str) -> list[int]:
    return [ID[w] for w in ws]


def record(letter: str, digits: str) -> list[int]:
    return words(" locker", " 4", letter, " holds", " crate") + [ID[" " + d] for d in digits] + [ID["."]]


def build(parts: list[list[int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The tokens of `parts` in order, and each part's [start, end)."""
    spans, pos = [], 0
    for p in parts:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    return np.array([t for p in parts for t in p], np.int32), spans


RECORDS = {"A": "123", "B": "567", "C": "891", "D": "235"}


def records_doc(order: list[str], filler_between: int):
    parts = []
    for k in order:
        parts += [FILLER[i % 2] for i in range(filler_between)]
        parts.append(record(k, RECORDS[k]))
    return build(parts)


@settings(max_examples=60, deadline=None)
@given(order=st.permutations(list(RECORDS)), asked=st.sampled_from(list(RECORDS)), gap=st.integers(0, 6),
       limit=st.integers(12, 60))
def test_the_record_a_question_names_is_recalled_whole_and_first(order, asked, gap, limit):
    tokens, spans = records_doc(order, gap)
    where = {k: spans[(gap + 1) * i + gap] for i, k in enumerate(order)}  # the record parts, by construction
    query = words(" locker", " 4", asked, " holds")  # "which crate does locker 4X hold" in this vocabulary
    got = recall.choose(tokens, np.ones(len(tokens), bool), query, limit, piece)
    assert where[asked] in [(e.start, e.end) for e in got], "the record the question names is among the excerpts"
    # the others share only "locker 4", found in every record: 2 / 4 each, under the floor of 2
    assert [(e.start, e.end) for e in got] == [where[asked]], "a phrase every record repeats quotes none of them"
    best = max(got, key=lambda e: e.score)
    assert (best.start, best.end) == where[asked], "it outranks the records that differ in one letter"
    assert sum(e.end - e.start for e in got) <= limit
    assert all(a.end <= b.start for a, b in zip(got, got[1:])), "in document order, no overlap"


def placed(letter: str, hall: str, digits: str) -> list[int]:
    return words(" locker", " 4", letter, " in", " " + hall, " hall", " holds", " crate") + \
        [ID[" " + d] for d in digits] + [ID["."]]


GRID = {("A", "north"): "123", ("A", "south"): "567", ("B", "north"): "891", ("B", "south"): "235"}


@settings(max_examples=40, deadline=None)
@given(order=st.permutations(list(GRID)), asked=st.sampled_from(list(GRID)), gap=st.integers(0, 3),
       asked_held=st.booleans())
def test_records_that_differ_in_one_word_are_not_quoted_beside_the_asked_one(order, asked, gap, asked_held):
    """Each other record shares phrases with the question ("locker 4A in", "in north hall holds"),
    but the asked record holds every one of them: the others add nothing to what it says."""
    parts = []
    for key in order:
        parts += [FILLER[i % 2] for i in range(gap)] + [placed(*key, GRID[key])]
    tokens, spans = build(parts)
    where = {key: spans[(gap + 1) * i + gap] for i, key in enumerate(order)}
    query = words(" locker", " 4", asked[0], " in", " " + asked[1], " hall", " holds")
    forgotten = np.ones(len(tokens), bool)
    lo, hi = where[asked]
    forgotten[lo:hi] = not asked_held
    got = [(e.start, e.end) for e in recall.choose(tokens, forgotten, query, 200, piece)]
    # a neighbour alone scores over the floor (e.g. "locker 4A in" found twice: 3 / 2, and more)
    assert got == ([] if asked_held else [where[asked]])


def test_every_statement_of_the_best_match_is_quoted_and_each_named_record():
    two_values = build([record("A", "123"), FILLER[0], record("B", "567"), FILLER[1], record("A", "891")])
    tokens, spans = two_values
    forgotten = np.ones(len(tokens), bool)
    got = recall.choose(tokens, forgotten, words(" locker", " 4", "A", " holds"), 64, piece)
    assert [(e.start, e.end) for e in got] == [spans[0], spans[4]], "both values under the one name"
    tokens, spans = records_doc(["A", "B", "C", "D"], 1)
    query = words(" locker", " 4", "A", " holds", " and", " locker", " 4", "C", " holds")
    got = recall.choose(tokens, np.ones(len(tokens), bool), query, 64, piece)
    assert [(e.start, e.end) for e in got] == [spans[1], spans[5]], "the second record named adds its own phrases"


NAMES = [(" QX", "JZ"), (" KP", "TY"), (" WM", "JZ"), (" RT", "TY"), (" LB", "JZ")]  # five words of two tokens


def assigned(name: int, to: list[int]) -> list[int]:
    """ VAR <name> = <to>. where `to` is a value's digits or another name"""
    return words(" VAR", *NAMES[name], " =") + to + words(".")


@settings(max_examples=60, deadline=None)
@given(hops=st.integers(1, 4), gaps=st.lists(st.integers(0, 3), min_size=5, max_size=5),
       held=st.lists(st.booleans(), min_size=5, max_size=5))
def test_a_quoted_link_of_a_chain_brings_the_rest_of_the_chain(hops, gaps, held):
    # VAR QXJZ = 7 3 5. ... VAR KPTY = VAR QXJZ. ... VAR WMJZ = VAR KPTY. ...: asked for the value,
    # the question names only the first link; every later one is found through the name before it
    value = words(" 7", " 3", " 5")
    links = [assigned(0, value)] + [assigned(i, words(" VAR", *NAMES[i - 1])) for i in range(1, hops + 1)]
    parts = []
    for link, gap in zip(links, gaps):
        parts += [FILLER[i % 2] for i in range(gap)] + [link]
    tokens, spans = build(parts + [FILLER[0]])
    where = [s for s, p in zip(spans, parts) if p in links]
    forgotten = np.ones(len(tokens), bool)
    for (lo, hi), h in zip(where[1:], held):
        forgotten[lo:hi] = not h  # later links held or not: a chain quoted in part reads as whole
    query = words(" =", " 7", " 3", " 5")
    got = recall.choose(tokens, forgotten, query, 200, piece)
    assert [(e.start, e.end) for e in got] == where, "the whole chain, in document order, and nothing else"
    first_two = where[0][1] - where[0][0] + where[1][1] - where[1][0]
    got = recall.choose(tokens, forgotten, query, first_two, piece)
    assert [(e.start, e.end) for e in got] == where[:2], "hop by hop while they fit"
    forgotten[where[0][0]:where[0][1]] = False
    assert recall.choose(tokens, forgotten, query, 200, piece) == [], "the asked link held: nothing quoted"


def test_only_a_name_found_exactly_twice_and_not_asked_is_followed():
    value = words(" 7", " 3", " 5")
    first = assigned(0, value)[:-1] + words(" grass", ".")  # VAR QXJZ = 7 3 5 grass.
    tokens, spans = build([first, FILLER[1], assigned(1, words(" VAR", *NAMES[0])), FILLER[0]])
    forgotten = np.ones(len(tokens), bool)
    got = recall.choose(tokens, forgotten, words(" =", " 7", " 3", " 5"), 200, piece)
    # " grass" is found in exactly one other sentence too, but a word of one token is a common word
    assert [(e.start, e.end) for e in got] == [spans[0], spans[2]]
    got = recall.choose(tokens, forgotten, words(" =", " 7", " 3", " 5", " QX", "JZ"), 200, piece)
    assert [(e.start, e.end) for e in got] == [spans[0]], "a name the turn says is not a reference to follow"
    thrice = build([first, assigned(1, words(" VAR", *NAMES[0])), assigned(2, words(" VAR", *NAMES[0]))])
    tokens, spans = thrice
    got = recall.choose(tokens, np.ones(len(tokens), bool), words(" =", " 7", " 3", " 5"), 200, piece)
    assert [(e.start, e.end) for e in got] == [spans[0]], "a name found three times links no one sentence"


def test_only_sentences_with_a_forgotten_position_are_recalled():
    tokens, spans = records_doc(["A", "B", "C", "D"], 2)
    rec_b = spans[3 * 1 + 2]  # B, the second record, each after two filler sentences
    query = words(" locker", " 4", "B", " holds")
    forgotten = np.zeros(len(tokens), bool)
    assert recall.choose(tokens, forgotten, query, 64, piece) == [], "nothing forgotten: nothing to re-read"
    forgotten[:] = True
    forgotten[rec_b[0]:rec_b[1]] = False  # the asked record is still held whole
    got = recall.choose(tokens, forgotten, query, 64, piece)
    assert rec_b not in [(e.start, e.end) for e in got]
    forgotten[rec_b[0] + 5] = True  # one of its digits was folded away
    assert rec_b in [(e.start, e.end) for e in recall.choose(tokens, forgotten, query, 64, piece)]


def test_a_query_that_names_nothing_recalls_nothing():
    tokens, _ = records_doc(["A", "B"], 3)
    forgotten = np.ones(len(tokens), bool)
    assert recall.choose(tokens, forgotten, words(" door", " code", " west", " wing"), 64, piece) == []
    # one word in common is not a phrase: no 2-gram found
    assert recall.choose(tokens, forgotten, words(" door", " locker", " wing"), 64, piece) == []
    assert recall.choose(tokens, forgotten, words(" locker", " 4", "A"), 0, piece) == [], "limit 0: off"


def test_excerpts_stop_at_control_tokens_and_images():
    # a record cut by a turn marker (control token 0) and by an image position (-1): neither is quoted
    tokens = np.array(FILLER[0] + [0] + record("C", "891")[:-1] + [-1, -1] + FILLER[1], np.int32)
    forgotten = tokens >= 0  # (the image's cells are held: see the next test)
    got = recall.choose(tokens, forgotten, words(" locker", " 4", "C", " holds"), 64, piece)
    assert len(got) == 1
    e = got[0]
    assert (e.start, e.end) == (len(FILLER[0]) + 1, len(FILLER[0]) + 1 + 8)
    assert (tokens[e.start:e.end] >= 1).all()


def test_a_long_sentence_is_cut_around_its_match():
    run_on = words(" the", " sky", " is", " blue") * 30  # 120 tokens, no sentence end
    tokens = np.array(run_on + record("D", "235") + run_on, np.int32)
    got = recall.choose(tokens, np.ones(len(tokens), bool), words(" locker", " 4", "D", " holds"), 200, piece)
    at = len(run_on)
    assert len(got) == 1 and got[0].start == at - recall.SENTENCE and got[0].end == at + 9


def test_quote_is_the_excerpts_text_one_a_line():
    tokens, spans = records_doc(["A", "B"], 1)
    ex = [recall.Excerpt(*spans[1]), recall.Excerpt(*spans[3])]
    text = recall.quote(ex, tokens, lambda ts: "".join(VOCAB[t] for t in ts))
    assert text == "locker 4A holds crate 1 2 3.\nlocker 4B holds crate 5 6 7." + recall.SEPARATOR
    assert recall.quote([], tokens, str) == ""


def test_forgotten_positions_are_those_no_cell_holds():
    got = recall.forgotten_positions(8, np.array([0, 3, 7, 9]))
    assert got.tolist() == [False, True, True, False, True, True, True, False]


# -- the chat's own path, on the tiny model ------------------------------------------------------

def _session(tiny_models, **kw):
    text, _ = tiny_models
    args = dict(budget=48, n_ctx=512, max_reply=4, n_threads=2, schedule="blocking", system_prompt=None)
    args.update(kw)
    return Session(text, None, **args)


FACT = "The door code of the west wing is 4821."
OTHER = ("A small boat drifted past the old mill while the miller slept. Rain fell on the roofs of the town all "
         "afternoon. ")


def _user_messages(s) -> list[str]:
    return [text for role, text in s.messages if role == "user"]


def test_a_turn_reads_back_the_merged_sentence_it_names(tiny_models):
    with _session(tiny_models, recall_tokens=48) as s:
        s.add_user_turn(OTHER * 2 + FACT + " " + OTHER * 2)
        assert s.stats.merges == 1 and s.cells() == 48, "the turn was merged to the budget"
        list(s.reply())
        held = kv_cache.seq_cells(s.ctx)[1]
        pos0, before = s.pos, s.cached_text
        s.add_user_turn("What is the door code of the west wing?")
        assert _user_messages(s)[-1] == FACT + recall.SEPARATOR + "What is the door code of the west wing?"
        assert s.stats.recalled_tokens >= len(s.model.tokenize(FACT, add_special=False)) - 1
        # the turn decoded was the rendered text with the quote: one position per token of it
        delta = s.cached_text[len(before):]
        assert FACT in delta
        assert s.pos - pos0 == len(s.model.tokenize(delta, add_special=False))
        assert not np.isin(np.arange(pos0), held).all(), "positions had been folded away before the turn"


def test_recall_off_and_nothing_to_recall_leave_the_turn_as_typed(tiny_models):
    with _session(tiny_models, recall_tokens=0) as s:
        s.add_user_turn(OTHER * 2 + FACT + " " + OTHER * 2)
        list(s.reply())
        s.add_user_turn("What is the door code of the west wing?")
        assert _user_messages(s)[-1] == "What is the door code of the west wing?" and s.stats.recalled_tokens == 0
    with _session(tiny_models, recall_tokens=48, budget=400) as s:  # never merged: nothing forgotten
        s.add_user_turn(OTHER + FACT)
        list(s.reply())
        s.add_user_turn("What is the door code of the west wing?")
        assert _user_messages(s)[-1] == "What is the door code of the west wing?"


def test_a_bad_recall_setting_is_one_line(tiny_models):
    with pytest.raises(SessionError, match="--recall -1 must be"):
        _session(tiny_models, recall_tokens=-1)


def test_an_api_conversation_with_recall_still_decodes_only_its_new_turn(tiny_models):
    """The quote is the conversation's copy of the message; the client's resent history still
    matches the slot's turns, so the next request decodes only what is new (serve --recall)."""
    with _session(tiny_models, recall_tokens=48) as s:
        msgs = [{"role": "user", "content": OTHER * 2 + FACT + " " + OTHER * 2}]
        r1 = s.create_chat_completion(msgs, max_tokens=4, temperature=0)
        assert s.stats.merges >= 1
        msgs += [r1["choices"][0]["message"], {"role": "user", "content": "What is the door code of the west wing?"}]
        r2 = s.create_chat_completion(msgs, max_tokens=4, temperature=0)
        u1, u2 = r1["usage"], r2["usage"]
        assert u2["prompt_tokens_details"]["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"]
        assert _user_messages(s)[-1].startswith(FACT + recall.SEPARATOR), "the model read the quote"
        msgs += [r2["choices"][0]["message"], {"role": "user", "content": "Thanks."}]
        r3 = s.create_chat_completion(msgs, max_tokens=4, temperature=0)
        assert r3["usage"]["prompt_tokens_details"]["cached_tokens"] == u2["prompt_tokens"] + u2["completion_tokens"]


def test_nothing_is_recalled_once_image_cells_were_folded():
    tokens, spans = records_doc(["A", "B"], 2)
    query = words(" locker", " 4", "A", " holds")
    with_image = np.concatenate([np.full(6, -1, np.int32), tokens])  # an image's positions first
    forgotten = np.ones(len(with_image), bool)
    assert recall.choose(with_image, forgotten, query, 64, piece) == []
    forgotten[:6] = False  # the image's cells are all held: its text neighbours may be quoted
    got = recall.choose(with_image, forgotten, query, 64, piece)
    assert [(e.start - 6, e.end - 6) for e in got] == [spans[2]]
