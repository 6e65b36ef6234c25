"""Context-reconstruction importance (after KVzip, Kim et al. 2025, arXiv 2505.23416): how much
attention each cached cell receives while the model repeats the context it holds.

The last window's attention ranks tokens by what the *current* end of the prompt looks at; after
compression the questions that matter have not been asked yet. Asking the model to reproduce the
context instead touches every token a later question could need. On the default model this keeps
69% of a planted answer's tokens at a 20% budget where the window keeps 24%
(docs/RESULTS.md, `scripts/answer_retention.py --compare-scores`).

    scores = reconstruction_scores(ctx, tokens_by_pos, prefix=repeat_prefix(model))

For each chunk of the sequence's text cells (in position order, each cell's token: a merged slot
repeats the token at its own position) the prefix and the chunk are decoded after the sequence's
end, the chunk's ROWS rows at a time with attention statistics on, and removed again. A cell's
score is the largest attention mass any group of ROWS repeated rows sent it (each group's mass
summed over its rows and over the KV head's query heads); the prefix's own rows, which read the
instruction, are not counted (KVzip scores the repeated context's queries). An image the caller still holds (`images`: its first
position -> the mtmd chunks it was decoded from, multimodal.PreparedImage) is repeated too, in
its place among the text: the prefix, then the image through mtmd's own image path, so image
cells are scored as text cells are, by the rows that re-read them. An image nobody holds any
more (a restored session) is not repeated; its cells are still scored as keys by every repeat row.
The cache holds exactly what it held before, on success and on error.

Decisions [I]: KVzip scores a cell by the max over repeat rows; the native statistics sum rows,
so the max is taken over groups of ROWS rows. Measured on the default model (2k-token RULER-style
documents, SnapKV's selection on the score, share of (layer, KV head) keeping every token of the
answer at a 20% budget): the max over 64-row groups 52%, over 16-row groups 54%, the plain sum
over all rows 23%. Groups of 16 measured again after FlowMM's merge (2026-12-07, `eval --question
after`, paired on the same contexts): images 0.78 -> 0.84 / 0.896 -> 0.917 at 10 / 20% (48
contexts), the text suite 0.72 -> 0.66 / 0.86 -> 0.81 (20), so ROWS stays 64 (docs/RESULTS.md,
"Why the repeat pass misses image-k"). Chunks are at most CHUNK tokens and fit the free cells of the context, so the pass needs
room_needed(prefix) free cells at least. The cost is a second prefill of the text cells, with
the statistics on: 2-3x the prefill on a 2-core CPU (docs/RESULTS.md, "FlowMM's default now").
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..bindings import kv_cache
from ..bindings.attention_stats import AttentionStats
from ..bindings.native import llama_cpp
from ..bindings.runtime import DecodeInterrupted
from ..errors import FlowMMError

REPEAT_PROMPT = "\n\nRepeat the previous context exactly.\n"
CHUNK = 512
ROWS = 64  # repeat rows per statistics group: the score is the max over groups
ROOM = CHUNK + 64  # free cells that give the pass whole chunks (the prefix fits in the 64)
MIN_ROWS = 16  # the fewest repeat rows a chunk may hold: the pass needs the prefix and these free


class ReconstructionError(FlowMMError):
    pass


@dataclasses.dataclass(frozen=True)
class PositionScores:
    """Scores [n_layer, n_head_kv, n] of the cells at `positions` (strictly increasing)."""

    positions: np.ndarray
    scores: np.ndarray
    repeated: np.ndarray | None = None  # the positions whose content the pass fed (text and images)
    hidden_from: int | None = None  # the pass hid the cells from this position on (hidden_tail)

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The scores of the given positions, [n_layer, n_head_kv, len(positions)]."""
        idx = np.searchsorted(self.positions, positions)
        idx = np.minimum(idx, len(self.positions) - 1)
        if len(self.positions) == 0 or np.any(self.positions[idx] != positions):
            raise ReconstructionError("reconstruction scores were computed for other cells than the cache holds now")
        return self.scores[..., idx]


def room_needed(prefix: list[int]) -> int:
    """Free cells the pass needs: the prefix and MIN_ROWS tokens of a chunk."""
    return len(prefix) + MIN_ROWS


def repeat_prefix(model) -> list[int]:
    return model.tokenize(REPEAT_PROMPT, add_special=False)


def images_by_position(pieces, pos0: int = 0) -> dict:
    """The images among prepared prompt pieces, by the first position each takes (from pos0)."""
    images, pos = {}, pos0
    for p in pieces:
        if not isinstance(p, list):
            images[pos] = p
        pos += len(p) if isinstance(p, list) else p.n_pos
    return images


def tokens_by_position(pieces) -> np.ndarray:
    """The token at each position of prepared prompt pieces, -1 where an image sits."""
    return np.concatenate([np.asarray(p, np.int32) if isinstance(p, list) else np.full(p.n_pos, -1, np.int32)
                           for p in pieces] or [np.zeros(0, np.int32)])


