"""Pure tests of the deferred-change queue and the step clock."""

from __future__ import annotations

import pytest

from runctl.agent.pending import NEVER, RATE_WINDOW, PendingChanges, StepClock
from runctl.bus import messages as m


def test_due_changes_come_out_in_step_then_arrival_order() -> None:
    pending = PendingChanges()
    pending.add(5, "b", "second-at-5")
    pending.add(3, "a", "first-at-3")
    pending.add(5, "c", "third-at-5")
    pending.add(9, "d", "later")
    assert pending.pop_due(2) == []
    assert [p.command for p in pending.pop_due(5)] == ["first-at-3", "second-at-5", "third-at-5"]
    assert len(pending) == 1
    assert [p.change_id for p in pending.pop_due(100)] == ["d"]
    assert len(pending) == 0


def test_cancel_removes_only_that_change() -> None:
    pending = PendingChanges()
    pending.add(4, "keep", 1)
    pending.add(4, "drop", 2)
    assert pending.cancel("drop") == 1
    assert pending.cancel("drop") == 0
    assert [p.change_id for p in pending.pop_due(4)] == ["keep"]


def test_snapshot_describes_pending_changes() -> None:
    pending = PendingChanges()
    pending.add(7, "x", 1.5)
    pending.add(9, "y", m.Set(path="a", value=1, at_step=9, synced=True))
    assert pending.snapshot() == [
        {"at_step": 7, "change_id": "x", "kind": "float", "synced": False},
        {"at_step": 9, "change_id": "y", "kind": "set", "synced": True},
    ]


def test_step_clock_tracks_step_and_rate() -> None:
    clock = StepClock()
    assert clock.step is None and clock.rate == 0.0
    clock.observe(0, now=100.0)
    clock.observe(10, now=101.0)
    assert clock.step == 10
    assert clock.rate == 10.0
    clock.observe(30, now=102.0)  # 20/s, smoothed
    assert 10.0 < clock.rate < 20.0
    clock.observe(30, now=103.0)  # same step again: no rate update
    assert clock.step == 30


def test_next_due_follows_the_earliest_kept_change() -> None:
    pending = PendingChanges()
    assert pending.next_due == NEVER
    pending.add(7, "a", 1)
    pending.add(5, "b", 2)
    assert pending.next_due == 5
    assert [p.change_id for p in pending.pop_due(5)] == ["b"]
    assert pending.next_due == 7
    assert pending.cancel("a") == 1
    assert pending.next_due == NEVER


def test_the_rate_is_taken_over_a_window_not_between_two_reads() -> None:
    clock = StepClock()
    clock.observe(0, now=100.0)
    clock.observe(10, now=101.0)
    assert clock.rate == 10.0  # the first rate: from the first two marks
    clock.observe(11, now=101.0 + RATE_WINDOW / 10)
    assert clock.rate == 10.0  # one step over a few ms says nothing: kept
    clock.observe(20, now=101.5)
    assert clock.rate == 0.8 * 10.0 + 0.2 * 20.0  # (20 - 10) steps over 0.5 s


def test_a_step_count_that_starts_again_keeps_a_rate() -> None:
    clock = StepClock()
    clock.observe(500, now=10.0)
    clock.observe(600, now=11.0)
    assert clock.rate == 100.0
    clock.observe(0, now=12.0)  # a new epoch counted from 0
    assert clock.rate == 100.0 and clock.step == 0
    clock.observe(50, now=13.0)
    assert clock.rate == 0.8 * 100.0 + 0.2 * 50.0


def test_a_first_rate_over_a_few_microseconds_is_not_kept() -> None:
    clock = StepClock()
    clock.observe(0, now=100.0)
    clock.observe(1, now=100.000001)  # two steps a microsecond apart, then a slow one
    assert clock.rate > 100_000  # the best estimate there is, for now
    clock.observe(21, now=100.0 + RATE_WINDOW)
    assert clock.rate == pytest.approx(21 / RATE_WINDOW)  # over the window, from the first step
    clock.observe(41, now=100.0 + 2 * RATE_WINDOW)
    assert clock.rate == pytest.approx(0.8 * (21 / RATE_WINDOW) + 0.2 * (20 / RATE_WINDOW))
