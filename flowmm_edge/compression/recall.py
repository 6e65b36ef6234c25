"""Recall: a turn re-reads the sentences of the conversation's earlier text that a merge folded
away and that the turn names.

A merge keeps 5-20% of a sequence's cells, chosen before anyone knows the next question, and
whatever importance chooses them, a record that differs from its neighbours only in its value is
kept whole in few heads (docs/METHOD.md, "Recall"). The conversation keeps the token at every
position it decoded (4 bytes each, against 12 KiB of f16 KV per token on the default model), so
what a merge dropped can be read again. Before a user turn is decoded, its text is matched
against the sentences that hold a position with no cell left:

    excerpts = recall.choose(tokens_by_pos, forgotten, query_tokens, limit, piece)
    text, n = recall.for_turn(tokens_by_pos, held_positions, turn_text, limit, model)  # chat's, eval's

- tokens are compared by their text, lower-cased and stripped of spaces (" Locker" is "locker");
  tokens of spaces alone are skipped;
- every n-gram of the query (n = 2..4 such tokens) found in the earlier text adds n / (its
  occurrences there) to the sentence it starts in, so a phrase that names one record outweighs
  one that every record repeats;
- a sentence runs from after the last token that holds one of . ! ? or a newline (or a control
  token, such as a turn marker, which no excerpt holds) to the next one, at most SENTENCE tokens
  either side of a match (overlapping cuts of one long sentence are joined);
- sentences are taken best first, up to `limit` tokens, while each adds to what the model can
  already read: phrases worth MIN_SCORE or more (one 2-gram found once) that no better sentence
  taken or still held holds, or every phrase the best sentence holds (another statement of the
  best match, such as a second value under one name). Only sentences that hold a forgotten
  position are quoted;
- then, while they fit, the sentences a quoted one refers to, hop by hop: the other place of a
  name it holds (a word of NAME_TOKENS tokens or more holding a letter, found exactly twice in the
  earlier text and not in the turn), forgotten or held. All are given back in document order;
  `quote` writes them as the text the conversation puts before the turn's own (one excerpt a
  line, then a blank line).

Decision [I]: a sentence that matches only through phrases a better one already holds is not
quoted. Records that differ in one word share most phrases with the one asked for ("locker 2D in
the south hall" against "... north hall ..."); scored alone they passed the floor, and a base model
quoted four of them answered with a neighbour's value (Gemma 3 270M, near-records at 20%: 0.75
without recall, 0.00 with, 0.75 with this rule; 20 contexts in all 0.65 → 0.56 → 0.86;
docs/RESULTS.md, "Recall quotes only what adds").

Decision [I]: a quoted sentence brings the sentences it refers to. A chain of assignments (VAR
B = VAR A, A given the value asked for) is named by its first link only; quoted alone, the model
listed that one variable (variable-tracking in chat's path: 0.80 without recall, 0.20 with).
A reference is a name: a word the tokenizer splits (a made-up or rare word) found in exactly one
other place. Words of one token found exactly twice are common words: in prose they would link
a third of the sentences, names 6-7% (scripts/recall_selection.py on docs/METHOD.md and the GPL-3
text). It is followed through held sentences too: a chain quoted in part reads as the whole
answer (docs/RESULTS.md, "Recall follows a chain").

Decision [I]: nothing is recalled once a merge has folded image cells. A quote can only be
text; where part of what a question needs sat in an image, the model answered from the partial
quote alone (image families, 24 contexts at 10%: 0.96 without recall, 0.73 with quotes and the
merge at its full budget; docs/RESULTS.md, "Recall").

Decision [I]: lexical, not the question's attention. Ranking the cache's slots by the question's
own attention (one extra decode of the question) recalled a neighbouring locker in each of 4
near-records contexts, as the merge's importance keeps one; the words of the question name the
record exactly (docs/RESULTS.md, "Recall").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

NGRAMS = (2, 3, 4)  # query phrase lengths matched, in tokens
SENTENCE = 40       # a sentence's tokens at most, either side of a match
MIN_SCORE = 2.0     # a sentence's score to be recalled: at least one 2-gram found once
DEFAULT_TOKENS = 96  # chat's --recall: tokens a turn may re-read (serve and the Session API: 0, off)
ENDS = (".", "!", "?", "\n")
NAME = re.compile(r"\w[\w-]*\w|\w")  # a word: letters, digits, inner hyphens
NAME_TOKENS = 2     # a name is a word the tokenizer splits in at least this many tokens
SEPARATOR = "\n\n"  # between the quoted excerpts and the turn's text


@dataclasses.dataclass(frozen=True)
class Excerpt:
    start: int   # first position
    end: int     # one past the last
    phrases: tuple[tuple[tuple[str, ...], float], ...] = ()  # each query phrase found here, with its weight

    @property
    def score(self) -> float:
        """The sum of the phrases' weights."""
        return sum(w for _, w in self.phrases)

    def adds(self, said: set) -> float:
        """The weight of the phrases found here that are not in `said`."""
        return sum(w for g, w in self.phrases if g not in said)


