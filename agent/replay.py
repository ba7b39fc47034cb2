"""Replay: a rank that starts in a run with journaled changes applies them before it
publishes its first state.

The plan (which changes, in which order, which schedules come back) is
:func:`runctl.bus.journalplan.plan_replay`. Each change is validated by the model as any
change is, all or nothing (on the state's JSON document; the live objects change once at the
end, :mod:`runctl.agent.replaydoc`, so a replay bumps ``ctl.version`` once). One that no
longer applies (a renamed field, a value the new code's validators refuse) is skipped and
reported: a log line naming it, a ``replay_skipped`` event, and the rank's ``replay`` record
in the journal (the history marks the change). Nothing here can make the program fail to
start: a journal that cannot be read is logged and the rank starts from the code's state.

Opt out with ``control(state, replay=False)`` or ``RUNCTL_REPLAY=0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS

import runctl.agent.commands as commands
from runctl.agent.journaling import Journaler
from runctl.agent.publish import Publisher
from runctl.agent.replaydoc import apply_requests
from runctl.agent.state import LiveState
from runctl.bus import messages as m
from runctl.bus.defaults import switched_on
from runctl.bus.errors import RunctlError
from runctl.bus.journal import Record, Skipped
from runctl.bus.journalplan import plan_replay
from runctl.bus.journalstore import read_journal

__all__ = [
    "REPLAY_ENV",
    "ReplayReport",
    "ReplayedChange",
    "command_of",
    "replay_enabled",
    "start_journal",
]

REPLAY_ENV: Final = "RUNCTL_REPLAY"
#: the journal read at start is bounded: a rank never waits longer than this for it
READ_TIMEOUT: Final = 30.0

log = structlog.get_logger()


def replay_enabled(asked: bool | None, env: Mapping[str, str] | None = None) -> bool:
    """``control(replay=...)`` if given, else ``RUNCTL_REPLAY`` (on unless 0/false/no/off)."""
    if asked is not None:
        return asked
    return switched_on(REPLAY_ENV, env)


@dataclass(frozen=True, slots=True)
class ReplayedChange:
    """A journaled change this rank applied at start (``ctl.replayed``)."""

    id: str
    verb: str
    request: Any
    #: who sent it (``name`` of the journal's author: token name, user@host, ``by=``)
    by: str
    ts: float
    target: str
    changed: bool


@dataclass(slots=True)
class ReplayReport:
    """What a replay did."""

    replayed: list[ReplayedChange] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: schedules restored as pending: (change id, at_step)
    restored: list[tuple[str, int]] = field(default_factory=list)
    #: the journal could not be read (the rank started from the code's state)
    error: str = ""


def command_of(record: Record, *, at_step: int | None = None) -> m.Command:
    """The command a journal record holds (as sent), to apply again."""
    data = dict(record.request) if isinstance(record.request, dict) else {}
    data.setdefault("t", f"{record.verb}/1")
    data.pop("at_step", None)
    if at_step is not None:
        data["at_step"] = at_step
        data["change_id"] = record.id
    command: m.Command = msgspec.convert(data, m.Command)
    return command


async def _replay(
    nc: NATS,
    *,
    run: str,
    rank: str,
    live: LiveState[Any],
    defer: Callable[[m.Command], m.Reply],
    timeout: float = READ_TIMEOUT,
) -> ReplayReport:
    """Read the run's journal and apply what reaches ``rank`` (see the module docs) to
    ``live``; ``defer(command)`` validates a scheduled change and keeps it pending (it may
    not raise)."""
    report = ReplayReport()
    try:
        with anyio.fail_after(timeout):
            records = await read_journal(nc, run)
    except Exception as exc:
        report.error = str(exc) or type(exc).__name__
        log.warning("change journal not read: starting from the code's state", error=report.error)
        return report
    plan = plan_replay(records, rank)
    outcomes = apply_requests(live, [record.request for record in plan.changes])
    for record, outcome in zip(plan.changes, outcomes, strict=True):
        if isinstance(outcome, RunctlError):
            _skip(report, record, str(outcome), getattr(outcome, "errors", []))
            continue
        report.replayed.append(
            ReplayedChange(
                id=record.id,
                verb=record.verb,
                request=record.request,
                by=record.by.name or record.by.via,
                ts=record.ts,
                target=record.target,
                changed=outcome,
            )
        )
    for record in plan.schedules:
        at_step = record.at_step
        if at_step is None:
            continue
        try:
            reply = defer(command_of(record, at_step=at_step))
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            _skip(report, record, f"not a change this code can schedule: {exc}", [])
            continue
        if isinstance(reply, m.Err):
            _skip(report, record, reply.message, reply.detail)
        else:
            report.restored.append((record.id, at_step))
    return report


def _skip(report: ReplayReport, record: Record, reason: str, errors: list[Any]) -> None:
    report.skipped.append(
        Skipped(id=record.id, verb=record.verb, reason=reason, errors=list(errors)[:50])
    )
    log.warning(
        "journaled change skipped at replay",
        run=record.run,
        change=record.id,
        verb=record.verb,
        by=record.by.name or record.by.via,
        reason=reason,
    )


async def start_journal(
    nc: NATS, journal: Journaler, publisher: Publisher, *, replay: bool
) -> ReplayReport:
    """Open the rank's journal and (unless ``replay`` is off) replay the run's, before the
    rank subscribes to commands and publishes its first state. Never raises."""
    report = ReplayReport()
    if not await journal.open(nc) or not replay:
        return report
    core = journal.core
    journal.live.track_diffs = False  # a replayed change is not journaled again
    try:
        report = await _replay(
            nc,
            run=core.run,
            rank=core.rank,
            live=core.live,
            defer=lambda cmd: commands.apply(core, cmd, defer=True).reply,
        )
    finally:
        journal.live.track_diffs = True
    core.replayed, core.replay_skipped = len(report.replayed), len(report.skipped)
    if not (report.replayed or report.skipped or report.restored):
        return report
    log.info(
        "journaled changes replayed",
        run=core.run,
        rank=core.rank,
        replayed=len(report.replayed),
        skipped=len(report.skipped),
        schedules=len(report.restored),
    )
    record = journal.replay_record([c.id for c in report.replayed], report.skipped, None)
    await publisher.wait(await journal.write(record))
    for skipped in report.skipped:
        await publisher.event(
            "replay_skipped", change_id=skipped.id, verb=skipped.verb, reason=skipped.reason
        )
    await publisher.event(
        "replayed",
        replayed=len(report.replayed),
        skipped=len(report.skipped),
        schedules=len(report.restored),
        record=record.id,
    )
    return report
