"""The operator's side of the change journal: history, undo, schedules, forgetting.

Used through :class:`runctl.bus.client.Client` (``client.history(...)``, ``client.undo(...)``,
``client.set(..., at_step=N)``, ``client.schedules(...)``, ``client.unschedule(...)``,
``client.forget_history(...)``), which the gateway and the CLI call.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from runctl.bus import messages as m
from runctl.bus.errors import BadRequest, Conflict, NotFound, TooLate, Unavailable
from runctl.bus.journal import Record, request_json
from runctl.bus.journalplan import Entry, UndoPlan, find_change, plan_undo, schedules
from runctl.bus.journalstore import append, forget_run, read_journal
from runctl.bus.results import Gathered, Result
from runctl.bus.subjects import ALL, check_rank, check_token, rank_key

if TYPE_CHECKING:  # the client calls these with itself; no import at run time
    from runctl.bus.client import Client

__all__ = [
    "UndoResult",
    "cancel_schedule",
    "forget_history",
    "journal_run_stop",
    "schedule",
    "scheduled",
    "undo",
]


# --- undo --------------------------------------------------------------------------------


@dataclass(slots=True)
class UndoResult:
    """An undo: the change it took back, and what each rank did with the inverse."""

    plan: UndoPlan
    change_id: str
    #: per target (``all``, or each rank): the answer
    results: dict[str, Result | Gathered] = field(default_factory=dict)
    errors: dict[str, Exception] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The change taken back and each rank's outcome, as the per-rank view."""
        ranks: dict[str, Any] = {}
        for target, res in self.results.items():
            if isinstance(res, Gathered):
                ranks.update(res.to_json()["ranks"])
            else:
                ranks[target] = {
                    "outcome": "applied",
                    "version": res.version,
                    "changed": res.changed,
                    "journaled": res.journaled,
                }
        for target, exc in self.errors.items():
            ranks[target] = {
                "outcome": "rejected",
                "error": getattr(exc, "code", "error"),
                "message": str(exc),
            }
        return {
            "undone": self.plan.change.id,
            "change_id": self.change_id,
            "values": self.plan.values,
            "forced_past": [e.id for e in self.plan.conflicts],
            "ranks": ranks,
        }


async def undo(
    client: Client, run: str, change: str | None = None, *, force: bool = False
) -> UndoResult:
    """Take back ``change`` (an id or a prefix of one; default: the latest change not
    already undone): set exactly the fields it changed back to their recorded before-values,
    on every rank it changed. The undo is a change of its own, journaled with this client's
    author. Refused (Conflict) when a later change touched the same fields, unless ``force``."""
    check_token(run, "run")
    records = await read_journal(client.nc, run)
    plan = plan_undo(records, change, force=force)
    if plan.change.verb == "schedule":
        await _applied_everywhere(client, run, plan.change.id)
    change_id = uuid.uuid4().hex
    result = UndoResult(plan, change_id)
    undo_of = plan.change.id
    if plan.broadcast:
        values = next(iter(plan.values.values()))
        cmd = m.Assign(values=values, change_id=change_id, undo_of=undo_of)
        result.results[ALL] = await client.send(run, ALL, cmd)
        return result
    for rank, values in plan.values.items():
        cmd = m.Assign(values=values, change_id=change_id, undo_of=undo_of)
        try:
            result.results[rank] = await client.send(run, rank, cmd)
        except Exception as exc:  # one rank gone must not hide what the others did
            result.errors[rank] = exc
    return result


async def _applied_everywhere(client: Client, run: str, change_id: str) -> None:
    """Refuse (Conflict) to undo a change that a live rank still holds pending: that rank
    would apply it after the undo. Ranks that do not answer are not waited for."""
    pings = await client.send(run, ALL, m.Ping())
    holding = sorted(
        (
            rank
            for rank, res in getattr(pings, "results", {}).items()
            if isinstance(res.value, dict)
            and any(p.get("change_id") == change_id for p in res.value.get("pending") or [])
        ),
        key=rank_key,
    )
    if holding:
        raise Conflict(
            f"change {change_id[:12]} is still pending on rank {', '.join(holding)} (not at "
            "its step yet): undo it once every rank applied it, or cancel it"
        )


# --- schedules -------------------------------------------------------------------------------