class _Text:
    """Tokens' comparable text: lower case, spaces stripped; '' for tokens of spaces alone and for
    tokens with no text (control tokens, images), which are boundaries."""

    def __init__(self, piece: Callable[[int], bytes]):
        self.piece, self._raw, self._norm, self._end, self._boundary = piece, {}, {}, {}, {}

    def _read(self, token: int) -> None:
        text = self.piece(int(token)).decode("utf-8", "replace") if token >= 0 else ""
        self._raw[token] = text
        self._norm[token] = text.strip().lower()
        self._end[token] = any(c in text for c in ENDS)
        self._boundary[token] = not text

    def norm(self, token: int) -> str:
        if token not in self._norm:
            self._read(token)
        return self._norm[token]

    def raw(self, token: int) -> str:
        """The token's text as the model reads it."""
        self.norm(token)
        return self._raw[token]

    def ends_sentence(self, token: int) -> bool:
        """The token closes a sentence and belongs to it (. ! ? or a newline)."""
        self.norm(token)
        return self._end[token]

    def boundary(self, token: int) -> bool:
        """No excerpt holds the token (a control token or an image position)."""
        self.norm(token)
        return self._boundary[token]


def _words(tokens: np.ndarray, text: _Text) -> tuple[list[str], np.ndarray]:
    """The tokens' comparable texts with spaces-only tokens left out, and their positions."""
    keep = [(text.norm(t), i) for i, t in enumerate(tokens.tolist()) if t >= 0 and text.norm(t)]
    return [w for w, _ in keep], np.array([i for _, i in keep], np.int64)


def _names(tokens: np.ndarray, text: _Text, min_tokens: int = NAME_TOKENS) -> dict[str, list[int]]:
    """Each name of the text (a word holding a letter that spans `min_tokens` tokens or more: a
    made-up or rare word, not a common one), lower-cased, with the position of its first token at
    each place it occurs. Control tokens and images break words."""
    chars, owner = [], []
    for i, t in enumerate(tokens.tolist()):
        piece = "\0" if text.boundary(t) else text.raw(t)
        chars.append(piece)
        owner += [i] * len(piece)
    out: dict[str, list[int]] = {}
    for m in NAME.finditer("".join(chars)):
        word = m.group()
        if owner[m.end() - 1] - owner[m.start()] + 1 >= min_tokens and any(c.isalpha() for c in word):
            out.setdefault(word.lower(), []).append(owner[m.start()])
    return out


def _sentence(tokens: np.ndarray, at: int, text: _Text) -> tuple[int, int]:
    """[start, end) of the sentence holding position `at`, at most SENTENCE tokens either side."""
    lo = at
    while lo > 0 and at - lo < SENTENCE and not text.boundary(tokens[lo - 1]) and not text.ends_sentence(tokens[lo - 1]):
        lo -= 1
    hi = at
    while hi < len(tokens) and hi - at < SENTENCE and not text.boundary(tokens[hi]):
        hi += 1
        if text.ends_sentence(tokens[hi - 1]):
            break
    return lo, hi


