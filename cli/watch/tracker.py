"""The watcher's picture of the runs, built only from what agents publish on the bus.

Stateless by design: everything comes from the messages it sees (state messages on every
heartbeat, events, and the commands others send), so a watcher started late learns each
rank's status from its next heartbeat, and several watchers never need to agree.

Time is the watcher's own monotonic clock, never a remote one: a rank is ``stale`` when
no state message arrived for 3 heartbeat periods; ``stalled`` when the program's idle time
at its last message (measured on the rank's own clock) plus the time since that message
passed its threshold. So clock skew between hosts does not matter.

Pure: :class:`Tracker` takes messages and the time and returns :class:`Notice`\\ s; the
engine (``engine.py``) does the I/O. Each condition is notified once, until it clears.

Why one module of this size: one pure state machine over every kind of notice (stale,
stalled, recovered, exited, stops and synchronised changes not taken, failed steps,
conditions), whose once-until-cleared rule must be the same for all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from runctl.bus import messages as m
from runctl.bus.conditions import Condition
from runctl.bus.registry import ANSWERING, Liveness, heartbeat_overdue
from runctl.bus.steps.records import LEFT_EARLY, LEFT_WITH_SKIP
from runctl.cli.watch.notices import Notice

__all__ = ["DEFAULT_ACK_TIMEOUT", "FORGET_AFTER", "RankView", "Tracker"]

log = structlog.get_logger()

#: a stop or synchronised change not acknowledged this long after it was sent is reported
DEFAULT_ACK_TIMEOUT: Final = 5.0
#: a rank that exited or went stale is forgotten this long after (memory stays bounded)
FORGET_AFTER: Final = 3600.0


@dataclass(slots=True)
class RankView:
    """What the watcher knows about one rank."""

    run: str
    rank: str
    #: when its last state message arrived (watcher's monotonic clock)
    received: float
    heartbeat_interval: float = 1.0
    #: the program's idle seconds when that message was sent (None: no progress reported)
    idle_at_send: float | None = None
    stall_after: float = 0.0
    step: int | None = None
    state: Any = None
    exited: bool = False
    exit_error: str = ""
    exit_reason: str = ""
    #: a stop reached it (its program may then leave a step early: not a failure to report)
    stopping: bool = False
    #: the status last reported, and when it started (monotonic)
    status: Liveness = "alive"
    since: float = 0.0

    def status_at(self, now: float) -> Liveness:
        """Its status at ``now`` (see runctl.bus.registry.liveness for the same rule)."""
        if self.exited:
            return "exited"
        if heartbeat_overdue(self.received, self.heartbeat_interval, now):
            return "stale"
        idle = self.idle(now)
        stalled = idle is not None and self.stall_after > 0 and idle > self.stall_after
        return "stalled" if stalled else "alive"

    def idle(self, now: float) -> float | None:
        """Seconds the program has not advanced, as of ``now`` (None before its first step)."""
        if self.idle_at_send is None:
            return None
        return self.idle_at_send + (now - self.received)


@dataclass(slots=True)
class _PendingAck:
    """A stop or synchronised change seen on the bus, waiting for each rank to take it."""

    run: str
    target: str
    verb: str
    expected: frozenset[str]
    deadline: float
    change_id: str = ""
    at_step: int | None = None
    acked: set[str] = field(default_factory=set)
    cancelled: bool = False


@dataclass(slots=True)
class _Run:
    """Per run: the conditions true on which ranks, whether it was reported stopped."""

    #: condition index -> ranks where it holds now
    holding: dict[int, set[str]] = field(default_factory=dict)
    stopped_notified: bool = False
    #: conditions whose missing fields were already logged
    warned: set[int] = field(default_factory=set)


class Tracker:
    """Feed it messages (:meth:`on_state`, :meth:`on_event`, :meth:`on_command`) and the
    time (:meth:`tick`); it returns the notices to send."""

    def __init__(
        self,
        conditions: Sequence[Condition] = (),
        *,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.conditions = list(conditions)
        self.ack_timeout = ack_timeout
        self.forget_after = forget_after
        self.ranks: dict[tuple[str, str], RankView] = {}
        self.runs: dict[str, _Run] = {}
        self.pending: list[_PendingAck] = []
        #: (run, rank) whose stalled/stale notice was sent and not yet cleared
        self._unwell: set[tuple[str, str]] = set()

    # --- inputs ----------------------------------------------------------------------------

    def on_state(self, msg: m.StateMsg, now: float) -> list[Notice]:
        """A state message (heartbeat or change) from a rank arrived at ``now``."""
        key = (msg.run, msg.rank)
        view = self.ranks.get(key)
        if view is None:
            view = self.ranks[key] = RankView(msg.run, msg.rank, received=now, since=now)
            first = True
        else:
            first = False
        view.received = now
        view.heartbeat_interval = msg.heartbeat_interval or view.heartbeat_interval
        view.idle_at_send = None if msg.progress_ts is None else max(0.0, msg.ts - msg.progress_ts)
        view.stall_after = msg.stall_after
        view.step = msg.step
        view.state = msg.state
        if view.exited:  # a state after goodbye: the rank started again
            view.exited, view.exit_error, view.stopping = False, "", False
        notices = self._status(view, now, first=first)
        notices += self._conditions(view)
        return notices

    def on_event(self, event: m.Event, now: float) -> list[Notice]:
        """An event from a rank arrived at ``now``."""
        key = (event.run, event.rank)
        view = self.ranks.get(key)
        kind, data = event.kind, event.data
        notices: list[Notice] = []
        if kind == "started":
            if view is not None:
                view.exited, view.exit_error, view.stopping = False, "", False
                view.received = now
            return notices
        if view is None:
            view = self.ranks[key] = RankView(event.run, event.rank, received=now, since=now)
        if kind == "stop_requested":
            view.stopping = True
            self._ack(event.run, event.rank, "stop", "")
        elif kind == "deferred":
            self._ack(event.run, event.rank, str(data.get("verb", "")), str(data.get("change_id")))
        elif kind == "exited":
            view.exited = True
            view.exit_error = str(data.get("error") or "")
            view.exit_reason = str(data.get("reason") or "")
            if view.exit_error:
                notices.append(
                    Notice(
                        "exited",
                        event.run,
                        event.rank,
                        f"run {event.run}, rank {event.rank} exited with an error: "
                        f"{_short(view.exit_error, 300)}",
                        {"error": view.exit_error, "step": view.step},
                    )
                )
            notices += self._status(view, now)
            notices += self._conditions(view)
        elif kind == "step_failed":
            error = str(data.get("error") or "")
            # skip() is the program's choice; a loop left early is a failure unless a stop
            # made the program leave it
            if error != LEFT_WITH_SKIP and not (view.stopping and error == LEFT_EARLY):
                name = data.get("name")
                step_key = data.get("key")
                label = f"{name}" if step_key is None else f"{name} {_short(str(step_key), 60)}"
                notices.append(
                    Notice(
                        "step_failed",
                        event.run,
                        event.rank,
                        f"run {event.run}, rank {event.rank}: step {label} failed: "
                        f"{_short(error, 300)}",
                        {
                            "name": name,
                            "key": step_key,
                            "scope": data.get("scope"),
                            "error": error,
                        },
                    )
                )
        return notices

    def on_command(self, run: str, target: str, cmd: m.Command, now: float) -> list[Notice]:
        """A command someone sent (to one rank, or ``all``) was seen at ``now``: a stop,
        or a synchronised change, is then expected to be taken by every rank it reached."""
        if isinstance(cmd, m.Cancel):
            for pending in self.pending:
                if pending.run == run and pending.change_id == cmd.change_id:
                    pending.cancelled = True
            return []
        synced = isinstance(cmd, m.DEFERRABLE) and cmd.at_step is not None
        if not (isinstance(cmd, m.Stop) or synced):
            return []
        verb = type(cmd).__name__.lower()
        answering = {
            r.rank for r in self.ranks.values() if r.run == run and r.status_at(now) in ANSWERING
        }
        expected = answering if target == "all" else answering & {target}
        if not expected:
            return []
        self.pending.append(
            _PendingAck(
                run=run,
                target=target,
                verb=verb,
                expected=frozenset(expected),
                deadline=now + self.ack_timeout,
                change_id=getattr(cmd, "change_id", "") if synced else "",
                at_step=getattr(cmd, "at_step", None),
            )
        )
        return []

    def tick(self, now: float) -> list[Notice]:
        """What time alone changes: ranks going stale or stalled, acknowledgements that did
        not come, runs whose last rank went away; forget long-gone ranks."""
        notices: list[Notice] = []
        for view in list(self.ranks.values()):
            notices += self._status(view, now)
            if view.status in ("exited", "stale") and now - view.since > self.forget_after:
                self._forget(view)
        notices += self._overdue_acks(now)
        return notices

    # --- rank status ---------------------------------------------------------------------

    def _status(self, view: RankView, now: float, *, first: bool = False) -> list[Notice]:
        status = view.status_at(now)
        if status == view.status and not first:
            return []
        previous, view.status, view.since = view.status, status, now
        key = (view.run, view.rank)
        notices: list[Notice] = []
        where = f"run {view.run}, rank {view.rank}"
        if status == "stalled" and key not in self._unwell:
            self._unwell.add(key)
            idle = view.idle(now) or 0.0
            at = "" if view.step is None else f" at step {view.step}"
            notices.append(
                Notice(
                    "stalled",
                    view.run,
                    view.rank,
                    f"{where} stalled: its program has not advanced for {idle:.0f} s"
                    f" (threshold {view.stall_after:g} s){at}; its agent still answers",
                    {
                        "idle_s": round(idle, 3),
                        "stall_after_s": view.stall_after,
                        "step": view.step,
                    },
                )
            )
        elif status == "stale" and (key not in self._unwell or previous == "stalled"):
            self._unwell.add(key)
            quiet = now - view.received
            notices.append(
                Notice(
                    "stale",
                    view.run,
                    view.rank,
                    f"{where} is stale: no heartbeat for {quiet:.1f} s (killed, hung or cut off)",
                    {"silent_s": round(quiet, 3), "step": view.step, "was": previous},
                )
            )
        elif status == "alive" and key in self._unwell and not first:
            self._unwell.discard(key)
            at = "" if view.step is None else f" (step {view.step})"
            notices.append(
                Notice(
                    "recovered",
                    view.run,
                    view.rank,
                    f"{where} recovered: alive and advancing again{at}",
                    {"was": previous, "step": view.step},
                )
            )
        elif status == "exited":
            self._unwell.discard(key)
        notices += self._run_status(view.run)
        return notices

    def _run_status(self, run: str) -> list[Notice]:
        views = [v for v in self.ranks.values() if v.run == run]
        state = self.runs.setdefault(run, _Run())
        running = [v for v in views if v.status in ANSWERING]
        if running:
            state.stopped_notified = False
            return []
        exited = [v for v in views if v.status == "exited"]
        if not exited or state.stopped_notified:
            return []
        state.stopped_notified = True
        errors = {v.rank: v.exit_error for v in exited if v.exit_error}
        stale = sorted((v.rank for v in views if v.status == "stale"), key=_rank_key)
        reasons = sorted({v.exit_reason for v in exited if v.exit_reason})
        detail = []
        if reasons:
            detail.append("reason: " + "; ".join(_short(r, 80) for r in reasons[:3]))
        if errors:
            detail.append(f"{len(errors)} rank(s) ended with an error")
        if stale:
            detail.append(f"rank(s) {', '.join(stale)} stale")
        tail = f" ({', '.join(detail)})" if detail else ""
        return [
            Notice(
                "stopped",
                run,
                None,
                f"run {run} stopped: no rank is running any more{tail}",
                {
                    "exited": sorted((v.rank for v in exited), key=_rank_key),
                    "stale": stale,
                    "errors": errors,
                    "reasons": reasons,
                },
            )
        ]

    def _forget(self, view: RankView) -> None:
        key = (view.run, view.rank)
        self.ranks.pop(key, None)
        self._unwell.discard(key)
        if not any(v.run == view.run for v in self.ranks.values()):
            self.runs.pop(view.run, None)

    # --- conditions ----------------------------------------------------------------------

    def _conditions(self, view: RankView) -> list[Notice]:
        if not self.conditions:
            return []
        run = self.runs.setdefault(view.run, _Run())
        notices: list[Notice] = []
        for index, condition in enumerate(self.conditions):
            holding = run.holding.setdefault(index, set())
            was = bool(holding)
            truth = None if view.exited else condition.evaluate(view.state)
            if truth is None and not view.exited and index not in run.warned:
                missing = condition.missing(view.state)
                if missing:
                    run.warned.add(index)
                    log.warning(
                        "condition reads fields the state does not have",
                        run=view.run,
                        condition=str(condition),
                        missing=missing,
                    )
            if truth:
                holding.add(view.rank)
            else:
                holding.discard(view.rank)
            if holding and not was:
                values = _field_values(condition, view.state)
                shown = ", ".join(f"{k} = {_short(repr(v), 40)}" for k, v in values.items())
                notices.append(
                    Notice(
                        "condition",
                        view.run,
                        view.rank,
                        f"run {view.run}: {condition} on rank {view.rank}"
                        + (f" ({shown})" if shown else ""),
                        {
                            "condition": str(condition),
                            "index": index,
                            "ranks": sorted(holding, key=_rank_key),
                            "values": values,
                            "step": view.step,
                        },
                    )
                )
        return notices

    # --- acknowledgements ----------------------------------------------------------------

    def _ack(self, run: str, rank: str, verb: str, change_id: str) -> None:
        for pending in self.pending:
            if pending.run != run or rank not in pending.expected:
                continue
            if pending.change_id:
                if change_id == pending.change_id:
                    pending.acked.add(rank)
            elif verb == "stop" and pending.verb == "stop":
                pending.acked.add(rank)
        # everyone took it (and nobody cancelled it): nothing to say
        self.pending = [p for p in self.pending if p.cancelled or p.acked != p.expected]

    def _overdue_acks(self, now: float) -> list[Notice]:
        due = [p for p in self.pending if now >= p.deadline]
        if not due:
            return []
        self.pending = [p for p in self.pending if now < p.deadline]
        notices = []
        for p in due:
            missing = sorted(p.expected - p.acked, key=_rank_key)
            if not missing and not p.cancelled:
                continue
            what = f"a synchronised {p.verb}" if p.change_id else f"a {p.verb}"
            to = "every rank" if p.target == "all" else f"rank {p.target}"
            at = f" at step {p.at_step}" if p.at_step is not None else ""
            if missing:
                outcome = f"not acknowledged by rank(s) {', '.join(missing)}"
            else:
                outcome = "taken by every rank, then cancelled"
            if p.cancelled and missing:
                outcome += "; it was cancelled on every rank (no rank applies it)"
            notices.append(
                Notice(
                    "unacknowledged",
                    p.run,
                    None if p.target == "all" else p.target,
                    f"run {p.run}: {what} sent to {to}{at} was {outcome}",
                    {
                        "verb": p.verb,
                        "target": p.target,
                        "change_id": p.change_id,
                        "at_step": p.at_step,
                        "missing": missing,
                        "acknowledged": sorted(p.acked, key=_rank_key),
                        "cancelled": p.cancelled,
                    },
                )
            )
        return notices


def _field_values(condition: Condition, state: Any) -> dict[str, Any]:
    if not isinstance(state, dict):
        return {}
    return {f: state[f] for f in sorted(condition.fields) if f in state and _scalar(state[f])}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rank_key(rank: str) -> tuple[int, str]:
    return (int(rank), "") if rank.isdigit() else (1 << 62, rank)
