"""The watcher's decisions, fed messages and a clock by hand: one notice per condition
until it clears, stale and stalled from the watcher's own clock, acknowledgements."""

from __future__ import annotations

from typing import Any

from runctl.bus import messages as m
from runctl.bus.conditions import parse
from runctl.bus.steps.records import LEFT_EARLY, LEFT_WITH_SKIP
from runctl.cli.watch.notices import Notice
from runctl.cli.watch.tracker import Tracker

RUN = "exp1"


def state(
    rank: str,
    *,
    ts: float = 1000.0,
    step: int | None = 10,
    progress_ts: float | None = 1000.0,
    stall_after: float = 5.0,
    heartbeat: float = 1.0,
    **fields: Any,
) -> m.StateMsg:
    return m.StateMsg(
        run=RUN,
        rank=rank,
        version=1,
        ts=ts,
        state={"loss": 1.0, **fields},
        heartbeat_interval=heartbeat,
        step=step,
        progress_ts=progress_ts,
        stall_after=stall_after,
    )


def event(rank: str, kind: str, **data: Any) -> m.Event:
    return m.Event(run=RUN, rank=rank, kind=kind, ts=0.0, data=data)


def kinds(notices: list[Notice]) -> list[tuple[str, str | None]]:
    return [(n.kind, n.rank) for n in notices]


def test_stalled_once_then_recovered() -> None:
    t = Tracker()
    assert t.on_state(state("0"), now=0.0) == []
    # heartbeats keep coming, the program's last progress stays at 1000.0 (rank's clock)
    assert t.on_state(state("0", ts=1004.0), now=4.0) == []
    notices = t.on_state(state("0", ts=1006.0), now=6.0)
    assert kinds(notices) == [("stalled", "0")]
    assert "has not advanced for 6 s (threshold 5 s) at step 10" in notices[0].summary
    for now in (7.0, 8.0, 9.0):  # still stalled: nothing new
        assert t.on_state(state("0", ts=1000.0 + now), now=now) == []
        assert t.tick(now) == []
    back = t.on_state(state("0", ts=1010.0, progress_ts=1010.0, step=11), now=10.0)
    assert kinds(back) == [("recovered", "0")]
    assert t.on_state(state("0", ts=1011.0, progress_ts=1011.0), now=11.0) == []


def test_stalled_between_heartbeats_is_seen_by_tick_and_clock_skew_does_not_matter() -> None:
    t = Tracker()
    # the rank's clock is an hour ahead of the watcher's: only differences are used
    t.on_state(state("0", ts=4600.0, progress_ts=4599.0, heartbeat=10.0), now=0.0)
    assert t.tick(3.9) == []
    assert kinds(t.tick(4.1)) == [("stalled", "0")]


def test_stale_after_three_heartbeats_and_recovered() -> None:
    t = Tracker()
    t.on_state(state("0"), now=0.0)
    assert t.tick(2.9) == []
    notices = t.tick(3.1)
    assert kinds(notices) == [("stale", "0")]
    assert t.tick(10.0) == []
    assert kinds(t.on_state(state("0", ts=1011.0, progress_ts=1011.0), now=11.0)) == [
        ("recovered", "0")
    ]


def test_a_rank_first_seen_stalled_is_reported_a_fresh_one_alive_is_not() -> None:
    t = Tracker()
    assert kinds(t.on_state(state("0", ts=1100.0), now=0.0)) == [("stalled", "0")]
    assert t.on_state(state("1", ts=1100.0, progress_ts=1100.0), now=0.0) == []


def test_exit_with_error_and_run_stopped_once() -> None:
    t = Tracker()
    t.on_state(state("0"), now=0.0)
    t.on_state(state("1"), now=0.0)
    assert t.on_event(event("0", "exited", reason="done", error=""), now=1.0) == []
    notices = t.on_event(event("1", "exited", reason="", error="ValueError: nan"), now=1.0)
    assert kinds(notices) == [("exited", "1"), ("stopped", None)]
    assert notices[0].summary.endswith("exited with an error: ValueError: nan")
    assert notices[1].data["errors"] == {"1": "ValueError: nan"}
    assert t.tick(100.0) == []  # exited ranks never go stale
    # the run starts again: a later stop is reported again
    t.on_event(event("0", "started"), now=200.0)
    t.on_state(state("0", ts=1200.0, progress_ts=1200.0), now=200.0)
    assert kinds(t.on_event(event("0", "exited", reason="", error=""), now=201.0)) == [
        ("stopped", None)
    ]