def choose(tokens_by_pos: np.ndarray, forgotten: np.ndarray, query: list[int], limit: int,
           piece: Callable[[int], bytes]) -> list[Excerpt]:
    """The sentences to recall for `query` (token ids), in position order, `limit` tokens at most.
    `tokens_by_pos`: the token at each earlier position (-1: an image); `forgotten`: bool, same
    length, True where the sequence holds no cell any more; `piece`: a token's text (bytes)."""
    tokens = np.asarray(tokens_by_pos)
    forgotten = np.asarray(forgotten, bool)
    if limit <= 0 or not forgotten.any() or not query:
        return []
    if (tokens[forgotten] < 0).any():  # a merge folded image cells: a text quote would be partial
        return []
    text = _Text(piece)
    words, where = _words(tokens, text)
    qwords, _ = _words(np.asarray(query), text)
    found: list[tuple[int, int, float, tuple]] = []  # (sentence start, end, weight, n-gram) per n-gram found
    for n in NGRAMS:
        grams = {tuple(qwords[i:i + n]) for i in range(len(qwords) - n + 1)}
        if not grams:
            continue
        hits: dict[tuple, list[int]] = {}
        for i in range(len(words) - n + 1):
            g = tuple(words[i:i + n])
            if g in grams:
                hits.setdefault(g, []).append(i)
        for g, starts in hits.items():
            weight = n / len(starts)
            found += [(*_sentence(tokens, int(where[i]), text), weight, g) for i in starts]
    ranked = sorted(_joined(found), key=lambda c: (-c.score, c.start))
    best = {g for g, _ in ranked[0].phrases} if ranked else set()
    chosen, used, said = [], 0, set()  # said: the phrases of the sentences the model can read
    for c in ranked:
        if c.score < MIN_SCORE:
            break
        mine = {g for g, _ in c.phrases}
        if c.adds(said) < MIN_SCORE and not best <= mine:
            continue  # matched only through what a better sentence says
        if not forgotten[c.start:c.end].any():
            said |= mine  # still held whole: the model reads it in the cache
        elif used + (c.end - c.start) <= limit:
            chosen.append(c)
            used += c.end - c.start
            said |= mine
    if chosen:
        chosen += _linked(tokens, chosen, query, limit - used, text)
    return sorted(chosen, key=lambda c: c.start)


def _linked(tokens: np.ndarray, quoted: list[Excerpt], query: list[int], room: int, text: _Text) -> list[Excerpt]:
    """The sentences the quoted ones refer to, hop by hop, while they fit in `room` tokens: each
    holds the other place of a name a quoted sentence holds, found exactly twice in the earlier
    text and not in the turn (a variable defined here and used there). Held or forgotten alike: a
    chain quoted in part is read as the whole answer."""
    asked = set(_names(np.asarray(query), text))
    links = [at for word, at in _names(tokens, text).items() if len(at) == 2 and word not in asked]
    taken, frontier, out = list(quoted), list(quoted), []
    while frontier:
        found = []
        for c in sorted(frontier, key=lambda c: c.start):
            for at in links:
                inside = [c.start <= p < c.end for p in at]
                if inside.count(True) != 1:
                    continue
                lo, hi = _sentence(tokens, at[inside.index(False)], text)
                if hi - lo <= room and not any(lo < e.end and e.start < hi for e in taken + found):
                    found.append(Excerpt(lo, hi))
                    room -= hi - lo
        taken += found
        out += found
        frontier = found
    return out


def _joined(found: list[tuple[int, int, float, tuple]]) -> list[Excerpt]:
    """Overlapping sentences (one long sentence cut around two matches) joined, scores summed."""
    out: list[Excerpt] = []
    for lo, hi, w, g in sorted(found):
        if out and lo < out[-1].end:
            last = out[-1]
            out[-1] = Excerpt(last.start, max(last.end, hi), last.phrases + ((g, w),))
        else:
            out.append(Excerpt(lo, hi, ((g, w),)))
    return out


def quote(excerpts: list[Excerpt], tokens_by_pos: np.ndarray, detokenize: Callable[[list[int]], str]) -> str:
    """The excerpts as the text put before a turn's own: one a line, then SEPARATOR ('' if none)."""
    lines = [detokenize([int(t) for t in tokens_by_pos[e.start:e.end]]).strip() for e in excerpts]
    lines = [line for line in lines if line]
    return "\n".join(lines) + SEPARATOR if lines else ""


def for_turn(tokens_by_pos: np.ndarray, held_positions: np.ndarray, text: str, limit: int, model) -> tuple[str, int]:
    """What a turn of `text` quotes before itself: (the quote, '' if none; the tokens it re-reads).
    `held_positions`: the positions the sequence's cells hold (kv_cache.seq_cells); `model`: a
    runtime.Model (tokenize, token_to_piece, detokenize). The one rule chat, serve and eval share."""
    tokens = np.asarray(tokens_by_pos)
    excerpts = choose(tokens, forgotten_positions(len(tokens), held_positions),
                      model.tokenize(text, add_special=False, parse_special=False), limit, model.token_to_piece)
    return quote(excerpts, tokens, model.detokenize), sum(e.end - e.start for e in excerpts)


def forgotten_positions(n_pos: int, cell_positions: np.ndarray) -> np.ndarray:
    """True at each of positions 0..n_pos-1 that no cell of the sequence holds."""
    out = np.ones(n_pos, bool)
    p = np.asarray(cell_positions, np.int64)
    out[p[(p >= 0) & (p < n_pos)]] = False
    return out
