"""The merge schedule (app/merge_schedule.py) decides when a conversation merges; these check its
decisions on stand-in conversations, against what each rule says by hand."""

from __future__ import annotations

import dataclasses

import pytest

from flowmm_edge.app.merge_schedule import BLOCKING, REPLY_FIRST, MergeSchedule, ScheduleError


@dataclasses.dataclass
class Conv:
    seq_id: int
    due: bool
    idle_since: float
    last_used: int
    busy: bool = False
    n_cells: int = 10

    def merge_due(self) -> bool:
        return self.due

    def cells(self) -> int:
        return self.n_cells


def test_reply_first_merges_idle_conversations_most_recent_first_after_the_idle_delay():
    s = MergeSchedule(REPLY_FIRST, idle_after_s=2.0)
    convs = [Conv(0, True, idle_since=100.0, last_used=1), Conv(1, True, idle_since=101.5, last_used=3),
             Conv(2, False, idle_since=90.0, last_used=2), Conv(3, True, idle_since=90.0, last_used=4, busy=True)]
    assert s.idle_pick(convs, now=101.0) == (None, 1.0)          # conv 0 is due at 102, conv 1 at 103.5
    assert s.idle_pick(convs, now=102.0) == (convs[0], 1.5)
    assert s.idle_pick(convs, now=104.0) == (convs[1], None)     # both ready: the one used last
    assert s.idle_pick(convs, now=104.0, skip={1}) == (convs[0], None)
    assert s.idle_delay(convs[2], now=200.0) is None             # nothing due


def test_blocking_merges_at_the_turn_end_and_never_in_idle_time():
    s = MergeSchedule(BLOCKING)
    assert s.at_turn_end(True) and not s.at_turn_end(False)
    assert s.idle_pick([Conv(0, True, 0.0, 1)], now=10.0) == (None, None)
    assert not MergeSchedule(REPLY_FIRST).at_turn_end(True)


def test_a_turn_that_does_not_fit_merges_between_its_chunks_under_every_schedule():
    for kind in (REPLY_FIRST, BLOCKING):
        s = MergeSchedule(kind)
        assert s.mid_turn(100, 1, 100) and not s.mid_turn(99, 1, 100)


def test_room_comes_from_idle_conversations_least_recently_used_first():
    convs = [Conv(0, True, 0.0, 5), Conv(1, False, 0.0, 2), Conv(2, True, 0.0, 1, busy=True), Conv(3, True, 0.0, 3, n_cells=0)]
    assert [c.seq_id for c in MergeSchedule.room_order(convs, keep=convs[0])] == [1]
    assert [c.seq_id for c in MergeSchedule.room_order(convs, keep=None)] == [1, 0]


def test_an_unknown_schedule_is_one_line():
    with pytest.raises(ScheduleError, match="'later' is not one of reply_first, blocking"):
        MergeSchedule("later")
