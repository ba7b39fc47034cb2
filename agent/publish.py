"""What an agent tells the world: state messages, events and its registry record.

- ``runctl.<run>.<rank>.state``: the full state after each change and on every heartbeat.
- ``runctl.<run>.<rank>.evt.<kind>``: what happened (``set``, ``stop_requested``,
  ``rejected``, ``deferred``, ...).
- The rank's registry record (:mod:`runctl.bus.registry`), rewritten with each state.

Nothing here waits on the network longer than :data:`PUBLISH_TIMEOUT`, and nothing raises
for a bus that is down: the program must never stall on it. A registry write returns the
server's ack instead of waiting for it, so a command is answered first and its record's
ack awaited after (see :meth:`Publisher.after`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS

from runctl.agent.commands import Outcome, RankState, verb_of
from runctl.agent.progress import ExitErrors, Progress, ProgressMonitor
from runctl.bus import messages as m
from runctl.bus.progress import StallPolicy
from runctl.bus.registry import Registry
from runctl.bus.subjects import event_subject, state_subject

__all__ = ["PUBLISH_TIMEOUT", "STOP_RECORD_DELAY", "Ack", "AckTo", "Publisher"]

#: bound on every wait for the server while serving: the program never waits on a dead bus
PUBLISH_TIMEOUT: Final = 1.0
#: a stop is written to the registry this long after the reply, off a broadcast's path
STOP_RECORD_DELAY: Final = 0.1

#: the server's acknowledgement of a registry write, still to be awaited
Ack = asyncio.Future[Any]


@dataclass(slots=True)
class AckTo:
    """The writer's inbox for this command's store acknowledgements (bus/acks.py), and how
    many writes were sent with it as their reply subject."""

    subject: str
    sent: int = 0


class Publisher:
    """Publishes one rank's state, events and registry record on ``nc``.

    ``soon(job)`` runs a coroutine function later on the agent's loop (the delayed stop
    record). Nothing is sent until :meth:`attach` gave it a connection.
    """

    def __init__(
        self,
        rank: RankState,
        *,
        heartbeat_interval: float,
        soon: Callable[[Callable[[], Coroutine[Any, Any, Any]]], None],
        monitor: ProgressMonitor | None = None,
        exit: ExitErrors | None = None,
    ) -> None:
        self.rank = rank
        self.heartbeat_interval = heartbeat_interval
        #: whether the program advances (published with every state and record)
        self.monitor = monitor or ProgressMonitor(Progress(), StallPolicy(enabled=False))
        #: the uncaught exception that ended the program, if any
        self.exit = exit or ExitErrors()
        self.nc: NATS | None = None
        self.registry: Registry | None = None
        #: the record says "exited" from now on (set at shutdown)
        self.exited = False
        self._soon = soon
        self._record_lock: asyncio.Lock | None = None
        self._stop_recorded = False
        #: the state is too large for a message (the program was told; bus/sizelimit.py)
        self._too_large = False
        #: each kind's event subject, checked once: an event is on a command's way
        self._event_subjects: dict[str, str] = {}
        self.log = structlog.get_logger().bind(run=rank.run, rank=rank.rank)

    def attach(self, nc: NATS, registry: Registry | None) -> None:
        """Start publishing on ``nc`` (and writing records to ``registry``, if there is
        one). Called on the agent's loop, once connected."""
        self.nc, self.registry = nc, registry
        # asyncio's lock: taken without yielding to the loop when free (anyio's always
        # yields once, which cost a command an extra loop iteration: a GIL hand-off, and
        # the state sent in a write of its own before the reply)
        self._record_lock = asyncio.Lock()

    # --- after a command ----------------------------------------------------------------

    async def after(
        self, verb: str, outcome: Outcome, ack_to: AckTo | None = None, **data: Any
    ) -> list[Ack]:
        """Tell the world what a command did: state, record, event. Returns the acks of
        the registry writes it sent, for the caller to await once it has replied (none
        when they go to the writer's ``ack_to``)."""
        command, reply = outcome.command, outcome.reply
        acks: list[Ack] = []
        if outcome.new_state is not None:
            acks += await self.state(outcome.new_state, cause=verb, ack_to=ack_to)
            await self.event(verb, **data)
        elif isinstance(command, m.Stop) and isinstance(reply, m.Ok) and command.at_step is None:
            # No registry write on the reply path: a broadcast stop to 64 ranks would be 64
            # JetStream writes competing with the replies (bench/bench_fanout.py: 54 -> 21 ms
            # p50). The record follows shortly after; a run-wide stop is recorded by the client.
            await self.event(
                "stop_requested", reason=self.rank.stop_reason, mode=command.mode, **data
            )
            if not self._stop_recorded:  # a repeated stop changes nothing in the record
                self._stop_recorded = True
                self._soon(self._record_after_stop)
        elif isinstance(reply, m.Err) and reply.code == "validation":
            await self.event("rejected", verb=verb, errors=len(reply.detail), **data)
        elif (
            isinstance(reply, m.Ok) and isinstance(reply.value, dict) and reply.value.get("pending")
        ):
            await self.event("deferred", verb=verb, **reply.value)  # heartbeat: pending count
        return acks

    async def after_deferred(self, outcome: Outcome, step: int) -> None:
        """As :meth:`after`, for a change deferred to ``step`` and applied by ``sync``."""
        command = outcome.command
        assert command is not None
        change_id = getattr(command, "change_id", "")
        verb = verb_of(command)
        await self.wait(await self.after(verb, outcome, at_step=step, change_id=change_id))
        if isinstance(command, m.Stop):
            await self.wait(await self.record(self.rank.live.dump_json()))
            await self.event(
                "stop_requested",
                reason=self.rank.stop_reason,
                mode=command.mode,
                at_step=step,
                change_id=change_id,
            )

    async def _record_after_stop(self) -> None:
        await anyio.sleep(STOP_RECORD_DELAY)
        await self.wait(await self.record(self.rank.live.dump_json()))

    # --- heartbeat ----------------------------------------------------------------------

    async def beat(self) -> None:
        """The heartbeat: whether the program still advances (an event when that changed),
        the state (as ``changed`` if the program changed it since the last beat) and the
        record. The record asks for no acknowledgement: it would wake this process a second
        time per beat (a third of an idle agent's CPU), and a lost beat is made good by the
        next; a failed write was only ever logged. Writes a caller waits for are acked."""
        await self.check_progress()
        live = self.rank.live
        dumped, changed = live.poll()
        if changed:
            await self.state(dumped, cause="changed", acked=False)
            await self.event("changed", version=live.version)
        else:
            await self.state(dumped, cause="heartbeat", acked=False)

    async def check_progress(self) -> None:
        """Sample the program's progress marks; ``stalled`` / ``recovered`` events when
        that changed (see :mod:`runctl.agent.progress`)."""
        monitor, step = self.monitor, self.rank.clock.step
        change = monitor.sample()
        if change == "stalled":
            idle = monitor.idle() or 0.0
            self.log.warning("program stalled", idle=round(idle, 3), step=step)
            await self.event(
                "stalled",
                step=step,
                idle_s=round(idle, 3),
                stall_after_s=round(monitor.stall_after, 3),
            )
        elif change == "recovered":
            self.log.info("program advancing again", step=step)
            await self.event("recovered", step=step)

    # --- the three things published -----------------------------------------------------

    async def state(
        self, state: bytes, *, cause: str, ack_to: AckTo | None = None, acked: bool = True
    ) -> list[Ack]:
        """Publish ``state`` on the state subject and write the record; returns its ack
        (none with ``acked=False``: the server stores it without answering)."""
        nc, rank = self.nc, self.rank
        if nc is None or nc.is_closed:
            return []
        carried, omitted = self._carried(state)
        msg = m.StateMsg(
            run=rank.run,
            rank=rank.rank,
            version=rank.live.version,
            ts=time.time(),
            state=carried,
            state_omitted=omitted,
            max_payload=self._max_payload(),
            cause=cause,
            heartbeat_interval=self.heartbeat_interval,
            step=rank.clock.step,
            progress_ts=self.monitor.progress_ts(),
            stall_after=self.monitor.stall_after,
            step_rate=round(rank.clock.rate, 3),
        )
        try:
            await nc.publish(state_subject(rank.run, rank.rank), m.encode(msg))
        except Exception as exc:
            self.log.debug("state publish failed", error=str(exc))
        return await self.record(state, ack_to, acked=acked)

    async def record(
        self, state: bytes, ack_to: AckTo | None = None, *, acked: bool = True
    ) -> list[Ack]:
        """Send this rank's registry record with ``state``; returns the ack to await (none
        without a registry, when the write could not be sent, when its ack goes to the
        writer's ``ack_to``, or with ``acked=False``: no acknowledgement asked for)."""
        if self.registry is None or self._record_lock is None:
            return []
        rank = self.rank
        carried, omitted = self._carried(state)
        async with self._record_lock:  # records are sent in version order
            record = m.RankRecord(
                run=rank.run,
                rank=rank.rank,
                host=rank.host,
                pid=rank.pid,
                started=rank.started,
                heartbeat=time.time(),
                heartbeat_interval=self.heartbeat_interval,
                version=rank.live.version,
                state=carried,
                state_omitted=omitted,
                max_payload=self._max_payload(),
                status="exited" if self.exited else "running",
                stop_requested=rank.stop_requested,
                world_size=rank.world_size,
                model=type(rank.live.model).__name__,
                step=rank.clock.step,
                step_rate=round(rank.clock.rate, 3),
                pending=len(rank.pending),
                replayed=rank.replayed,
                replay_skipped=rank.replay_skipped,
                progress_ts=self.monitor.progress_ts(),
                progress_interval=round(self.monitor.interval or 0.0, 6),
                stall_after=self.monitor.stall_after,
                error=self.exit.error,
            )
            try:
                if ack_to is not None:
                    await self.registry.put_acked_to(record, ack_to.subject)
                    ack_to.sent += 1
                    return []
                if not acked:
                    await self.registry.put_unacked(record)
                    return []
                return [await self.registry.put_nowait(record)]
            except Exception as exc:
                self.log.debug("registry write failed", error=str(exc) or type(exc).__name__)
                return []

    def _max_payload(self) -> int:
        limit = self.rank.live.size_limit
        return 0 if limit is None else limit.max_payload

    def _carried(self, state: bytes) -> tuple[msgspec.Raw | None, int]:
        """The state as a message carries it, and its size when it is too large to: then
        the program is told loudly, once each time it becomes too large."""
        limit = self.rank.live.size_limit
        if limit is None or limit.fits(len(state)):
            if self._too_large:
                self._too_large = False
                self.log.warning("state fits in a bus message again", size=len(state))
            return msgspec.Raw(state), 0
        if not self._too_large:
            self._too_large = True
            where = f"rank {self.rank.rank} of run {self.rank.run}"
            warning = limit.warning(len(state), where)
            print(warning, file=sys.stderr, flush=True)  # the program's operator sees it
            self.log.error("state too large for a bus message", size=len(state))
        return None, len(state)

    async def event(self, kind: str, **data: Any) -> None:
        """Publish an event of ``kind`` with ``data`` (best effort, never waits)."""
        nc, rank = self.nc, self.rank
        if nc is None or nc.is_closed:
            return
        event = m.Event(
            run=rank.run,
            rank=rank.rank,
            kind=kind,
            ts=time.time(),
            version=rank.live.version,
            data=data,
        )
        try:
            subject = self._event_subjects.get(kind)
            if subject is None:
                subject = self._event_subjects[kind] = event_subject(rank.run, rank.rank, kind)
            await nc.publish(subject, m.encode(event))
        except Exception as exc:
            self.log.debug("event publish failed", error=str(exc))

    # --- bounded waits ------------------------------------------------------------------

    async def wait(self, acks: list[Ack]) -> None:
        """Wait for registry acks, each at most :data:`PUBLISH_TIMEOUT`; failures are logged."""
        for ack in acks:
            await self.bounded(ack)

    async def bounded(self, awaitable: Awaitable[Any]) -> None:
        """A server round trip that may not hold up the agent longer than PUBLISH_TIMEOUT."""
        try:
            with anyio.fail_after(PUBLISH_TIMEOUT):
                await awaitable
        except Exception as exc:
            self.log.debug("registry write failed", error=str(exc) or type(exc).__name__)

    async def flush(self) -> None:
        """Push what is buffered to the server (bounded): before a signal ends the process."""
        if self.nc is not None and self.nc.is_connected:
            await self.bounded(self.nc.flush(timeout=1))
