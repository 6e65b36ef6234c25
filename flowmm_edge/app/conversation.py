"""One conversation: a llama.cpp sequence on an engine's shared context (llama-server's slot),
with its own positions, modality labels, merge state and bias, turns and replies.

    with Engine(n_slots=4, budget=512) as engine:
        a, b = Conversation(engine), Conversation(engine)
        a.add_user_turn("What is in this picture?", images=["cat.png"])
        print("".join(a.reply()))

Memory: after each user turn is decoded the method merges the sequence down to `budget` cells
(FlowMM's observation window is then the end of the user's turn, and its reconstruction pass
repeats the text added since the last merge, from `tokens_by_pos`, in the free cells). A turn
longer than the free room is decoded in chunks, merging between chunks, so any conversation fits;
`reserve` cells stay free for the reply (and at least reconstruction.room_needed for that pass).
When other conversations hold the room, the engine evicts the idle ones least recently used. A
turn fails (one-line error, everything restored) only if one image alone is larger than the room
left after a merge, or the buffer is held by conversations that are replying.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .engine import Engine, NoRoomError, SessionError, TemplateRerenders
from .conversation_merging import Merging
from .conversation_persistence import Persistence
from .conversation_replies import Replying
from .prefix_reuse import PrefixReuse
from ..bindings import kv_cache, sampling
from ..bindings.prompt import ModalityLabels, Segment, prepare, valid_text
from . import tool_calls
from .chat_template import MEDIA, message_text
from ..compression import recall, reconstruction



@dataclasses.dataclass
class SessionStats:
    turns: int = 0
    merges: int = 0             # merges the turn waited for (a turn that did not fit, or the blocking schedule)
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    merge_seconds: float = 0.0
    background_merges: int = 0  # merges run after a reply, while nothing waited for them
    background_merge_seconds: float = 0.0
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    evictions: int = 0  # times the engine took the cells back for another conversation
    recalled_tokens: int = 0  # earlier text re-read before user turns (compression/recall.py)



@dataclasses.dataclass
class _Snapshot:
    """What a failed turn puts back: llama.cpp's state of the sequence, the slot bias (not part of
    that state; cells in position order) and the conversation's own bookkeeping. `state` None:
    the cache was left out, as a turn takes it (its decode only adds cells at `pos` and after, so
    cutting them off puts the cache back) until a merge inside it (Conversation._merge_in_turn)."""

    state: bytes | None
    bias: np.ndarray | None
    messages: list
    cached_text: str
    pos: int
    labels_by_pos: np.ndarray
    tokens_by_pos: np.ndarray
    label_names: list
    stats: SessionStats
    last_logits: np.ndarray | None
    compression: tuple  # SequenceCompressor.snapshot()


def turn_segments(delta: str, content: list[Segment]) -> list[Segment]:
    """The turn's rendered text as segments: the template's text around the user's content,
    which keeps its own segments (images, and text spans with their modality labels).
    Neighbouring text of one modality is joined, so a plain text turn is one segment."""
    rendered = message_text(content)
    at = delta.find(rendered)
    if at >= 0:
        segs = [Segment("text", delta[:at]), *content, Segment("text", delta[at + len(rendered):])]
    else:  # the template rewrote the content (trimmed it, say): labels other than text are lost
        images = [c for c in content if c.kind == "image"]
        parts = delta.split(MEDIA)
        if len(parts) - 1 != len(images):
            raise SessionError("the chat template dropped or duplicated an image marker")
        segs = [x for k, text in enumerate(parts) for x in [Segment("text", text)] + images[k:k + 1]]
    out: list[Segment] = []
    for seg in segs:
        if seg.kind == "text" and not seg.text:
            continue
        if out and seg.kind == out[-1].kind == "text" and seg.modality == out[-1].modality:
            out[-1] = Segment("text", out[-1].text + seg.text, modality=seg.modality)
        else:
            out.append(seg)
    return out


class Conversation(Merging, Replying, PrefixReuse, Persistence):
    """A slot of `engine`: sequence `seq_id` (the first free one by default)."""

    def __init__(self, engine: Engine, seq_id: int | None = None, prefill_step: int | None = None):
        """`prefill_step`: tokens per prefill batch while a progress listener follows (None:
        n_batch; serve's slots yield to the others between such batches)."""
        taken = {c.seq_id for c in engine.conversations}
        if seq_id is None:
            free = [s for s in range(engine.n_slots) if s not in taken]
            if not free:
                raise SessionError(f"all {engine.n_slots} slots of the engine are taken")
            seq_id = free[0]
        if not 0 <= seq_id < engine.n_slots or seq_id in taken:
            raise SessionError(f"slot {seq_id} is taken or outside 0..{engine.n_slots - 1}")
        self.engine, self.seq_id = engine, seq_id
        self.busy = False   # serving a request: the engine never evicts it then
        self.last_used = 0  # the engine's clock at the last request (least recently used is evicted first)
        self.idle_since = time.monotonic()  # when its last reply ended (the merge schedule's idle delay)
        self.on_progress = None  # on_progress(what, done, total, note): "prefill", "merge" (waited for), "note";
        # it is called at every chunk boundary of a turn's prefill and of a merge it waits for, and an
        # exception raised from it stops the turn there with the conversation as before (serve's cancel)
        self.prefill_step = prefill_step
        # batcher(tokens, pos0, seq_id) -> the chunk's last logits: decodes a prefill chunk in a
        # batch other sequences share (serve's worker: its step's batch); None: the chunk alone
        self.batcher = None
        # this sequence's attention statistics are being gathered over the chunks it decodes now:
        # a batch may count one observed sequence's rows (native/flowmm-stats.cpp), so serve's
        # worker puts at most one such chunk in a step
        self.observed = False
        self._bg = None  # conversation_merging._BackgroundMerge while one runs
        self._turn_snapshot = None  # what the turn being decoded puts back if it fails (_decode_or_restore)
        self._bg_cells = 0
        self.tools = None  # OpenAI tools the template renders for the whole conversation (use_tools)
        self.tool_family = None  # their call syntax (tool_calls.family_for the template)
        engine.conversations.append(self)
        self._reset_state()

    # the engine's settings, read as the conversation's own
    model = property(lambda self: self.engine.model)
    ctx = property(lambda self: self.engine.ctx)
    projector = property(lambda self: self.engine.projector)
    template = property(lambda self: self.engine.template)
    model_path = property(lambda self: self.engine.model_path)
    n_ctx = property(lambda self: self.engine.n_ctx)
    kv_type = property(lambda self: self.engine.kv_type)
    reserve = property(lambda self: self.engine.reserve)
    budget_cells = property(lambda self: self.engine.budget_cells)
    bytes_per_cell = property(lambda self: self.engine.bytes_per_cell)
    method_name = property(lambda self: self.engine.method_name)
    max_reply = property(lambda self: self.engine.max_reply)
    system_prompt = property(lambda self: self.engine.system_prompt)
    policy = property(lambda self: self.engine.policy)
    sampling = property(lambda self: self.engine.sampling)

    # -- state ---------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        if getattr(self, "sampler", None) is not None:
            self.sampler.close()
        self._close_images()
        self.images = {}  # first position -> PreparedImage, held until a repeat pass has re-read it
        self.sampler = sampling.Sampler(self.model.n_vocab, self.engine.sampling, vocab=self.model.vocab)  # a new conversation draws afresh
        self.messages: list[tuple[str, str]] = [("system", self.system_prompt)] if self.system_prompt else []
        self.cached_text = ""   # the formatted conversation whose tokens are in the cache
        self.pos = 0            # next position (tokens and image positions seen so far)
        self.labels = ModalityLabels()
        self.labels_by_pos = np.zeros(0, np.int32)
        self.tokens_by_pos = np.zeros(0, np.int32)  # -1 where an image sits; repeated by reconstruction scores
        self.compression = self.engine.compressor()  # when and how this sequence is merged, and its scores so far
        self.merge_error: str | None = None  # why the last background merge failed (the cache was kept as it was)
        self.stats = SessionStats()
        self.last_logits = None
        self._active_reply = None  # the generator of `reply`, if it made one
        self._active_stream = None  # the ReplyStream being generated
        self._reply_sampler = None
        self.finish_reason = None
        self.last_reply_tokens = 0
        self._keys = None  # the turns' keys (chat_api.Turn.key) while create_chat_completion drives it
        self.raw = False  # the cache holds a completions prompt (and its replies), not a chat
        self.continues = False  # the next reply continues the last assistant message (add_assistant_turn)
        self._reusable = None  # the tokens of cells a reset kept for the next turn (reset(reuse=True))
        self.reused = 0  # positions the turns took from them (feed and feed_raw count them as held)
        self.more_turns = False  # feed: turns follow the one being added (its last token's logits are not needed)

    def listen(self, on_progress) -> None:
        """Follow the turns' prefill and the merges they wait for: on_progress(what, done, total, note)."""
        self.on_progress = on_progress

    def begin_request(self, on_progress, batcher=None) -> None:
        """A server's request starts on this slot: busy (never evicted) until end_request, used
        now (the engine's clock), `on_progress` called at every chunk boundary, and its prefill
        chunks decoded by `batcher` (see __init__)."""
        self.busy, self.last_used, self.on_progress, self.batcher = True, self.engine.tick(), on_progress, batcher

    def end_request(self) -> None:
        """The request is over: the slot is idle, and its claim on the shared buffer released."""
        self.busy, self.on_progress, self.batcher = False, None, None
        self.engine.release(self)

    def cells(self) -> int:
        return len(kv_cache.seq_cells(self.ctx, self.seq_id)[0])

    def _snapshot(self, cache: bool = True) -> "_Snapshot":
        """`cache` False: without the cache (see _Snapshot), which is the size of the sequence's cells."""
        state, bias = self._cache_state() if cache else (None, None)
        return _Snapshot(state=state, bias=bias,
                         messages=list(self.messages), cached_text=self.cached_text, pos=self.pos,
                         labels_by_pos=self.labels_by_pos.copy(), tokens_by_pos=self.tokens_by_pos.copy(),
                         label_names=list(self.labels.names), stats=dataclasses.replace(self.stats),
                         last_logits=self.last_logits, compression=self.compression.snapshot())

    def _restore(self, snap: "_Snapshot") -> None:
        self.messages, self.cached_text, self.pos = snap.messages, snap.cached_text, snap.pos
        self.labels_by_pos, self.tokens_by_pos, self.labels.names = snap.labels_by_pos, snap.tokens_by_pos, snap.label_names
        self.stats, self.last_logits = snap.stats, snap.last_logits
        self.compression.restore(snap.compression)
        if snap.state is None:  # only cells at pos and after were added since
            self.ctx.truncate(snap.pos, self.seq_id)
            return
        if snap.state:
            self.ctx.set_state(snap.state, self.seq_id)
        else:
            self.ctx.clear(self.seq_id)
        self.ctx.truncate(snap.pos, self.seq_id)  # (a state taken inside a turn holds its first cells too)
        self._set_bias(None if snap.bias is None else snap.bias[..., :self.cells()])

    def _cache_state(self) -> tuple[bytes, np.ndarray | None]:
        """What a snapshot keeps of the cache: llama.cpp's state of the sequence and its slot bias."""
        return self.ctx.state(self.seq_id) if self.pos else b"", self._bias()

    def _bias(self) -> np.ndarray | None:
        """The slot bias the cache carries (not part of llama.cpp's state), cells in position order; None if none."""
        bias = kv_cache.get_slot_bias(self.ctx, self.seq_id) if self.pos else None
        if bias is None or not np.any(bias):
            return None
        return bias[..., np.argsort(kv_cache.seq_cells(self.ctx, self.seq_id)[1], kind="stable")]

    def _set_bias(self, bias: np.ndarray | None) -> None:
        """Set a bias from _bias() on the cache's cells (which may sit in other cells now), or clear it."""
        if bias is None:
            kv_cache.clear_slot_bias(self.ctx, self.seq_id)
            return
        in_cells = np.empty_like(bias)
        in_cells[..., np.argsort(kv_cache.seq_cells(self.ctx, self.seq_id)[1], kind="stable")] = bias
        kv_cache.set_slot_bias(self.ctx, in_cells, self.seq_id)

    def reset(self, reuse: bool = False) -> None:
        """Forget the conversation. `reuse`: keep its cells for the next turn's first tokens, as
        far as they are the same (llama-server's cache_prompt: a conversation that begins as the
        one before it did, with the same system prompt say, decodes only the rest); the next turn
        drops the cells it does not reuse (_take_reusable). Only a sequence never merged, up to
        its first image, is reused."""
        self._finish_reply()
        keep = self._reusable_tokens() if reuse else None
        if keep is None:
            self.ctx.clear(self.seq_id)
        self._reset_state()
        self._reusable = keep

    def _reusable_tokens(self) -> list[int] | None:
        """The tokens the cache holds at positions 0, 1, ... one cell each (never merged), up to the
        first image; None if there are none."""
        positions = kv_cache.seq_cells(self.ctx, self.seq_id)[1] if self.pos else ()
        if len(positions) != self.pos or not np.array_equal(np.sort(positions), np.arange(self.pos)):
            return None
        images = np.flatnonzero(self.tokens_by_pos < 0)
        n = int(images[0]) if len(images) else len(self.tokens_by_pos)
        return self.tokens_by_pos[:n].tolist() or None

    def _take_reusable(self, prepared) -> int:
        """How many of a turn's first positions the cache holds already from the conversation
        before a reset(reuse=True): its tokens as far as they equal the turn's, short of a window
        the merge will observe (decoded, so that its statistics are gathered) and, for the last
        turn a request feeds, of its last token (its logits start the reply). A turn taken whole
        leaves the cells after it for the next turn of the same feed (`more_turns`, a history
        resent to another slot); otherwise the cells past the ones taken are dropped."""
        old = self._reusable
        if old is None:
            return 0
        start, end = self.pos, self.pos + prepared.n_pos
        lead = []
        for piece in prepared.pieces:
            if not isinstance(piece, list):
                break
            lead += piece
        n = min(len(old) - start, len(lead), prepared.n_pos - (0 if self.more_turns else 1))
        if self.compression.enabled and self.compression.needs_observation:
            n = min(n, self.compression.observed_from(end) - start)
        n = max(n, 0)
        same = np.asarray(old[start:start + n]) != np.asarray(lead[:n])
        taken = int(np.argmax(same)) if same.any() else n
        if taken < prepared.n_pos:  # the rest of this turn is decoded: nothing after it can be reused
            self._reusable = None
            self.ctx.truncate(start + taken, self.seq_id)
        self.reused += taken
        return taken

    def _drop_reusable(self) -> None:
        """Cells kept by reset(reuse=True) that no turn took (the request failed first, or its
        turns were taken whole up to a failing one): give them back, keeping the turns'."""
        if self._reusable is not None:
            self._reusable = None
            self.ctx.truncate(self.pos, self.seq_id)

    def evict(self) -> None:
        """Give the cells back to the shared buffer (the engine makes room): the conversation is
        forgotten, and its next request starts afresh."""
        self.reset()
        self.stats.evictions += 1

    def close(self) -> None:
        if self.engine.ctx is not None:
            self._finish_reply()
        if getattr(self, "sampler", None) is not None:
            self.sampler.close()
            self.sampler = None
        self._close_images()
        if self in self.engine.conversations:
            self.engine.conversations.remove(self)

    # -- turns ---------------------------------------------------------------------------------

    def add_user_turn(self, text: str = "", images: list | tuple = (), segments: list[Segment] | None = None) -> int:
        """Decode a user turn (images first, then the text; or `segments`, in their order and with
        their modality labels), merging as the budget requires. Returns its positions. On any
        error the conversation and the cache are as before."""
        self._finish_reply()
        if segments is None:
            segments = [Segment("image", image=im, modality="image") for im in images]
            segments.append(Segment("text", ("\n" if images else "") + valid_text(text)))
        else:
            segments = [dataclasses.replace(s, text=valid_text(s.text)) for s in segments]
        if any(s.kind == "image" for s in segments) and self.projector is None:
            raise SessionError("this model has no mmproj, so it cannot take images (start with --mmproj)")
        segments = self._with_recall(segments)
        content = message_text(segments)
        return self._add_turn([("user", content)], segments)

    def _with_recall(self, segments: list[Segment]) -> list[Segment]:
        """The turn with the sentences of earlier text it names that merges folded away quoted
        before it (compression/recall.py), up to the engine's `recall_tokens`; as it was when
        recall is off or nothing forgotten matches. The quote is part of the user's message, as
        the model reads it."""
        limit = self.engine.recall_tokens
        query = "".join(s.text for s in segments if s.kind == "text")
        if not limit or not self.compression.enabled or not self.pos or not query.strip():
            return segments
        text, n = recall.for_turn(self.tokens_by_pos[:self.pos], kv_cache.seq_cells(self.ctx, self.seq_id)[1], query,
                                  limit, self.model)
        if not text:
            return segments
        self.stats.recalled_tokens += n
        return [Segment("text", text)] + segments

    def add_tool_results(self, results: list[str]) -> int:
        """Decode the results of the reply's tool calls (OpenAI's role "tool" messages, in order)
        as the next turn, rendered by the template; returns its positions. On any error the
        conversation and the cache are as before."""
        self._finish_reply()
        if self.tools is None:
            raise SessionError("tool results need the conversation's tools (use_tools)")
        return self._add_turn([("tool", valid_text(r)) for r in results], [])

    def use_tools(self, tools: list | None) -> None:
        """Render `tools` (OpenAI's, checked by tool_calls.check_tools) for this conversation, from
        its first turn: a conversation with other tools, or none, starts afresh."""
        if tools == self.tools:
            return
        family = None
        if tools is not None:
            family = tool_calls.family_for(self.template.jinja_text(self.model))
            if family is None:
                raise SessionError(f"chat template {self.template.name} writes no tool-call syntax this program "
                                   f"reads ({', '.join(f.name for f in tool_calls.FAMILIES)})")
        self.reset()  # (a reset keeps the tools: they are the conversation's, as its system prompt is)
        self.tools, self.tool_family = tools, family

    def add_raw_text(self, text: str) -> int:
        """Decode `text` as it is, after what the cache holds, without the chat template (a
        completions prompt); returns its positions."""
        self._finish_reply()
        text = valid_text(text)
        return self._add_turn([], [Segment("text", text)], formatted=self.cached_text + text)

    def _add_turn(self, new_messages: list[tuple[str, str]], segments: list[Segment], formatted: str | None = None) -> int:
        messages = self.messages + new_messages
        if formatted is None:
            formatted = self.template.render(self.model, messages, add_assistant=True, tools=self.tools)
        if not formatted.startswith(self.cached_text):
            raise TemplateRerenders("the model's chat template re-renders earlier turns; cannot continue incrementally")
        # prepare first: an unreadable image or a bad segment fails here, before anything changes
        prepared = prepare(self.model, turn_segments(formatted[len(self.cached_text):], segments), self.labels,
                           self.projector, add_bos=self.pos == 0)
        pos0 = self.pos
        try:
            reused = self._take_reusable(prepared)
            try:
                self._check_room(prepared, reused)
            except SessionError:
                self.ctx.truncate(self.pos, self.seq_id)  # (cells kept for reuse go with the turn)
                raise
            self._decode_or_restore(prepared, reused)
            self._keep_images(prepared, pos0)
        finally:
            prepared.close()
        self.messages, self.cached_text = messages, formatted
        self.stats.turns += 1
        self._keys = None  # a turn not from create_chat_completion: its next request starts afresh
        return prepared.n_pos

    def _check_room(self, prepared, reused: int) -> None:
        """Refuse a turn that cannot fit even once merged (an image), or at all (the full cache)."""
        room = self.n_ctx - self.reserve - (self.budget_cells if self.method_name != "full" else self.cells())
        for p in prepared.pieces:
            if not isinstance(p, list) and p.n_pos > room:
                raise SessionError(f"an image of {p.n_pos} positions cannot fit: {room} cells are free after a "
                                   f"merge (raise --ctx or lower --budget)")
        if self.method_name == "full" and prepared.n_pos - reused > room:
            raise SessionError(f"the turn of {prepared.n_pos} tokens does not fit: {room} cells left and the "
                               f"method 'full' never merges (use another --method or /reset)")

    def _decode_or_restore(self, prepared, reused: int = 0) -> None:
        """Decode a turn whole (less its first `reused` positions, which the cache holds already),
        or on any error (Ctrl-C included) put cache and bookkeeping back."""
        self._turn_snapshot = self._snapshot(cache=False)
        try:
            self._decode_turn(prepared, reused)
        except BaseException:
            self._restore(self._turn_snapshot)
            raise
        finally:
            self._turn_snapshot = None

    def _merge_in_turn(self) -> None:
        """Merge inside a turn: the merge changes cells before the turn, so the turn's snapshot
        takes the cache first (with the turn's cells so far, which a restore cuts off)."""
        snap = self._turn_snapshot
        if snap is not None and snap.state is None:
            state, bias = self._cache_state()
            self._turn_snapshot = dataclasses.replace(snap, state=state, bias=bias)
        self._merge(foreground=True)

    def _decode_turn(self, prepared, reused: int = 0) -> None:
        labels = np.concatenate([self.labels_by_pos, prepared.labels])
        self.labels_by_pos = labels
        self.tokens_by_pos = np.concatenate([self.tokens_by_pos, reconstruction.tokens_by_position(prepared.pieces)])
        units = []  # token lists (neighbours joined, split as the room allows) and images, in order
        for piece in prepared.pieces:
            if isinstance(piece, list) and units and isinstance(units[-1], list):
                units[-1] = units[-1] + piece
            else:
                units.append(piece)
        merging, schedule = self.compression.enabled, self.engine.merge_schedule
        t0, total, done = time.perf_counter(), sum(u.n_pos if not isinstance(u, list) else len(u) for u in units), 0
        if reused:  # (_take_reusable: text tokens before any image, short of the last)
            units[0] = units[0][reused:]
            if not units[0]:
                units.pop(0)
            self.pos, done = self.pos + reused, reused
        while units:
            need = 1 if isinstance(units[0], list) else units[0].n_pos
            if self.engine.room(self) < need and merging and self.merge_due():  # fold down to the budget first
                self._merge_in_turn()
            if self.engine.room(self) < need:  # other conversations fill the buffer: merge or evict idle ones
                self.engine.make_room(need, keep=self)
            used, free = self.cells(), self.engine.room(self)
            take = units.pop(0)
            if isinstance(take, list):
                take, rest = take[:max(free, 0)], take[max(free, 0):]
                if rest:
                    units.insert(0, rest)
                n = len(take)
            else:
                n = take.n_pos
            if n == 0 or n > free:  # alone in the buffer a merge below always makes room; shared, maybe not
                raise self._no_room()
            self.engine.hold(self, used + n)  # the cells this unit takes stay ours across its chunks' yields
            end = self.pos + n
            if not units:  # the end of the turn: merge down to the budget now only on the blocking schedule
                merge_now = merging and schedule.at_turn_end(used + n > self.budget_cells)
                observe = merging  # the window a merge after the reply plans from is the turn's end
            else:  # merge now if the next unit (one token at least, an image whole) would not fit
                nxt = 1 if isinstance(units[0], list) else units[0].n_pos
                merge_now = observe = merging and schedule.mid_turn(n, nxt, free)
                if merge_now:
                    self._progress("note", 0, 0, f"the turn of {total} positions does not fit the {free} free cells: "
                                                 f"merging before it goes on")
            if observe and self.batcher is not None and isinstance(take, list) and self.compression.needs_observation:
                # the rows before the observed window need no statistics, and a batch counts one
                # observed sequence's rows: they go first, and the window is observed on its own
                head = take[:max(0, self.compression.observed_from(end) - self.pos)]
                if head:
                    self._decode_unit(head, done, total)
                    self.pos, done, take, n = self.pos + len(head), done + len(head), take[len(head):], n - len(head)
            if observe:  # (statistics are per sequence: the observed rows share serve's batch too)
                with self.compression.observing(self.ctx, prompt_end=end, labels=labels, seq_id=self.seq_id) as st:
                    self.observed = st is not None
                    try:
                        logits = self._decode_unit(take, done, total)
                    finally:
                        self.observed = False
            else:
                logits = self._decode_unit(take, done, total)
            self.pos, done = end, done + n
            if logits is not None:
                self.last_logits = logits
            if merge_now and self.merge_due():  # a sequence within its budget has nothing to merge
                self._merge_in_turn()
        self.stats.prompt_tokens += prepared.n_pos
        self.stats.prefill_seconds += time.perf_counter() - t0

    def _progress(self, what: str, done: int, total: int, note: str = "") -> None:
        if self.on_progress is not None:
            self.on_progress(what, done, total, note)

    def _decode_unit(self, unit, done: int = 0, total: int = 0):
        """Decode one unit; with a progress listener, text in batches (of `prefill_step` tokens if
        set) so it can follow, and stop the turn by raising from it."""
        if not isinstance(unit, list):
            unit.eval(self.ctx, self.pos, self.seq_id)
            self._progress("prefill", done + unit.n_pos, total)
            return None
        if self.on_progress is None:
            return self.ctx.decode(unit, self.pos, self.seq_id)
        step = min(self.prefill_step or self.ctx.n_batch, self.ctx.n_batch)
        for a in range(0, len(unit), step):
            chunk = unit[a:a + step]
            if a:
                self._room_after_yield(len(chunk))
            if self.batcher is None:
                logits = self.ctx.decode(chunk, self.pos + a, self.seq_id)
            else:
                logits = self.batcher(chunk, self.pos + a, self.seq_id)
            self._progress("prefill", done + min(a + step, len(unit)), total)
        return logits

    def _room_after_yield(self, n: int) -> None:
        """At a chunk boundary the other slots ran (serve): the unit's room is held by this
        conversation's claim (Engine.hold), but a conversation that grew past its own claim may
        have taken it. Room is then made from idle conversations, or the turn stops as before it
        (NoRoomError: it waits for the replies to end) instead of llama_decode failing."""
        if self.engine.room(self, reserved=False) < n and not self.engine.make_room(n, keep=self, reserved=False):
            raise self._no_room()

    def _no_room(self) -> NoRoomError:
        return NoRoomError(f"no room for this turn: the shared cache's {self.n_ctx} cells are held by "
                           f"conversations that are replying (try again, or raise --ctx)")

    def add_assistant_turn(self, text: str, continued: bool = False) -> int:
        """Decode an assistant message the caller supplies (a history resent by an API client) as
        if it had been generated after the last user turn; returns its positions. `continued`:
        the next reply continues this message (llama-server's and vLLM's reading of a final
        assistant message), and the conversation holds them as one. On any error the conversation
        and the cache are as before."""
        self._finish_reply()
        if not self.messages or self.messages[-1][0] not in ("user", "tool"):
            raise SessionError("an assistant message must follow a user message")
        text = valid_text(text)
        prepared = prepare(self.model, [Segment("text", text)], self.labels, self.projector, add_bos=False)
        try:
            if prepared.n_pos:
                self._decode_or_restore(prepared, self._take_reusable(prepared))
        finally:
            prepared.close()
        self.messages = self.messages + [("assistant", text)]
        self.cached_text += text
        if not continued:
            self.last_logits = None
        self.continues = continued
        self._keys = None
        return prepared.n_pos

    # -- statistics ------------------------------------------------------------------------------

    def report(self) -> dict:
        merging = self.merging_in_background()
        cells = self._bg_cells if merging else self.cells()  # a running merge owns the context
        s = self.stats
        return {"cells": cells, "buffer_cells": self.n_ctx, "budget_cells": self.budget_cells,
                "kv_bytes": cells * self.bytes_per_cell, "buffer_bytes": self.n_ctx * self.bytes_per_cell,
                "full_equivalent_bytes": self.pos * self.bytes_per_cell, "positions": self.pos,
                "compression": self.pos / cells if cells else 1.0, "merges": s.merges, "turns": s.turns,
                "prefill_tok_s": s.prompt_tokens / s.prefill_seconds if s.prefill_seconds else 0.0,
                "decode_tok_s": s.generated_tokens / s.decode_seconds if s.decode_seconds else 0.0,
                "merge_seconds": s.merge_seconds, "background_merges": s.background_merges,
                "background_merge_seconds": s.background_merge_seconds, "merging_in_background": merging,
                "schedule": self.engine.schedule, "method": self.method_name, "recalled_tokens": s.recalled_tokens}