class Interrupted(ReconstructionError):
    """`stop()` said so at a chunk boundary. `partial` scores every cell by the chunks repeated so
    far, and `repeated` lists the positions those chunks fed; the cache is as it was."""

    def __init__(self, partial: PositionScores, repeated: np.ndarray):
        super().__init__(f"the repeat pass stopped after {len(repeated)} positions")
        self.partial, self.repeated = partial, repeated


def reconstruction_scores(ctx, tokens_by_pos: np.ndarray, prefix: list[int], seq_id: int = 0,
                          chunk: int = CHUNK, rows: int = ROWS, stop=None, progress=None,
                          images: dict | None = None, kept_tail: int = 0) -> PositionScores:
    """The reconstruction score of every cell of `seq_id` (see the module docstring). The pass
    decodes in the cells no sequence holds (other sequences may share the cache). `images`: the
    images to repeat, by first position (each with n_pos and eval(ctx, pos, seq_id)); one that
    does not fit the free cells now is left for a later pass. `stop`, a callable, is asked before
    each chunk: True raises Interrupted with what was done so far; `progress(done, total)` is told
    the positions repeated after each chunk. `kept_tail`: the sequence's last cells that the merge
    keeps whatever they score (its recent window); the pass hides them (see hidden_tail)."""
    _, cell_positions = kv_cache.seq_cells(ctx, seq_id)
    positions = np.sort(cell_positions)
    tokens_by_pos = np.asarray(tokens_by_pos, np.int32)
    if len(positions) and positions[-1] >= len(tokens_by_pos):
        raise ReconstructionError(f"the cache holds position {positions[-1]}, the tokens cover {len(tokens_by_pos)}")
    end = ctx.next_pos(seq_id)
    hidden_from = positions[len(positions) - kept_tail] if 0 < kept_tail <= len(positions) else end
    text = positions[(tokens_by_pos[positions] >= 0) & (positions < hidden_from)]
    pending = sorted((p, img) for p, img in (images or {}).items() if p + img.n_pos <= hidden_from)
    total_work = len(text) + sum(img.n_pos for _, img in pending)
    lay = kv_cache.layout(ctx)
    total = np.zeros((lay.n_layer, lay.n_head_kv, len(positions)), np.float64)
    # the row groups' maximum is taken on the cache's backend (AttentionStats row_groups) when the
    # batches llama.cpp decodes start at group boundaries; else each group is decoded on its own
    whole = ctx.n_batch % rows == 0 and llama_cpp.llama_n_ubatch(ctx.ptr) % rows == 0
    fed: list[np.ndarray] = []

    def fed_positions() -> np.ndarray:
        return np.concatenate(fed) if fed else np.zeros(0, np.int64)

    def stopped() -> Interrupted:
        """The pass stops here: what the chunks fed so far scored (scores raised by a chunk cut
        short stay; its tokens count as not repeated, so the next pass feeds them again)."""
        so_far = fed_positions()
        return Interrupted(PositionScores(positions, total, so_far, hidden_from), so_far)

    def gather(st) -> None:
        by_pos = np.argsort(st.positions, kind="stable")
        cols = by_pos[np.searchsorted(st.positions, positions, sorter=by_pos)]
        for layer in range(lay.n_layer):
            np.maximum(total[layer], st.column_scores(layer, per_kv_head=True)[:, cols], out=total[layer])

    def free_now() -> int:
        # counted before each chunk: between two, the caller's progress listener may have let
        # other sequences of a shared cache decode into them
        free = kv_cache.free_cells(ctx, seq_id)
        if free < room_needed(prefix):
            raise ReconstructionError(f"the reconstruction pass needs {room_needed(prefix)} free cells, the "
                                      f"context has {free}: raise --ctx")
        return free

    def repeat_image(img, at: int) -> None:
        # as a text chunk: the prefix, then the image through mtmd (which decodes it in n_batch
        # pieces from its first position, so row groups line up as a text chunk's do; where they
        # cannot, the image's rows count as one group)
        ctx.decode(list(prefix), end, seq_id)
        start = end + len(prefix)
        with AttentionStats(ctx, prompt_end=start + img.n_pos, window=img.n_pos, seq_id=seq_id,
                            row_groups=rows if whole else None) as st:
            img.eval(ctx, start, seq_id)
        gather(st)
        fed.append(np.arange(at, at + img.n_pos))

    a, done = 0, 0
    unhide = hidden_tail(ctx, seq_id, cell_positions >= hidden_from)
    try:
        while a < len(text) or pending:
            if stop is not None and stop():
                raise stopped()
            if pending and (a >= len(text) or pending[0][0] < text[a]):
                at, img = pending.pop(0)  # an image comes next, in its place among the text
                if free_now() >= len(prefix) + img.n_pos:
                    repeat_image(img, at)
                ctx.truncate(end, seq_id)
                done += img.n_pos
            else:
                step = min(chunk, free_now() - len(prefix))
                if pending:  # stop the chunk where the next image sits
                    step = min(step, int(np.searchsorted(text, pending[0][0])) - a)
                chunk_tokens = tokens_by_pos[text[a:a + step]].tolist()
                try:
                    with ctx.interruptible():  # Context.interrupt() stops the chunk mid-decode
                        ctx.decode(list(prefix), end, seq_id)  # the instruction's rows are not counted
                        start = end + len(prefix)
                        per_decode = len(chunk_tokens) if whole else rows
                        for g in range(0, len(chunk_tokens), per_decode):
                            part = chunk_tokens[g:g + per_decode]
                            with AttentionStats(ctx, prompt_end=start + g + len(part), window=len(part),
                                                seq_id=seq_id, row_groups=rows if whole else None) as st:
                                ctx.decode(part, start + g, seq_id)
                            gather(st)
                except DecodeInterrupted:
                    raise stopped() from None
                ctx.truncate(end, seq_id)
                fed.append(text[a:a + step])
                a += step
                done += step
            if progress is not None:
                progress(min(done, total_work), total_work)
    finally:
        ctx.truncate(end, seq_id)
        unhide()
    return PositionScores(positions, total, fed_positions(), hidden_from)


