"""When a sequence merges: the one home of that decision (how it merges is
compression/sequence_compressor.py's).

    schedule = MergeSchedule("reply_first")
    schedule.at_turn_end(over_budget)          # a turn's last unit is decoded: merge before the reply?
    schedule.mid_turn(n, next_need, free)      # the next unit of a turn would not fit: merge first?
    schedule.idle_delay(conv, now)             # a reply has ended: seconds until its merge may run, or None
    schedule.idle_pick(convs, now)             # the server's idle step: whose merge runs now
    schedule.room_order(convs, keep)           # a turn needs room: the idle conversations to merge, then evict

The owner of a llama.cpp context calls these hooks and runs what they decide in its own way:
`Session` (the terminal chat, the Python API) on a thread of its own while the user reads
(Conversation.merge_in_background), `serve`'s worker in its idle steps and at admission. A
conversation never decides on its own.

Two schedules (`--schedule` in `chat` and `serve`, `Engine(schedule=)`):
- `reply_first` (default): a turn that fits the free room is answered from the whole cache; its
  merge runs once the reply has ended and the conversation has been idle IDLE_AFTER_S seconds.
- `blocking`: the turn's end is merged before the reply (eval's `inside` mode measures it).
Under both, a turn that does not fit the free room merges between its chunks.

Which importance an idle merge takes is decided here too (`idle_teacher`, False by default): where
a predictor exists, idle merges use it, in a chat as in a pool; where none exists the merge scores
by the repeat pass anyway (and teaches the learner). The teacher in idle time was measured worse,
not better: `eval --question followup-idle` (chat's own Session, 8 contexts of 2k tokens, the
question a later turn) answered 0.19 / 0.34 at 10 / 20% with the teacher in the idle merges and
0.62 / 0.72 with the predictor (docs/RESULTS.md); in a pool, bench_serve's 8 conversations kept
7/8 facts with a first token p50 of 20 s with the teacher, 8/8 and 2.5 s without.
"""

from __future__ import annotations

import time

from ..errors import FlowMMError

REPLY_FIRST, BLOCKING = "reply_first", "blocking"
SCHEDULES = (REPLY_FIRST, BLOCKING)
IDLE_AFTER_S = 0.0  # seconds a conversation is idle after its reply before its merge may run


class ScheduleError(FlowMMError):
    pass


class MergeSchedule:
    def __init__(self, kind: str = REPLY_FIRST, idle_after_s: float = IDLE_AFTER_S, idle_teacher: bool = False):
        """`idle_teacher`: whether an idle merge scores by the repeat pass where a predictor exists
        (see the module docstring)."""
        if kind not in SCHEDULES:
            raise ScheduleError(f"schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
        self.kind, self.idle_after_s, self.idle_teacher = kind, idle_after_s, bool(idle_teacher)

    @property
    def blocking(self) -> bool:
        return self.kind == BLOCKING

    def at_turn_end(self, over_budget: bool) -> bool:
        """A turn's last unit is decoded: whether to merge before the reply."""
        return self.blocking and over_budget

    @staticmethod
    def mid_turn(n: int, next_need: int, free: int) -> bool:
        """A unit of `n` positions is about to be decoded with `free` cells of room, and the next
        needs `next_need`: whether to merge after it, before going on (under every schedule)."""
        return n + next_need > free

    def idle_delay(self, conv, now: float | None = None) -> float | None:
        """Seconds until `conv`'s merge may run in idle time (0: now), or None when none is due."""
        if self.blocking or not conv.merge_due():
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, conv.idle_since + self.idle_after_s - now)

    def idle_pick(self, convs, now: float | None = None, skip=()):
        """(the idle conversation whose merge runs now, seconds until the next is due or None):
        of those not serving a request, whose merge is due and whose idle delay has passed, the
        one used most recently (its user is reading it)."""
        now = time.monotonic() if now is None else now
        ready, wait = [], None
        for c in convs:
            if c.busy or c.seq_id in skip:
                continue
            delay = self.idle_delay(c, now)
            if delay == 0.0:
                ready.append(c)
            elif delay is not None:
                wait = delay if wait is None else min(wait, delay)
        return (max(ready, key=lambda c: c.last_used) if ready else None), wait

    @staticmethod
    def room_order(convs, keep) -> list:
        """The idle conversations that may give room to `keep`'s turn, least recently used first:
        the engine merges those whose merge is due, then evicts in this order."""
        return sorted((c for c in convs if c is not keep and not c.busy and c.cells()), key=lambda c: c.last_used)
