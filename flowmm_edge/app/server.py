"""`python -m flowmm_edge serve`: an OpenAI-compatible HTTP server whose conversations share one
merged KV buffer.

One engine (engine.Engine: one llama.cpp context, one unified KV buffer) and N slots, each a
conversation.Conversation on its own sequence, merged on its own after its turns. Every
llama.cpp call runs on one worker thread (`Worker`); the HTTP side (FastAPI on uvicorn, as
llama-cpp-python's server) parses and checks requests, queues them, and streams what the worker
sends back. The worker starts a queued request when a slot is free, prefilling only what the
slot does not hold already (a client resends the whole history; the slot whose conversation is
its longest prefix takes it, else the one used least recently, which starts afresh), then
advances every started request in **one batch** per step (continuous batching, llama-server's
update_slots): each prefilling slot's next prompt chunk (PREFILL_STEP tokens), and each replying
slot's next token, sampled from its own logits with its own sampler; one llama_decode, and each
slot takes its own rows' logits. On a memory-bound machine a step of N rows costs little more than
a step of one, and requests that arrive together are prefilled together.

A prompt is decoded by the turn's own code (Conversation.feed: merges, images, restore on error),
run on a greenlet per request (Prefill): where it would decode a chunk, it hands the chunk to the
worker and is resumed with its logits after the step. So a long prompt does not hold the others
up (vLLM's chunked prefill), and a chunk that must go alone (an image, a merge's repeat-pass
chunk) lets the others step before the turn goes on; rows whose attention statistics are
gathered share the batch (the hook counts each sequence's own rows). A request whose
client has gone (a closed stream, or a non-streamed request whose connection closed), whose
--timeout has passed, or that is still running at shutdown, is dropped from the queue or stopped
at the next chunk boundary (prefill chunk, repeat-pass chunk or decode step); its slot keeps what
it had before the turn (or the reply so far) and is reused.

Clients send images as data URLs; local paths are read only under --allowed-local-media, every
image read is bounded by --max-image-bytes (bindings/media.py), and a prompt over
--max-prompt-tokens is refused before any work.

Endpoints: POST /v1/chat/completions (streamed as server-sent events or not), GET /v1/models,
GET /health, GET /metrics (Prometheus text). Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}: 400 for a request to fix, 401 without the
--api-key, 408 past --timeout, 413 for a body over MAX_BODY, 503 when the buffer is held by
replying conversations or the server is shutting down.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import os
import sys
import threading
import time

import greenlet
import numpy as np
import pydantic
import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from sse_starlette.sse import EventSourceResponse

from . import chat_api, text_api, tool_calls
from .conversation import Conversation
from .engine import Engine, NoRoomError
from ..bindings.allocator import return_freed_blocks
from ..bindings import sampling
from ..bindings.prompt import Segment
from ..bindings.runtime import DecodeError
from ..errors import FlowMMError

MAX_BODY = 64 * 1024 * 1024  # bytes: a few images as data URLs
METRICS_EVERY = 16           # worker steps between refreshes of the /metrics figures while replying
PREFILL_STEP = 128           # prompt tokens a slot prefills before the others get a turn (~2 s on 2 cores, 0.5B)
MAX_PROMPT_SHARES = 8        # default --max-prompt-tokens: this many slot shares (n_ctx / slots), merged as it goes
DISCONNECT_POLL_S = 0.25     # how often a waiting non-streamed request checks that its client is still there
MAX_UNREAD_PIECES = 64       # a stream's pieces sent but not yet taken by its client before its decode pauses
PAUSED_WAIT_S = 0.01         # the worker's nap when every replying stream is paused and nothing else is due
ADMIT_STEP = PREFILL_STEP    # new tokens a merging slot must have room for beyond its budget to start a turn
TURN_OVERHEAD = 16           # positions a chat template adds around a turn's text (an estimate, for claims)


class Stopped(FlowMMError):
    """A running request stopped at a chunk boundary: its client left, its time ran out, or the
    server is shutting down (`status` and the message: what the client is told, if anyone
    listens; the error's code follows from the status, _error_code)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# Fields of OpenAI's request that change what the reply must be and that this server does not
# build: a request that sets one is refused with a 400 naming it, never answered as if it had not.
REFUSED_FIELDS = ("functions", "function_call", "audio", "prediction", "web_search_options")


class ChatRequest(chat_api.SamplingFields):
    """The fields of OpenAI's chat completion request this server honours; REFUSED_FIELDS are
    refused; others (user, metadata, store, ...) change nothing and are accepted."""

    messages: list
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = pydantic.Field(None, ge=0, le=20)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a client may ask of the server (serve's flags)."""

    media: chat_api.MediaPolicy = chat_api.MediaPolicy()  # data URLs only; --allowed-local-media, --max-image-bytes
    max_prompt_tokens: int | None = None  # None: MAX_PROMPT_SHARES slot shares
    timeout: float | None = None          # seconds a request may take in all (--timeout); None: no limit


def error_body(message: str, kind: str = "invalid_request_error", code=None, param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code=None, param=None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


@dataclasses.dataclass
class Job:
    """One request on its way through the worker; events go back to the HTTP side's queue."""

    turns: list
    max_tokens: int | None
    params: sampling.SamplingParams
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    deadline: float | None = None  # time.monotonic() past which the request is stopped (--timeout)
    conv: Conversation | None = None
    stream: object = None  # its reply (reply_stream.ReplyStream), once its prompt is decoded
    logprobs: int | None = None  # each token's log probability and this many alternatives; None: off
    tools: list | None = None  # rendered for the conversation (tool_calls.check_tools)
    parse_calls: object = None  # the tool-call family whose calls the reply is parsed for; None: none
    raw: str | None = None  # a completions prompt, continued without the chat template (turns empty)
    merges0: int = 0
    merge_s0: float = 0.0
    t_decode: float = 0.0
    waits_for_room: bool = False  # its turn found the buffer held by replies: start again once none is active
    cache_prompt: bool = True  # llama-server's field: False, its slot keeps nothing of what it held
    estimate: tuple | None = None  # (turns its slot held, positions the rest add): Worker._new_tokens
    sent: int = 0    # pieces the worker sent (worker thread)
    taken: int = 0   # pieces the HTTP side took off the queue (its event loop)

    @property
    def keys(self) -> list:
        return [t.key for t in self.turns]

    @property
    def paused(self) -> bool:
        """The client has not taken MAX_UNREAD_PIECES of its pieces: decode no further for it until
        it does (llama-server blocks on the socket instead). A slow reader's queue stays bounded, and a
        client that left without being noticed yet holds its slot idle, not busy decoding."""
        return self.sent - self.taken >= MAX_UNREAD_PIECES

    def send(self, *event) -> None:
        self.sent += event[0] == "piece"
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the HTTP side's loop is closed (shutting down): nobody is listening
            self.cancelled.set()


@dataclasses.dataclass
class Counters:
    requests: int = 0
    errors: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    merges: int = 0               # merges a request waited for (its turn did not fit the free room)
    merge_seconds: float = 0.0
    background_merges: int = 0    # merges run after the replies, while no request was waiting
    background_merge_seconds: float = 0.0
    reused_tokens: int = 0  # prompt positions a slot already held


@dataclasses.dataclass
class Prefill:
    """A job's prompt being decoded, on a greenlet of its own (the worker thread's coroutine):
    it runs until its next prompt chunk is to be decoded (`chunk`: tokens, pos0, seq_id), which
    the worker puts into its next step's batch, or until it yields at a chunk boundary it
    decoded alone (`chunk` None); the worker resumes it with the chunk's logits (or the
    exception that stops it). A greenlet keeps the turn's own code (Conversation.feed: merges,
    images, restore on error) one straight call, as chat runs it."""

    job: Job
    run: greenlet.greenlet
    chunk: tuple | None = None
    batched: bool = False  # its last chunk went through the step's batch (no yield owed at its boundary)


class Worker(threading.Thread):
    """The only thread that calls llama.cpp: starts queued jobs when a slot is free, and steps
    them all, one batch per step: every prefilling job's next prompt chunk and every replying
    job's next token (llama-server's update_slots); merges idle slots down to their budget when
    nothing else is waiting (reply first, merge after), keeps the /metrics figures."""

    def __init__(self, engine: Engine, prefill_step: int = PREFILL_STEP):
        super().__init__(name="flowmm-worker", daemon=True)
        self.engine = engine
        self.slots = [Conversation(engine, prefill_step=prefill_step) for _ in range(engine.n_slots)]
        self.pending: collections.deque[Job] = collections.deque()
        self.prefills: list[Prefill] = []  # jobs whose prompt is being decoded, in the order they started
        self.active: list[Job] = []  # jobs replying
        self.cond = threading.Condition()
        self.stopping = False
        self.counters = Counters()
        self.figures: dict = {}
        self._merge_failed: set[int] = set()  # slots whose idle merge failed: not tried again before their next request
        self._idle_merging = False  # _merge runs: a request that arrives interrupts its repeat pass
        self._refresh()

    # -- the HTTP side's calls (any thread) --------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            self.pending.append(job)
            if self._idle_merging:  # the request goes first: an idle merge's repeat pass stops mid-decode
                self.engine.ctx.interrupt()
            self.cond.notify()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            if self._idle_merging:
                self.engine.ctx.interrupt()
            self.cond.notify()

    def metrics(self) -> dict:
        with self.cond:
            return dict(self.figures, queued=len(self.pending), counters=dataclasses.replace(self.counters))

    # -- the worker thread ---------------------------------------------------------------------------

    def run(self) -> None:
        steps = 0
        while True:
            with self.cond:
                idle = None
                while not self.stopping and not self.pending and not self.active and not self.prefills:
                    idle, wait = self.engine.merge_schedule.idle_pick(self.slots, skip=self._merge_failed)
                    if idle is not None:
                        break
                    self.cond.wait(wait)
                if self.stopping:
                    break
            started = self._start_queued()
            stepped = self._step()
            if idle is not None and not started and not self.active and not self.prefills:
                self._merge(idle)
            elif not started and self.active and not stepped:  # every stream waits for its client
                with self.cond:
                    self.cond.wait(PAUSED_WAIT_S)
            steps += 1
            if started or steps % METRICS_EVERY == 0:
                self._refresh()
        for p in list(self.prefills):  # each stops where it is, its slot as before its turn
            self._resume(p, Stopped(503, "the server is shutting down"))
        for job in list(self.active):
            self._finish(job)
            job.send("error", 503, "the server is shutting down")
        for job in list(self.pending):
            job.send("error", 503, "the server is shutting down")

    def _start_queued(self) -> int:
        """Start every queued job that can start now (see _next_job), each on its slot before the
        next is given one; returns how many."""
        n = 0
        while True:
            with self.cond:
                job, slot = self._next_job()
            if job is None:
                return n
            self._start(job, slot)
            n += 1

    def _progress(self, p: Prefill):
        """The slot's progress listener while `p`'s job runs: stop it here if it must stop; else,
        on its prefill's greenlet, where the chunk just decoded went alone (an image, a merge's
        chunk), let the others have a step before it goes on (statistics are per sequence: the
        others' rows leave a request open here untouched)."""
        def on_progress(what, done, total, note=""):
            if what == "note":
                return
            why = self._must_stop(p.job)
            if why is not None:
                raise why
            if p.run is not greenlet.getcurrent():
                return
            if p.batched:
                p.batched = False
                return
            self._suspend(None)
        return on_progress

    def _batcher(self, p: Prefill):
        """Conversation.batcher of `p`'s job (called on its greenlet): hand each chunk to the worker,
        which decodes it in its next step's batch; returns the chunk's last logits."""
        def batch_chunk(tokens: list[int], pos0: int, seq_id: int) -> np.ndarray:
            logits = self._suspend((tokens, pos0, seq_id))
            p.batched = True
            return logits
        return batch_chunk

    @staticmethod
    def _suspend(chunk):
        got = greenlet.getcurrent().parent.switch(chunk)
        if isinstance(got, BaseException):
            raise got
        return got

    def _resume(self, p: Prefill, value=None) -> None:
        """Run a prefill on until it wants its next chunk decoded (or yields), or its turn is over."""
        chunk = p.run.switch(value)
        if p.run.dead:
            self.prefills.remove(p)
        else:
            p.chunk = chunk

    def _must_stop(self, job: Job) -> Stopped | None:
        if self.stopping:
            return Stopped(503, "the server is shutting down")
        if job.deadline is not None and time.monotonic() > job.deadline:
            return Stopped(408, "the request took longer than the server's --timeout")
        if job.cancelled.is_set():
            return Stopped(499, "the client closed the request")
        return None

    def _next_job(self) -> tuple[Job | None, Conversation | None]:
        """The first queued job that can go now, taken off the queue, with its slot (None for a
        cancelled one), which then holds its claim on the buffer (see _admit). Queued jobs keep their order:
        one that waits for room holds back those behind it (llama-server queues a request until
        a slot is free); a job that found no room mid-turn goes once no other request holds any."""
        for job in self.pending:
            slot = None
            if job.deadline is not None and time.monotonic() > job.deadline:
                job.send("error", 408, "the request waited longer than the server's --timeout")
                job.cancelled.set()
            if not job.cancelled.is_set():
                if job.waits_for_room and (self.active or self.prefills):
                    continue
                slot = self._slot_for(job)
                if slot is None:
                    continue
                if not self._admit(job, slot):
                    return None, None
            self.pending.remove(job)
            return job, slot
        return None, None

    def _admit(self, job: Job, slot: Conversation) -> bool:
        """Whether `job` can start on `slot` now (Engine.claim_turn: the slot then holds its claim)."""
        held = slot.held_prefix(job.keys) if job.cache_prompt else 0
        return self.engine.claim_turn(slot, keeps=bool(held), new=self._new_tokens(job, held),
                                      replies_active=bool(self.active or self.prefills), step=ADMIT_STEP)

    def _new_tokens(self, job: Job, held: int) -> int:
        """The positions the job's turns beyond the `held` ones add, estimated: their text tokens
        and TURN_OVERHEAD each for the template's markup (an image counts only by its marker:
        a claim that falls short is topped up from unclaimed cells, or the turn merges as it goes)."""
        if job.raw is not None:  # a completions prompt: all of it (an upper bound where a slot holds its start)
            texts = [job.raw]
        else:
            texts = [t.text for t in job.turns[held:]]
        if job.estimate is None or job.estimate[0] != held:
            job.estimate = (held, sum(len(self.engine.model.tokenize(t, add_special=False, parse_special=False))
                                      + TURN_OVERHEAD for t in texts))
        return job.estimate[1]

    def _merge(self, conv: Conversation) -> None:
        """Merge an idle slot, stopping once a request is queued (its repeat pass inside the decode
        it is running, see submit; the rest at the next chunk boundary): it goes on from there at
        the next idle time."""
        t0 = time.perf_counter()
        with self.cond:
            self._idle_merging = True  # from here submit() and stop() interrupt; the finally clears it
        try:
            merged = conv.merge(stop=lambda: bool(self.pending) or self.stopping,
                                teacher=self.engine.merge_schedule.idle_teacher)
        except FlowMMError as e:  # the cache is as it was; its next request merges in the foreground if it must
            conv.merge_error = str(e)
            self._merge_failed.add(conv.seq_id)
            return
        finally:
            with self.cond:
                self._idle_merging = False
                self.engine.ctx.clear_interrupt()
            self.counters.background_merge_seconds += time.perf_counter() - t0
        self.counters.background_merges += int(merged)
        self._refresh()

    def _slot_for(self, job: Job) -> Conversation | None:
        """The free slot holding the longest prefix of the job's conversation; else, for a job
        that starts afresh, the free slot whose cache shares the most of its beginning (first
        turns, such as a system prompt, whose cells it keeps: llama-server's slot prompt
        similarity); else, and among equals, the free one used least recently; else None: the
        job waits."""
        free = [c for c in self.slots if not c.busy]
        keys = job.keys
        holding = [c for c in free if job.cache_prompt and (
            c.held_prefix(keys) if job.raw is None else c.holds_raw_prefix(job.raw))]
        if holding:
            return max(holding, key=lambda c: c.held_prefix(keys) if job.raw is None else c.pos)
        shared = {c.seq_id: c.shared_start(keys, job.raw) if job.cache_prompt else 0 for c in free}
        return min(free, key=lambda c: (-shared[c.seq_id], c.last_used)) if free else None

    def _start(self, job: Job, conv: Conversation | None) -> None:
        """Start a job on its slot: its prompt is decoded on a greenlet of its own (Prefill), run
        here up to its first chunk; the steps decode the rest."""
        if job.cancelled.is_set():
            self.counters.cancelled += 1
            if conv is not None:
                self.engine.release(conv)
            return
        p = Prefill(job, greenlet.greenlet(lambda _: self._prefill(job)))
        conv.begin_request(self._progress(p), self._batcher(p))
        self._merge_failed.discard(conv.seq_id)
        job.conv, job.merges0, job.merge_s0 = conv, conv.stats.merges, conv.stats.merge_seconds
        self.counters.requests += 0 if job.waits_for_room else 1  # a retry is the same request
        self.prefills.append(p)
        self._resume(p)

    def _prefill(self, job: Job) -> None:
        """A job's turn, on its Prefill's greenlet: decode what its slot does not hold; then it replies."""
        conv = job.conv
        t0 = time.perf_counter()
        try:
            held, decoded = (conv.feed(job.turns, job.tools, reuse=job.cache_prompt) if job.raw is None
                             else conv.feed_raw(job.raw, reuse=job.cache_prompt))
            job.stream = conv.reply_stream(job.max_tokens, job.params, job.stop, job.logprobs,
                                           job.parse_calls.opening if job.parse_calls else None)
        except Exception as e:
            conv.end_request()
            if isinstance(e, Stopped):  # stopped at a chunk boundary; the slot is as before the turn
                self.counters.cancelled += 1
                job.send("error", e.status, str(e))
                return
            if isinstance(e, NoRoomError) and (self.active or len(self.prefills) > 1):
                job.waits_for_room = True  # the others will give their room back: wait, first in line
                with self.cond:
                    self.pending.appendleft(job)
                return
            self.counters.errors += 1
            if isinstance(e, NoRoomError):
                job.send("error", 503, str(e))
            elif isinstance(e, DecodeError):  # llama.cpp refused a batch: not the client's doing
                job.send("error", 500, str(e))
            elif isinstance(e, FlowMMError):  # the request's own problem
                job.send("error", 400, str(e))
            else:  # a bug: say so, keep serving the others
                job.send("error", 500, f"internal error: {type(e).__name__}: {e}")
            return
        self.counters.prompt_tokens += decoded
        self.counters.prompt_seconds += time.perf_counter() - t0
        self.counters.reused_tokens += held
        job.send("start", held + decoded, held)
        self.active.append(job)

    def _step(self) -> int:
        """One llama_decode for everything that can go on (llama-server's update_slots): the
        prefilling jobs' next prompt chunks, as many as n_batch holds beside a row for each
        replying job, and each replying job's next token, sampled from its own logits with its own
        sampler; each takes its own logits back. Then the prefills run on to their next chunk (a
        yielded one too). Returns how many jobs moved."""
        n_batch, chunks, used, observed = self.engine.ctx.n_batch, [], 0, False
        for p in self.prefills:
            if p.chunk is None or used + len(p.chunk[0]) > n_batch - len(self.active):
                continue
            if p.job.conv.observed:  # a batch counts one observed sequence's rows: the next waits a step
                if observed:
                    continue
                observed = True
            chunks.append(p)
            used += len(p.chunk[0])
        free = self.engine.free_cells(reserved=False)
        room = min(n_batch, free) - used if chunks else max(1, free)  # (one row alone may make room)
        moved, batch = self._gather(max(0, room))
        yielded = [p for p in self.prefills if p.chunk is None]  # (they go on after the step too)
        lasts = []
        if chunks or batch:
            t0 = time.perf_counter()
            try:
                lasts, logits = self.engine.ctx.decode_rows(self._rows(batch), [p.chunk for p in chunks])
            except Exception as e:
                lasts, logits = [e] * len(chunks), e  # each chunk's turn raises it (and is undone)
            self._deliver(batch, logits, time.perf_counter() - t0)
        for p, got in [*zip(chunks, lasts), *((p, None) for p in yielded)]:
            p.chunk = None
            self._resume(p, got)
        return moved + len(batch) + len(chunks) + len(yielded)

    @staticmethod
    def _rows(batch) -> list[tuple[int, int, int]]:
        return [(tok, job.conv.pos, job.conv.seq_id) for job, tok in batch]

    def _gather(self, room: int) -> tuple[int, list]:
        """Each replying job that may go on samples its next token, and shows it (llama-server sends
        a token once it is sampled): (jobs that ended or failed, [(job, token)] to decode), at most
        `room` of them (no free cell left for a row: its job goes at the next step)."""
        moved, batch = 0, []
        for job in list(self.active):
            why = self._must_stop(job)
            if why is not None:  # the reply so far is kept as the conversation's (see Conversation.reply)
                self.counters.cancelled += 1
                self._finish(job)
                job.send("error", why.status, str(why))
                moved += 1
                continue
            if job.paused or len(batch) >= room:
                continue
            try:
                tok = job.stream.next_token()
            except Exception as e:
                self._fail(job, e)
                moved += 1
                continue
            if tok is None:
                self._done(job)
                moved += 1
                continue
            piece = job.stream.show(tok)
            if piece:
                job.send("piece", piece, job.stream.take_logprobs())
            batch.append((job, tok))
        return moved, batch

    def _deliver(self, batch: list, logits, seconds: float) -> None:
        """Each row's logits to its job (or the decode's exception: the jobs fail, the others go on)."""
        if isinstance(logits, BaseException):
            for job, _ in batch:
                self._fail(job, logits)
            return
        for (job, _), row in zip(batch, logits):
            job.t_decode += seconds / len(batch)
            job.stream.decoded(row)
            if job.stream.done:
                self._done(job)

    def _done(self, job: Job) -> None:
        rest = job.stream.tail()
        if rest:
            job.send("piece", rest, job.stream.take_logprobs())  # (a stop string's own tokens are not shown)
        conv = job.conv
        self._finish(job)
        calls = job.parse_calls.parse(job.stream.full)[1] if job.parse_calls else []
        job.send("done", "tool_calls" if calls else conv.finish_reason, conv.last_reply_tokens, calls)

    def _fail(self, job: Job, e: Exception) -> None:
        self.counters.errors += 1
        self._finish(job)
        job.send("error", 500, f"internal error: {type(e).__name__}: {e}")

    def _finish(self, job: Job) -> None:
        conv = job.conv
        job.stream.close()  # the reply so far becomes the conversation's
        self.active.remove(job)
        conv.end_request()
        self.counters.generated_tokens += getattr(conv, "last_reply_tokens", 0) or 0
        self.counters.generation_seconds += job.t_decode
        self.counters.merges += max(0, conv.stats.merges - job.merges0)
        self.counters.merge_seconds += max(0.0, conv.stats.merge_seconds - job.merge_s0)
        self._refresh()

    def _refresh(self) -> None:
        e = self.engine
        slots = [{"id": c.seq_id, "cells": c.cells(), "positions": c.pos, "busy": c.busy,
                  "evictions": c.stats.evictions} for c in self.slots]
        used = sum(s["cells"] for s in slots)
        figures = {"cells_total": e.n_ctx, "cells_used": used, "bytes_per_cell": e.bytes_per_cell,
                   "bytes_saved": sum(max(0, s["positions"] - s["cells"]) for s in slots) * e.bytes_per_cell,
                   "slots": slots, "importance": e.importance_state(), "learned_tokens": e.learned_tokens()}
        with self.cond:
            self.figures = figures


def _prometheus(m: dict) -> str:
    c: Counters = m["counters"]
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP flowmm_{name} {help_}")
        lines.append(f"# TYPE flowmm_{name} {kind}")
        lines.extend(f"flowmm_{name}{labels} {value:g}" for labels, value in samples)

    metric("kv_cells_total", "gauge", "cells in the shared KV buffer", [("", m["cells_total"])])
    metric("kv_cells_used", "gauge", "cells the conversations hold", [("", m["cells_used"])])
    metric("kv_slot_cells", "gauge", "cells each slot holds", [(f'{{slot="{s["id"]}"}}', s["cells"]) for s in m["slots"]])
    metric("kv_slot_positions", "gauge", "positions each slot's conversation spans (its full cache's cells)",
           [(f'{{slot="{s["id"]}"}}', s["positions"]) for s in m["slots"]])
    metric("kv_bytes_saved", "gauge", "KV bytes the slots' full caches would take beyond what they hold",
           [("", m["bytes_saved"])])
    metric("slots_busy", "gauge", "slots serving a request", [("", sum(s["busy"] for s in m["slots"]))])
    metric("requests_queued", "gauge", "requests waiting for a slot", [("", m["queued"])])
    metric("requests_total", "counter", "requests started", [("", c.requests)])
    metric("requests_errors_total", "counter", "requests that failed", [("", c.errors)])
    metric("requests_cancelled_total", "counter", "requests whose client went away", [("", c.cancelled)])
    metric("merges_total", "counter", "merges of a slot's cache, by whether a request waited for them",
           [('{schedule="foreground"}', c.merges), ('{schedule="background"}', c.background_merges)])
    metric("merge_seconds_total", "counter", "seconds spent merging, by whether a request waited for them",
           [('{schedule="foreground"}', c.merge_seconds), ('{schedule="background"}', c.background_merge_seconds)])
    metric("evictions_total", "counter", "slots emptied to make room for another",
           [("", sum(s["evictions"] for s in m["slots"]))])
    metric("prompt_tokens_total", "counter", "prompt positions decoded", [("", c.prompt_tokens)])
    metric("prompt_tokens_reused_total", "counter", "prompt positions a slot held already", [("", c.reused_tokens)])
    metric("tokens_predicted_total", "counter", "tokens generated", [("", c.generated_tokens)])
    metric("prompt_tokens_seconds", "gauge", "prompt tokens decoded per second",
           [("", c.prompt_tokens / c.prompt_seconds if c.prompt_seconds else 0.0)])
    metric("predicted_tokens_seconds", "gauge", "tokens generated per second",
           [("", c.generated_tokens / c.generation_seconds if c.generation_seconds else 0.0)])
    metric("importance_state", "gauge", "how merges score the cells: 1 for the state in force",
           [(f'{{state="{st}"}}', float(m["importance"] == st)) for st in ("learning", "predicted", "repeat")])
    metric("importance_learned_tokens", "gauge", "tokens self-distillation has fitted on while learning",
           [("", m["learned_tokens"])])
    return "\n".join(lines) + "\n"


def create_app(worker: Worker, model_name: str, api_key: str | None = None, max_tokens: int | None = None,
               limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="flowmm-edge", docs_url=None, redoc_url=None, openapi_url=None)
    engine = worker.engine
    max_prompt = limits.max_prompt_tokens or MAX_PROMPT_SHARES * (engine.n_ctx // engine.n_slots)
    tool_family = tool_calls.family_for(engine.template.jinja_text(engine.model))  # None: tools get a 400
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)
    # outermost: a browser's preflight is answered as llama-server's default answers it (any origin,
    # echoed, with credentials) without the key; the requests themselves still need it
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"],
                       allow_headers=["*"])

    @app.exception_handler(HTTPError)
    async def http_error(_request: Request, e: HTTPError):
        return JSONResponse(error_body(str(e), e.kind, e.code, e.param), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(_request: Request, _e):
        return JSONResponse(error_body("no such endpoint", code="not_found"), status_code=404)

    @app.exception_handler(405)
    async def bad_method(_request: Request, _e):
        return JSONResponse(error_body("method not allowed on this endpoint"), status_code=405)

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "flowmm-edge"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(worker.metrics()), media_type="text/plain; version=0.0.4")

    def _params(req, grammar: str | None, triggers: tuple = ()) -> sampling.SamplingParams:
        """The request's sampling settings over the server's, checked (400s name the field)."""
        try:
            bias = tuple((int(t), float(b)) for t, b in (req.logit_bias or {}).items())
        except ValueError:
            raise HTTPError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        if any(not 0 <= t < engine.model.n_vocab for t, _ in bias):
            raise HTTPError(400, f"logit_bias names a token outside the vocabulary of {engine.model.n_vocab}",
                            param="logit_bias")
        params = worker.engine.sampling.override(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                                 min_p=req.min_p, repeat_penalty=req.repeat_penalty, seed=req.seed,
                                                 ignore_eos=req.ignore_eos, frequency_penalty=req.frequency_penalty,
                                                 presence_penalty=req.presence_penalty, logit_bias=bias or None,
                                                 grammar=grammar, grammar_triggers=triggers)
        try:
            params.check()
        except sampling.SamplingError as e:
            raise HTTPError(400, str(e)) from None
        return params

    def _stops(req) -> list[str]:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop) or len(stop) > 8:
            raise HTTPError(400, "stop takes at most 8 non-empty strings", param="stop")
        return stop

    def _jobs(req, turns, max_reply, params, stop, **kw) -> list[Job]:
        """The request's `n` choices as jobs, choice i drawn with seed + i (a random seed stays
        random). Each runs on its own slot as any request does, so the worker decodes them in one
        batch; a slot holding the conversation serves the first, the others prefill it afresh (the
        cells a sequence copy would share could not be merged while shared) and each keeps its
        choice, so a client that goes on with any of them finds its prefix held."""
        deadline = None if limits.timeout is None else time.monotonic() + limits.timeout
        jobs = [Job(turns, max_reply or max_tokens,
                    params if i == 0 or params.seed < 0 else dataclasses.replace(params, seed=params.seed + i),
                    stop, asyncio.get_running_loop(), asyncio.Queue(), deadline=deadline, cache_prompt=req.cache_prompt,
                    **kw) for i in range(req.n)]
        for job in jobs:
            worker.submit(job)
        return jobs

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request)
        try:
            turns = chat_api.parse_messages(req.messages, limits.media)
        except chat_api.RequestError as e:
            raise HTTPError(400, str(e), param="messages") from None
        n_prompt = _prompt_tokens(engine.model, turns, max_prompt)
        if n_prompt > max_prompt:
            raise HTTPError(400, f"the prompt's {n_prompt} tokens are over this server's limit of {max_prompt} "
                                 f"(--max-prompt-tokens)", code="context_length_exceeded", param="messages")
        try:
            grammar = chat_api.grammar_for(req.response_format)
        except chat_api.FormatError as e:
            raise HTTPError(400, str(e), param="response_format") from None
        try:
            tools, parse_calls, grammar, triggers = tool_calls.plan(turns, req.tools, req.tool_choice,
                                                                    req.parallel_tool_calls, tool_family, grammar)
        except tool_calls.ToolsError as e:
            raise HTTPError(400, str(e), param=e.param) from None
        params, stop = _params(req, grammar, triggers), _stops(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
        jobs = _jobs(req, turns, req.max_completion_tokens or req.max_tokens, params, stop,
                     logprobs=(req.top_logprobs or 0) if req.logprobs else None, tools=tools, parse_calls=parse_calls)
        cid = chat_api.completion_id()

        def whole(prompt, text, entries, finish, n_reply, calls):
            logprobs = None if jobs[0].logprobs is None else chat_api.logprobs_content(engine.model, entries)
            return chat_api.completion(cid, model_name, text, finish, chat_api.usage(*prompt, n_reply), server=True,
                                       logprobs=logprobs, tool_calls=chat_api.tool_calls_field(calls))
        return await _answer(jobs, request, req, cid, chat_shape(cid), whole)

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request):
        """OpenAI's legacy completions: a prompt string continued as it is, no chat template."""
        req = await _parse(request, text_api.CompletionRequest, text_api.REFUSED_FIELDS)
        try:
            prompt = text_api.prompt_text(req.prompt)
        except chat_api.RequestError as e:
            raise HTTPError(400, str(e), param="prompt") from None
        n_prompt = _prompt_tokens(engine.model, [chat_api.Turn("user", (Segment("text", prompt),), ())],
                                  max_prompt)
        if n_prompt > max_prompt:
            raise HTTPError(400, f"the prompt's {n_prompt} tokens are over this server's limit of {max_prompt} "
                                 f"(--max-prompt-tokens)", code="context_length_exceeded", param="prompt")
        jobs = _jobs(req, [], req.max_tokens or text_api.DEFAULT_MAX_TOKENS, _params(req, None), _stops(req),
                     logprobs=req.logprobs, raw=prompt)
        cid = text_api.completion_id()

        def whole(prompt, text, entries, finish, n_reply, _calls):
            logprobs = None if jobs[0].logprobs is None else text_api.logprobs_field(engine.model, entries)
            return text_api.completion(cid, model_name, text, finish, chat_api.usage(*prompt, n_reply), logprobs)
        return await _answer(jobs, request, req, cid, text_shape(cid), whole)

    async def _answer(jobs: list[Job], request: Request, req, cid: str, shape, whole):
        """The reply streamed (its chunks made by `shape`) or, when every choice is done, `whole((prompt
        positions, held), text, logprob entries, finish_reason, reply tokens, tool calls)` per
        choice, the choices numbered in one body (the prompt counted once, the replies summed)."""
        if req.stream:
            return await _stream(jobs, cid, bool((req.stream_options or {}).get("include_usage")), shape)
        try:
            done = await asyncio.gather(*(_collect(job, request) for job in jobs))
        finally:
            for job in jobs:  # a no-op for those done; frees the others' slots when one failed
                job.cancelled.set()
        hung_up = [d for d in done if isinstance(d, JSONResponse)]
        if hung_up:
            return hung_up[0]
        bodies = [whole(*d) for d in done]
        if len(bodies) > 1:
            bodies[0]["choices"] = [dict(b["choices"][0], index=i) for i, b in enumerate(bodies)]
            bodies[0]["usage"] = chat_api.usage(*done[0][0], sum(d[4] for d in done))
        return bodies[0]

    async def _collect(job: Job, request: Request):
        """Wait for the worker's reply: ((prompt positions, held), text, logprob entries,
        finish_reason, reply tokens, tool calls), or a 499 response for a client that hung up."""
        try:
            prompt, pieces, entries = (0, 0), [], []
            while True:
                try:  # wait for the worker, and notice a client that hangs up meanwhile
                    kind, *rest = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancelled.set()
                        return JSONResponse(error_body("the client closed the request", code="cancelled"),
                                            status_code=499)
                    continue
                if kind == "error":
                    raise HTTPError(rest[0], rest[1], _error_kind(rest[0]), code=_error_code(rest[0]))
                if kind == "start":
                    prompt = rest
                elif kind == "piece":
                    pieces.append(rest[0])
                    entries += rest[1]
                    job.taken += 1
                else:
                    return tuple(prompt), "".join(pieces), entries, rest[0], rest[1], rest[2]
        finally:
            job.cancelled.set()  # a no-op once done; frees the slot if the handler was cancelled

    def chat_shape(cid: str):
        """How a chat stream's events become chunks (OpenAI's chat.completion.chunk)."""
        def first():
            return chat_api.chunk(cid, model_name, {"role": "assistant", "content": ""}, server=True)

        def piece(text, entries):
            logprobs = None if entries is None else chat_api.logprobs_content(engine.model, entries)
            return chat_api.chunk(cid, model_name, {"content": text}, server=True, logprobs=logprobs)

        def calls(found):
            return chat_api.chunk(cid, model_name, {"tool_calls": chat_api.tool_calls_field(found, streamed=True)},
                                  server=True)

        def last(finish):
            return chat_api.chunk(cid, model_name, {}, finish, server=True)

        def usage(u):
            return chat_api.usage_chunk(cid, model_name, u, server=True)
        return first, piece, calls, last, usage

    def text_shape(cid: str):
        """How a completions stream's events become chunks (OpenAI's text_completion)."""
        def piece(text, entries):
            logprobs = None if entries is None else text_api.logprobs_field(engine.model, entries)
            return text_api.chunk(cid, model_name, text, None, logprobs)
        return (None, piece, None, lambda finish: text_api.chunk(cid, model_name, "", finish),
                lambda u: text_api.usage_chunk(cid, model_name, u))

    async def _stream(jobs: list[Job], cid: str, include_usage: bool, shape):
        """The choices' events as one stream of chunks, each numbered by its choice. The first
        choice's start is awaited before the first byte (its errors are plain HTTP errors); the
        others' come as they come (a choice waiting for a slot must not hold back the stream
        whose unread pieces would pause the choices holding the slots)."""
        first, piece, calls, last, usage_chunk = shape
        try:
            kind, *rest = await jobs[0].events.get()
        except BaseException:  # the client left while the request waited or prefilled
            for job in jobs:
                job.cancelled.set()
            raise
        if kind == "error":
            for job in jobs:
                job.cancelled.set()
            raise HTTPError(rest[0], rest[1], _error_kind(rest[0]), code=_error_code(rest[0]))
        prompt = rest

        def numbered(chunk: dict, i: int) -> str:
            if len(jobs) > 1:
                chunk = dict(chunk, choices=[dict(c, index=i) for c in chunk["choices"]])
            return json.dumps(chunk)

        async def events():
            waiting = {}
            try:
                if first is not None:
                    for i in range(len(jobs)):
                        yield numbered(first(), i)
                waiting = {asyncio.ensure_future(job.events.get()): i for i, job in enumerate(jobs)}
                replied = 0
                while waiting:
                    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                    for task in sorted(done, key=waiting.get):
                        i = waiting.pop(task)
                        job = jobs[i]
                        kind, *rest = task.result()
                        if kind == "start":
                            waiting[asyncio.ensure_future(job.events.get())] = i
                        elif kind == "piece":
                            job.taken += 1
                            yield numbered(piece(rest[0], rest[1] if job.logprobs is not None else None), i)
                            waiting[asyncio.ensure_future(job.events.get())] = i
                        elif kind == "done":
                            if rest[2] and calls is not None:  # the calls, whole, in one delta (numbered by index)
                                yield numbered(calls(rest[2]), i)
                            yield numbered(last(rest[0]), i)
                            replied += rest[1]
                        else:
                            yield json.dumps(error_body(rest[1], "server_error"))
                            return
                if include_usage:
                    yield json.dumps(usage_chunk(chat_api.usage(prompt[0], prompt[1], replied)))
                yield "[DONE]"
            finally:
                for task in waiting:
                    task.cancel()
                for job in jobs:
                    job.cancelled.set()  # the client went away (or the stream ended): free the slots

        return EventSourceResponse(events(), sep="\n")

    return app