async def schedule(
    client: Client, run: str, rank: str | int, cmd: m.Set | m.Patch | m.Reset | m.Stop, at_step: int
) -> Gathered:
    """Apply ``cmd`` at ``at_step`` (the step the program passes to ``ctl.sync``) on
    ``rank`` or every rank. Every live rank validates it now and keeps it pending; a rank
    already past the step refuses (then it is cancelled everywhere and TooLate raised).
    Once accepted it is journaled, so a rank that restarts before the step, or joins later,
    still applies it there."""
    check_token(run, "run")
    target = check_rank(rank)
    if at_step < 0:
        raise BadRequest("at_step must not be negative")
    change_id = uuid.uuid4().hex
    deferred = msgspec.structs.replace(client._stamped(cmd), at_step=at_step, change_id=change_id)
    sent = await client.send(run, target, deferred)
    gathered = (
        sent if isinstance(sent, Gathered) else Gathered(run, m.verb_of(cmd), {sent.rank: sent})
    )
    gathered.at_step, gathered.change_id = at_step, change_id
    refused = dict(gathered.errors)
    refused.update({r: Unavailable(f"rank {r} did not answer") for r in gathered.missing})
    if refused:
        await client.send(run, target, m.Cancel(change_id=change_id))
        gathered.cancelled = True
        if all(isinstance(e, TooLate) for e in refused.values()):
            first = next(iter(refused.values()))
            raise TooLate(f"{first}: the schedule was cancelled on every rank")
        return gathered
    gathered.journaled = await write_schedule(client, run, target, deferred, at_step)
    return gathered


async def journal_run_stop(
    client: Client, run: str, cmd: m.Stop, gathered: Gathered | None
) -> bool:
    """Journal a run-wide stop in one record naming the ranks that acknowledged it (they
    write none of their own: ``Stop.journaled_by_writer``); each result then says whether
    the journal holds it. ``gathered`` None: nobody answered in time (the ranks may have
    stopped all the same), recorded as ``unanswered``. False if the journal could not
    store it."""
    acknowledged = sorted(gathered.results, key=rank_key) if gathered is not None else []
    record = Record(
        id=cmd.change_id,
        run=run,
        rank=ALL,
        target=ALL,
        verb="stop",
        ts=time.time(),
        by=cmd.by or client.author(),
        request=request_json(cmd),
        outcome="applied" if acknowledged else "unanswered",
        acknowledged=acknowledged,
        host=socket.gethostname(),
        pid=os.getpid(),
    )
    try:
        await append(client.nc.jetstream(), record, timeout=client.journal_timeout)
        stored = True
    except Unavailable:
        stored = False
    if gathered is not None:
        gathered.results = {
            rank: result.journaled_as(stored) for rank, result in gathered.results.items()
        }
        gathered.change_id = gathered.change_id or cmd.change_id
    return stored


async def write_schedule(
    client: Client, run: str, target: str, cmd: m.Command, at_step: int
) -> bool:
    """Journal a schedule (run-wide record); False if the journal could not store it."""
    change_id = getattr(cmd, "change_id", "")
    record = Record(
        id=change_id,
        run=run,
        rank=ALL,
        target=target,
        verb="schedule",
        ts=time.time(),
        by=getattr(cmd, "by", None) or client.author(),
        request=request_json(cmd),
        outcome="scheduled",
        at_step=at_step,
    )
    try:
        await append(client.nc.jetstream(), record, timeout=client.timeout)
    except Unavailable:
        return False
    return True


async def scheduled(client: Client, run: str, *, include_done: bool = False) -> list[Entry]:
    """The run's scheduled changes still to apply (all of them with ``include_done``)."""
    check_token(run, "run")
    return schedules(await read_journal(client.nc, run), include_done=include_done)


async def cancel_schedule(client: Client, run: str, change: str) -> dict[str, Any]:
    """Cancel a scheduled change (id or prefix) on every live rank and in the journal, so no
    rank applies it, including one that starts later."""
    check_token(run, "run")
    records = await read_journal(client.nc, run)
    entry = find_change(records, change)
    if entry.run_record is None or entry.run_record.verb != "schedule":
        raise BadRequest(f"change {entry.id[:12]} is not a scheduled change")
    if entry.cancelled_by:
        raise BadRequest(f"change {entry.id[:12]} was already cancelled")
    cancel_id = uuid.uuid4().hex
    try:
        sent: Gathered | Result | None = await client.send(
            run, entry.target, m.Cancel(change_id=entry.id, id=cancel_id)
        )
    except NotFound:  # no live rank: the journal alone keeps it from applying
        sent = None
    record = Record(
        id=cancel_id,
        run=run,
        rank=ALL,
        target=entry.target,
        verb="unschedule",
        ts=time.time(),
        by=client.author(),
        outcome="cancelled",
        of=entry.id,
    )
    await append(client.nc.jetstream(), record, timeout=client.timeout)
    out: dict[str, Any] = {"cancelled": entry.id, "change_id": cancel_id}
    if sent is not None:
        out["ranks"] = (
            sent.to_json()["ranks"] if isinstance(sent, Gathered) else {sent.rank: sent.value}
        )
    return out


async def forget_history(client: Client, run: str) -> int:
    """Remove every journal record of ``run``; returns how many. A rank started afterwards
    replays nothing (admin: the HTTP route needs the admin role)."""
    return await forget_run(client.nc, run)
