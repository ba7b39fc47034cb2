"""The rank's side of the change journal: one record per write it handles.

For every write command (set, patch, reset, assign, stop, cancel), and for a deferred change
when ``ctl.sync(step)`` applies it, the agent sends one :class:`~runctl.bus.journal.Record`
to ``runctl.<run>.<rank>.journal.<change id>``: the request as sent, who sent it, the step,
the version before -> after and the field-level diff, or the rejection.

Where the write happens relative to the reply (the guarantee "answered as applied => in the
journal", at no cost to the program): the record goes out in the same write as the state,
the registry record and the reply, and its acknowledgement is awaited only after replying,
as the registry's is. The reply says ``journaled: true``; the writer (bus.Client, in its own
process) then waits until the journal holds the record before it answers its caller. So the
agent's thread never waits on the network before replying (each such wait costs a GIL
hand-off, ~5 ms in a program that holds the GIL), and nobody is told "applied" about a change
the server has not stored. A record whose acknowledgement does not come is sent again (same
``Nats-Msg-Id``: the server drops a duplicate) until it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from typing import Any, Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from runctl.agent.commands import Outcome, RankState, verb_of
from runctl.agent.publish import AckTo
from runctl.bus import messages as m
from runctl.bus.journal import Record, Skipped, elide, encode_record, request_json
from runctl.bus.journalstore import ensure_journal
from runctl.bus.subjects import ALL, journal_subject

__all__ = ["Journaler", "target_of"]

#: how long an acknowledgement is awaited before the record is queued to be sent again
ACK_TIMEOUT: Final = 1.0
RESEND_EVERY: Final = 1.0
#: unacknowledged records kept for re-sending; beyond this the oldest are dropped (logged)
MAX_UNACKED: Final = 10_000
#: a record over this many bytes loses its diff values (kept: the paths)
MAX_RECORD: Final = 900 * 1024

Ack = asyncio.Future[Any]

log = structlog.get_logger()


def target_of(subject: str) -> str:
    """Where a command was sent: the rank token of ``runctl.<run>.<rank|all>.cmd.<verb>``."""
    return subject.split(".")[2]


class Journaler:
    """Writes one rank's journal records. Inert (writes nothing) until :meth:`open`
    succeeded, so an agent without JetStream still serves."""

    def __init__(self, core: RankState) -> None:
        self.core = core
        self.live = core.live
        self.run = core.run
        self.rank = core.rank
        self.host = core.host
        self.pid = core.pid
        self.js: JetStreamContext | None = None
        self.nc: NATS | None = None
        self.error = ""
        #: change id -> where it was sent, for deferred changes applied later
        self._targets: dict[str, str] = {}
        self._unacked: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._resender: asyncio.Task[None] | None = None
        #: records whose acknowledgement went to the writer, to be confirmed (see above)
        self._confirm: list[tuple[str, bytes, dict[str, str]]] = []
        self._confirmer: asyncio.Task[None] | None = None
        self.log = log.bind(run=self.run, rank=self.rank)

    async def open(self, nc: NATS, *, timeout: float = 5.0) -> bool:
        """Make sure the stream exists; from now on records are written. False (and
        ``error`` says why) when JetStream is not there: changes still apply."""
        js = nc.jetstream()
        try:
            with anyio.fail_after(timeout):
                await ensure_journal(js)
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
            self.log.warning("change journal unavailable", error=self.error)
            return False
        self.js, self.nc = js, nc
        self.live.track_diffs = True
        return True

    @property
    def enabled(self) -> bool:
        """Whether the journal stream is reachable (JetStream on the server)."""
        return self.js is not None

    # --- records --------------------------------------------------------------------------

    def prepare(self, outcome: Outcome, target: str) -> Record | None:
        """The record of a write that was just handled (None for reads, or when the journal
        is off). Sets the reply's ``change_id`` and ``journaled`` (read by the writer)."""
        command, reply = outcome.command, outcome.reply
        if command is None or not isinstance(command, m.WRITES) or self.js is None:
            return None
        change_id = _own_id(command)
        if isinstance(reply, m.Ok):
            pending = isinstance(reply.value, dict) and reply.value.get("pending")
            if pending:
                # journaled when it applies (and run-wide by the client when scheduled)
                self._targets[str(reply.value.get("change_id") or change_id)] = target
                if len(self._targets) > 10_000:
                    self._targets.pop(next(iter(self._targets)))
                return None
            reply.change_id = change_id
            if isinstance(command, m.Stop) and command.journaled_by_writer and target == ALL:
                return None  # one run-wide record, by the writer (bus/changes.py)
            reply.journaled = True
        return self.build(
            command, reply, target=target, change_id=change_id, step=self.core.clock.step
        )

    def build(
        self,
        command: m.Command,
        reply: m.Reply,
        *,
        target: str,
        change_id: str,
        at_step: int | None = None,
        step: int | None = None,
        ts: float | None = None,
    ) -> Record:
        """A record for ``command`` and what the rank answered."""
        verb = verb_of(command)
        record = Record(
            id=change_id,
            run=self.run,
            rank=self.rank,
            target=target,
            verb=verb,
            ts=time.time() if ts is None else ts,
            by=_author(command),
            request=request_json(command),
            step=step,
            at_step=at_step if at_step is not None else getattr(command, "at_step", None),
            undo_of=command.undo_of if isinstance(command, m.Assign) else "",
            of=command.change_id if isinstance(command, m.Cancel) else "",
            host=self.host,
            pid=self.pid,
        )
        if isinstance(reply, m.Err):
            record.outcome = "rejected"
            record.error, record.message, record.errors = reply.code, reply.message, reply.detail
            record.version_before = record.version_after = reply.version
            return record
        if isinstance(command, m.Cancel):
            count = (reply.value or {}).get("cancelled", 0) if isinstance(reply.value, dict) else 0
            record.cancelled = int(count)
            record.outcome = "applied" if count else "unchanged"
        elif isinstance(command, m.Stop):
            record.outcome = "applied"
        elif reply.changed:
            record.outcome = "applied"
            record.diff = elide(self.live.take_diff(reply.version))
        else:
            record.outcome = "unchanged"
        record.version_after = reply.version
        record.version_before = reply.version - 1 if reply.changed else reply.version
        return record

    def replay_record(
        self, replayed: list[str], skipped: list[Skipped], step: int | None
    ) -> Record:
        """The record a replay leaves: what it applied, what it skipped and why."""
        return Record(
            id=f"replay-{uuid.uuid4().hex}",
            run=self.run,
            rank=self.rank,
            target=self.rank,
            verb="replay",
            ts=time.time(),
            by=m.Author(name=f"{self.rank}@{self.host}", via="replay"),
            outcome="replayed",
            step=step,
            version_after=self.live.version,
            replayed=replayed,
            skipped=skipped,
            host=self.host,
            pid=self.pid,
        )

    # --- sending ----------------------------------------------------------------------------

    async def send(
        self, record: Record | None, *, replied: bool, ack_to: AckTo | None = None
    ) -> list[Ack]:
        """Send a command's record without waiting, at its turn: before the reply, or just
        after it for a stop (a broadcast stop's replies do not queue behind 64 journal
        writes). Returns the acknowledgement to await after replying; none when it goes
        to the writer's ``ack_to`` (only for an applied write, the one the writer waits
        for)."""
        if record is None or (record.verb == "stop") != replied:
            return []
        if ack_to is not None and record.outcome != "rejected":
            await self.write_acked_to(record, ack_to)
            return []
        return await self.write(record)

    def after_reply(self, record: Record | None) -> int:
        """How many records :meth:`send` will send after the reply (a stop's)."""
        return int(record is not None and record.verb == "stop" and self.js is not None)

    async def write_acked_to(self, record: Record, ack_to: AckTo) -> None:
        """Send ``record`` with the writer's inbox as its reply subject (the server tells
        the writer once it is stored), and once more a second later with our own ack (same
        message id: a duplicate the server drops), so a lost first copy is still stored."""
        if self.js is None or self.nc is None:
            return
        subject = journal_subject(self.run, self.rank, record.id)
        payload = _fitted(record)
        headers = {"Nats-Msg-Id": f"{self.rank}-{record.id}"}
        try:
            await self.nc.publish(subject, payload, reply=ack_to.subject, headers=headers)
            ack_to.sent += 1
        except Exception as exc:
            self.log.debug("journal write failed", error=str(exc) or type(exc).__name__)
            self._queue(subject, payload, headers)
            return
        self._confirm.append((subject, payload, headers))
        if self._confirmer is None or self._confirmer.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to confirm on
                self._confirmer = asyncio.get_running_loop().create_task(self._confirm_sent())

    async def _confirm_sent(self) -> None:
        """Once a second, send the records whose acknowledgement went to their writers
        again, all in one write, and await the server's acks together (duplicates: nothing
        is stored twice). One that is still not acknowledged joins the re-send queue."""
        while self._confirm and self.js is not None:
            await anyio.sleep(RESEND_EVERY)
            batch, self._confirm = self._confirm, []
            sent: list[tuple[tuple[str, bytes, dict[str, str]], Ack]] = []
            for item in batch:
                try:
                    sent.append(
                        (item, await self.js.publish_async(item[0], item[1], headers=item[2]))
                    )
                except Exception:
                    self._queue(*item)
            for item, ack in sent:
                try:
                    with anyio.fail_after(ACK_TIMEOUT):
                        await ack
                except Exception:
                    self._queue(*item)

    async def deferred(self, outcome: Outcome, step: int) -> None:
        """Record a deferred change that ``ctl.sync(step)`` applied (on the agent's loop)."""
        command = outcome.command
        if command is None or self.js is None:
            return
        change_id = getattr(command, "change_id", "") or uuid.uuid4().hex
        record = self.build(
            command,
            outcome.reply,
            target=self._targets.pop(change_id, ALL),
            change_id=change_id,
            step=step,
        )
        for ack in await self.write(record):
            with contextlib.suppress(Exception), anyio.fail_after(ACK_TIMEOUT):
                await ack

    async def write(self, record: Record) -> list[Ack]:
        """Send ``record`` without waiting; returns its acknowledgement to await later."""
        if self.js is None:
            return []
        subject = journal_subject(self.run, self.rank, record.id)
        payload = _fitted(record)
        headers = {"Nats-Msg-Id": f"{self.rank}-{record.id}"}
        try:
            ack = await self.js.publish_async(subject, payload, headers=headers)
        except Exception as exc:
            self.log.debug("journal write failed", error=str(exc) or type(exc).__name__)
            self._queue(subject, payload, headers)
            return []
        ack.add_done_callback(partial_requeue(self, subject, payload, headers))
        return [ack]

    def _queue(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        if len(self._unacked) >= MAX_UNACKED:
            dropped = self._unacked.popleft()
            self.log.warning(
                "journal backlog full: oldest unsent record dropped", subject=dropped[0]
            )
        self._unacked.append((subject, payload, headers))
        if self._resender is None or self._resender.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to resend on
                self._resender = asyncio.get_running_loop().create_task(self._resend())

    async def _resend(self) -> None:
        """Send unacknowledged records again, oldest first, until each is stored."""
        while self._unacked and self.js is not None:
            await anyio.sleep(RESEND_EVERY)
            while self._unacked:
                head = self._unacked[0]
                subject, payload, headers = head
                try:
                    with anyio.fail_after(ACK_TIMEOUT):
                        await self.js.publish(subject, payload, headers=headers)
                except Exception:
                    break  # still away: try again later
                self._stored(head)

    def _stored(self, item: tuple[str, bytes, dict[str, str]]) -> None:
        """``item`` was stored: off the queue, unless a full queue dropped it meanwhile."""
        if self._unacked and self._unacked[0] is item:
            self._unacked.popleft()

    @property
    def unsent(self) -> int:
        """How many journal records wait for the server's acknowledgement."""
        return len(self._unacked)

    async def aclose(self, timeout: float = 2.0) -> None:
        """Try (bounded) to store what is still unacknowledged, then stop re-sending."""
        if self._confirmer is not None:
            self._confirmer.cancel()
            with contextlib.suppress(BaseException):
                await self._confirmer
        # the re-sender stops first: two loops popping the same queue would race
        if self._resender is not None:
            self._resender.cancel()
            with contextlib.suppress(BaseException):
                await self._resender
        self._unacked.extend(self._confirm)  # not confirmed yet: sent again below (no copies)
        self._confirm.clear()
        if self._unacked and self.js is not None:
            with anyio.move_on_after(timeout):
                while self._unacked:
                    head = self._unacked[0]
                    subject, payload, headers = head
                    try:
                        await self.js.publish(subject, payload, headers=headers, timeout=1.0)
                    except Exception:
                        break
                    self._stored(head)


def _fitted(record: Record) -> bytes:
    """The record's bytes, under :data:`MAX_RECORD` (the server refuses a message over its
    1 MiB limit, which would leave the record unsent for good): a diff too large keeps its
    paths only (no undo), and a request too large is kept as its size, which a replay
    reports as skipped ("too large to keep") instead of applying something else."""
    payload = encode_record(record)
    if len(payload) > MAX_RECORD:
        record.diff = [
            type(c)(path=c.path, before="<elided>", after="<elided>", elided=True)
            for c in record.diff
        ]
        payload = encode_record(record)
    if len(payload) > MAX_RECORD and isinstance(record.request, dict):
        size = len(msgspec.json.encode(record.request))
        record.request = {"t": record.request.get("t"), "elided": size}
        payload = encode_record(record)
    return payload


def partial_requeue(
    journaler: Journaler, subject: str, payload: bytes, headers: dict[str, str]
) -> Any:
    """An ack callback: a record the server did not acknowledge is queued to be re-sent."""

    def done(future: Ack) -> None:
        if future.cancelled() or future.exception() is not None:
            journaler._queue(subject, payload, headers)

    return done


def _own_id(command: m.Command) -> str:
    if isinstance(command, m.Cancel):
        return command.id or uuid.uuid4().hex
    return getattr(command, "change_id", "") or uuid.uuid4().hex


def _author(command: m.Command) -> m.Author:
    by = getattr(command, "by", None)
    return by if isinstance(by, m.Author) else m.Author(via="nats")