class _RequireKey:
    """401 without the key on every path but /health: 'Authorization: Bearer KEY', or 'X-Api-Key:
    KEY' (Anthropic's header), as llama-server reads them. Plain ASGI, not Starlette's
    BaseHTTPMiddleware, which hides a client's disconnect from the endpoint (and so from the
    worker's cancellation)."""

    PUBLIC = ("/health", "/v1/health")

    def __init__(self, app, key: str):
        self.app, self.want = app, key.encode("latin-1")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.PUBLIC:
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization") or headers.get(b"x-api-key") or b""
            given = given[len(b"Bearer "):] if given.startswith(b"Bearer ") else given
            if not hmac.compare_digest(given, self.want):
                await JSONResponse(error_body("invalid or missing API key", "authentication_error", "invalid_api_key"),
                                   status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _prompt_tokens(model, turns, limit: int) -> int:
    """The request's text tokens, or a bound when that decides it: a token is at least one byte,
    so a text of at most `limit` bytes cannot be over the limit and is not tokenized here."""
    texts = [t.text for t in turns]
    n_bytes = sum(len(x.encode("utf-8", "surrogatepass")) for x in texts)
    if n_bytes <= limit:
        return n_bytes
    return sum(len(model.tokenize(x, add_special=False, parse_special=False)) for x in texts)


HTTP_NICE = 10  # the HTTP side's niceness under the worker's (Linux, where it is per thread)


def _deprioritise_this_thread() -> None:
    """Lower the calling thread's CPU priority (Linux: niceness is per thread, and the threads it
    starts inherit it), so parsing a flood of requests takes cores from llama.cpp's decode only
    when they are idle. The worker and the ggml threads it starts keep theirs. Elsewhere: nothing."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HTTP_NICE)
        except (OSError, AttributeError):
            pass


def _error_kind(status: int) -> str:
    return {408: "timeout_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _error_code(status: int) -> str | None:
    return {408: "timeout", 499: "cancelled", 503: "unavailable"}.get(status)


async def _parse(request: Request, model=ChatRequest, refused=REFUSED_FIELDS):
    body = await request.body()
    if len(body) > MAX_BODY:
        raise HTTPError(413, f"request body over {MAX_BODY // 2 ** 20} MiB")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "the body must be a JSON object")
    for field in refused:
        if data.get(field) not in (None, False, [], "none"):
            raise HTTPError(400, f"'{field}' is not supported by this server (it would change what the reply must "
                                 f"be)", param=field)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "body"
        raise HTTPError(400, f"{where}: {first.get('msg', 'invalid')}", param=where) from None


class _Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or SIGINT also stops the worker at once: in-flight work
    ends at its next chunk boundary and waiting clients get 503, so the process exits in seconds
    instead of after the longest running request."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame) -> None:
        self.worker.stop()
        super().handle_exit(sig, frame)


SHUTDOWN_GRACE_S = 2  # seconds uvicorn waits for open connections to finish after the worker stopped


def serve(engine: Engine, host: str, port: int, model_name: str, api_key: str | None = None,
          max_tokens: int | None = None, log_level: str = "warning", limits: Limits = Limits()) -> None:
    return_freed_blocks()  # a large body must not leave every later few-MiB block in the heap
    worker = Worker(engine)
    worker.start()
    _deprioritise_this_thread()  # uvicorn's event loop runs here; the worker started at normal priority
    try:
        config = uvicorn.Config(create_app(worker, model_name, api_key, max_tokens, limits), host=host, port=port,
                                log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        _Server(config, worker).run()
    finally:
        worker.stop()
        worker.join(timeout=SHUTDOWN_GRACE_S)