def hidden_tail(ctx, seq_id: int, hide: np.ndarray):
    """Hide seq_id's cells where `hide` (a mask in seq_cells order) holds from the rows decoded after
    them (a -inf slot bias on top of the one they carry); returns the callable that puts the bias
    back as it was.

    Decision [I]: the repeat pass scores the cells a merge may lose, so the cells it keeps whatever
    they score (the recent window) are neither repeated nor read by the repeat rows, and their text is
    repeated by the first pass after they leave the window. Where the window holds a copy of earlier
    text (in chat, a reply restating a document's number, cut off mid-number), the rows re-reading
    the document read that copy instead of the document's, and the merge folded the document's copy
    away: in chat's own path without a predictor, after a 16-token reply that restated the number,
    the document's digits ranked 957th median of 1,670 cells, against 512th after a 1-token reply
    (docs/RESULTS.md, "The repeat pass no longer reads the recent window").
    The hidden cells score 0 (PositionScores.hidden_from says which): a merge keeps them as they
    were, folding nothing into them (Compressor sets Stats.unscored; methods/flowmm.py)."""
    if not np.any(hide):
        return lambda: None
    prior = kv_cache.get_slot_bias(ctx, seq_id)
    biased = bool(np.any(prior != 0))
    bias = prior.copy()
    bias[..., hide] = -np.inf
    kv_cache.set_slot_bias(ctx, bias, seq_id)

    def unhide() -> None:
        if biased:
            kv_cache.set_slot_bias(ctx, prior, seq_id)
        else:
            kv_cache.clear_slot_bias(ctx, seq_id)
    return unhide


class RepeatedScores:
    """Reconstruction scores kept across the merges of one growing sequence (a chat, a press):
    each update repeats only the positions not repeated before, and a position scored before
    keeps the larger of its old score and what the new repeat sends it. So each merge's pass
    costs about the text added since the last one, not the whole cache's. An update that is
    stopped (Interrupted) keeps what its finished chunks scored: the next one goes on from there."""

    def __init__(self):
        self.scored: PositionScores | None = None  # every cell's score so far
        self.repeated = np.zeros(0, np.int64)      # positions whose tokens a pass has fed

    def snapshot(self) -> tuple:
        return self.scored, self.repeated

    def restore(self, snap: tuple) -> None:
        self.scored, self.repeated = snap

    def forget_from(self, end: int) -> None:
        """Drop the scores of positions >= end (the sequence was cut back there)."""
        s = self.scored
        if s is not None:
            keep = s.positions < end
            self.scored = PositionScores(s.positions[keep], s.scores[..., keep]) if np.any(keep) else None
        self.repeated = self.repeated[self.repeated < end]

    def _combine(self, fresh: PositionScores, repeated: np.ndarray) -> PositionScores:
        old, scores = self.scored, fresh.scores
        if old is not None:
            seen = np.isin(fresh.positions, old.positions)
            scores = scores.copy()
            scores[..., seen] = np.maximum(scores[..., seen], old.at(fresh.positions[seen]))
        self.scored = PositionScores(fresh.positions, scores, hidden_from=fresh.hidden_from)
        self.repeated = np.union1d(self.repeated, repeated)
        return self.scored

    def update(self, ctx, tokens_by_pos: np.ndarray, seq_id: int = 0, stop=None, progress=None,
               images: dict | None = None, kept_tail: int = 0) -> PositionScores:
        """Repeat what no pass has fed yet: text positions, and `images` (by first position) not
        repeated before, but for the `kept_tail` last cells (reconstruction_scores)."""
        tokens = np.array(tokens_by_pos, np.int32)
        tokens[self.repeated[self.repeated < len(tokens)]] = -1  # repeated already: not fed again
        images = {p: img for p, img in (images or {}).items() if p not in self.repeated}
        try:
            fresh = reconstruction_scores(ctx, tokens, repeat_prefix(ctx.model), seq_id, stop=stop, progress=progress,
                                          images=images, kept_tail=kept_tail)
        except Interrupted as e:
            self._combine(e.partial, e.repeated)
            raise
        return self._combine(fresh, fresh.repeated)