def test_condition_fires_once_until_it_clears() -> None:
    t = Tracker([parse("loss > 10"), parse("isnan(loss)")])
    assert t.on_state(state("0", loss=5.0), now=0.0) == []
    fired = t.on_state(state("0", loss=20.0), now=1.0)
    assert kinds(fired) == [("condition", "0")]
    assert fired[0].data["values"] == {"loss": 20.0}
    assert fired[0].summary == "run exp1: loss > 10 on rank 0 (loss = 20.0)"
    assert t.on_state(state("0", loss=30.0), now=2.0) == []  # still true
    assert t.on_state(state("1", loss=40.0), now=2.0) == []  # same run, another rank
    assert t.on_state(state("0", loss=1.0), now=3.0) == []  # rank 1 still holds it
    assert t.on_state(state("1", loss=1.0), now=3.0) == []  # cleared everywhere
    assert kinds(t.on_state(state("1", loss=11.0), now=4.0)) == [("condition", "1")]
    # null is how pydantic writes NaN: the other condition
    nan = t.on_state(state("0", loss=None), now=5.0)
    assert [n.data["condition"] for n in nan] == ["isnan(loss)"]


def test_stop_not_acknowledged_by_every_rank() -> None:
    t = Tracker(ack_timeout=2.0)
    for rank in ("0", "1", "2"):
        t.on_state(state(rank, heartbeat=100.0), now=0.0)
    t.on_command(RUN, "all", m.Stop(reason="x"), now=0.5)
    t.on_event(event("0", "stop_requested", reason="x"), now=0.6)
    t.on_event(event("2", "stop_requested", reason="x"), now=0.6)
    assert t.tick(2.0) == []
    notices = t.tick(2.6)
    assert kinds(notices) == [("unacknowledged", None)]
    assert notices[0].data["missing"] == ["1"]
    assert "a stop sent to every rank was not acknowledged by rank(s) 1" in notices[0].summary
    # everyone acknowledged: nothing
    t.on_state(state("1", ts=1002.0, progress_ts=1002.0, heartbeat=100.0), now=2.7)
    t.on_command(RUN, "all", m.Stop(reason="again"), now=3.0)
    for rank in ("0", "1", "2"):
        t.on_event(event(rank, "stop_requested", reason="again"), now=3.1)
    assert [n for n in t.tick(4.0) if n.kind == "unacknowledged"] == []
    assert t.pending == []


def test_synchronised_change_taken_by_some_and_cancelled() -> None:
    t = Tracker(ack_timeout=1.0)
    t.on_state(state("0"), now=0.0)
    t.on_state(state("1"), now=0.0)
    change = m.Set(path="lr", value=0.1, at_step=50, change_id="c1")
    t.on_command(RUN, "all", change, now=0.1)
    t.on_event(event("0", "deferred", verb="set", change_id="c1", at_step=50), now=0.2)
    t.on_command(RUN, "all", m.Cancel(change_id="c1"), now=0.3)
    notices = t.tick(1.2)
    assert kinds(notices) == [("unacknowledged", None)]
    data = notices[0].data
    assert (data["missing"], data["cancelled"], data["at_step"]) == (["1"], True, 50)
    assert "synchronised set" in notices[0].summary and "cancelled" in notices[0].summary
    # a plain (not synchronised) set is not checked
    t.on_command(RUN, "all", m.Set(path="lr", value=0.2), now=2.0)
    assert t.pending == []


def test_a_step_left_early_after_a_stop_is_no_failure() -> None:
    t = Tracker()
    t.on_state(state("0"), now=0.0)
    failed = t.on_event(
        event("0", "step_failed", name="epoch", key=3, scope="0", error="KeyError: 'x'"), now=1.0
    )
    assert kinds(failed) == [("step_failed", "0")]
    assert failed[0].summary == "run exp1, rank 0: step epoch 3 failed: KeyError: 'x'"
    t.on_event(event("0", "stop_requested", reason="done"), now=2.0)
    left = "the loop body did not complete (break or exception)"
    assert t.on_event(event("0", "step_failed", name="epoch", key=4, error=left), now=3.0) == []


def test_a_step_left_with_skip_is_the_programs_choice() -> None:
    t = Tracker()
    t.on_state(state("0"), now=0.0)
    skipped = event("0", "step_failed", name="epoch", key=3, error=LEFT_WITH_SKIP)
    assert t.on_event(skipped, now=1.0) == []
    # a loop left early without a stop is a failure
    early = event("0", "step_failed", name="epoch", key=4, error=LEFT_EARLY)
    assert kinds(t.on_event(early, now=2.0)) == [("step_failed", "0")]


def test_gone_ranks_are_forgotten() -> None:
    t = Tracker(forget_after=60.0)
    t.on_state(state("0"), now=0.0)
    t.on_event(event("0", "exited", reason="", error=""), now=1.0)
    t.tick(30.0)
    assert (RUN, "0") in t.ranks
    t.tick(62.0)
    assert t.ranks == {} and t.runs == {}
