"""The agent side of the completed-step log: durable appends and the in-memory done set.

Writes:

- ``started`` and ``failed`` records and the ``step_*`` events are plain publishes (no
  wait: they only inform).
- A completion is a JetStream publish with a ``Nats-Msg-Id`` and is **done only once the
  server acknowledged it**. The caller waits at most ``ack_timeout`` for the PubAck; an
  unacknowledged completion stays queued and is re-sent with the same ``Nats-Msg-Id`` (the
  server drops the duplicate) until acknowledged, across server restarts. Only an
  acknowledged completion enters the in-memory done set.

Reads: the rank's and the run's records are loaded once at start (fast path, see
:mod:`runctl.bus.stepstore`), and again after a reconnect (a forget may have been missed).
Afterwards "is it done?" is a dict lookup. The index is plain dicts, replaced wholesale
(never resized under a reader) when reloaded or forgotten from, so the program's thread reads
it without a lock while the agent's event loop writes it.

Live updates: forget markers for this rank and run-wide records arrive on plain
subscriptions; another rank's run-wide completion is trusted only once read back from the
stream (so nothing is counted done that the server has not stored).

The writer is an asyncio task owned by the StepLog (the agent's ``serve()`` is a single
linear task with no task group to lend), cancelled and awaited in :meth:`StepLog.aclose`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import errors as js_errors

from runctl.bus import messages as m
from runctl.bus.steprecords import (
    FORGOTTEN_ID,
    ForgetMarker,
    RunLog,
    StepRecord,
    covered,
    decode_entry,
    encode_entry,
    step_label,
)
from runctl.bus.stepstore import STREAM, ForgetReport, ensure_stream, fast_read, forget
from runctl.bus.subjects import (
    RUN_SCOPE,
    check_token,
    event_subject,
    step_record_subject,
    step_records_filter,
)

__all__ = ["ACK_TIMEOUT", "MAX_IN_FLIGHT", "RESEND_AFTER", "Pending", "StepLog"]

#: longest a program waits for the PubAck of one completion before carrying on
ACK_TIMEOUT: Final = 1.0
#: an unacknowledged completion is sent again (same Nats-Msg-Id) after this long
RESEND_AFTER: Final = 2.0
MAX_IN_FLIGHT: Final = 1024

log = structlog.get_logger()


@dataclass(eq=False, slots=True)
class Pending:
    """A completion on its way to the server."""

    record: StepRecord
    subject: str
    payload: bytes
    msg_id: str
    done: asyncio.Event = field(default_factory=asyncio.Event)
    acked: bool = False
    error: str = ""
    future: asyncio.Future[Any] | None = None
    sent: float = 0.0
    sends: int = 0


Index = dict[str, tuple[int, StepRecord]]


class StepLog:
    """One rank's view of the log: its own scope and the run scope, in memory."""

    def __init__(
        self,
        nc: NATS,
        *,
        run: str,
        rank: str,
        host: str,
        pid: int,
        ack_timeout: float = ACK_TIMEOUT,
        events: bool = True,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.run = check_token(run, "run")
        self.rank = check_token(rank, "rank")
        self.host = host
        self.pid = pid
        self.ack_timeout = ack_timeout
        self.events = events
        self.index: dict[str, Index] = {self.rank: {}, RUN_SCOPE: {}}
        self.markers: dict[tuple[str, str], tuple[int, ForgetMarker]] = {}
        #: attempts found at ``started`` when the log was loaded: interrupted by a crash
        self.interrupted: list[StepRecord] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._outbox: deque[Pending | tuple[str, bytes]] = deque()
        self._unsent: deque[Pending] = deque()
        self._in_flight: dict[str, Pending] = {}
        #: completions submitted / finished (acknowledged or refused), under _count_lock:
        #: submitted from the program's thread, finished on the loop's
        self._submitted = 0
        self._finished = 0
        self._count_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._task: asyncio.Task[None] | None = None
        self._reload: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._loading = False
        self._loaded_once = False
        self._held_markers: list[tuple[int, ForgetMarker]] = []
        self._reconnects = 0
        self._stream_missing = False
        self._prefixes: dict[tuple[str, str], str] = {}
        self._closed = False
        self.log = log.bind(run=run, rank=rank)

    @classmethod
    async def open(cls, nc: NATS, **kwargs: Any) -> StepLog:
        """Ensure the stream, listen for forgets and run-wide completions, load the log."""
        self = cls(nc, **kwargs)
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._reconnects = nc.stats.get("reconnects", 0)
        await ensure_stream(self.js)
        # forget markers for this rank; every run-wide record and marker
        for subject in (
            step_records_filter(self.run, self.rank)[:-1] + FORGOTTEN_ID,
            step_records_filter(self.run, RUN_SCOPE),
        ):
            self._subs.append(await nc.subscribe(subject, cb=self._on_notice))
        await self.load()
        self._task = asyncio.create_task(self._writer(), name=f"runctl-steplog-{self.rank}")
        return self

    # --- reads: plain dict lookups, safe from any thread -------------------------------

    def lookup(self, scope: str, sid: str) -> tuple[int, StepRecord] | None:
        return self.index[scope].get(sid)

    def records(self, scopes: Iterable[str] | None = None) -> RunLog:
        """A snapshot of what this rank holds, as a :class:`RunLog`."""
        snapshot = RunLog(self.run)
        for scope in scopes or tuple(self.index):
            for seq, rec in list(self.index.get(scope, {}).values()):
                snapshot.add(seq, rec)
        snapshot.markers.update(self.markers)
        return snapshot

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Completions not yet acknowledged by the server."""
        return self._submitted - self._finished

    # --- writes ----------------------------------------------------------------------

    def subject(self, rec: StepRecord) -> str:
        prefix = self._prefixes.get((rec.scope, rec.name))
        if prefix is None:
            prefix = step_record_subject(self.run, rec.scope, rec.name, "x")[:-1]
            self._prefixes[(rec.scope, rec.name)] = prefix
        return prefix + rec.id

    def note(self, rec: StepRecord) -> None:
        """Publish a ``started``/``failed`` record, without waiting. Thread-safe."""
        self._post((self.subject(rec), encode_entry(rec)))

    def event(self, kind: str, **data: Any) -> None:
        """Publish a ``step_*`` event on this rank's event subject. Thread-safe."""
        if self.events:
            ev = m.Event(run=self.run, rank=self.rank, kind=kind, ts=time.time(), data=data)
            self._post((event_subject(self.run, self.rank, kind), m.encode(ev)))

    def submit(self, rec: StepRecord) -> Pending:
        """Queue a completion; it is re-sent until acknowledged. Thread-safe."""
        pending = Pending(rec, self.subject(rec), encode_entry(rec), secrets.token_hex(12))
        with self._count_lock:
            self._submitted += 1
        self._post(pending)
        return pending

    async def complete(
        self, rec: StepRecord, *, wait: bool = True, timeout: float | None = None
    ) -> bool:
        """Queue a completion and wait (bounded) for its PubAck. True once acknowledged;
        False if still queued (the server is slow or down): it stays queued and is
        re-sent until acknowledged, but it is not done until then."""
        pending = self.submit(rec)
        if not wait or not self.nc.is_connected:
            return False
        with anyio.move_on_after(self.ack_timeout if timeout is None else timeout):
            await pending.done.wait()
        return pending.acked

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued completion is acknowledged (bounded). True if none is left."""
        with anyio.move_on_after(timeout):
            while self.pending:  # noqa: ASYNC110 - counted across threads; a short poll is simplest
                await asyncio.sleep(0.005)
        return not self.pending

    def _post(self, item: Pending | tuple[str, bytes]) -> None:
        self._outbox.append(item)
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        elif not self._wake_pending and self.loop is not None:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._wake.set)

    # --- the writer task ---------------------------------------------------------------

    async def _writer(self) -> None:
        while not self._closed:
            with anyio.move_on_after(0.05 if self._in_flight or self._unsent else 0.25):
                await self._wake.wait()
            self._wake.clear()
            self._wake_pending = False
            try:
                self._check_reconnect()
                await self._drain()
                await self._send()
            except Exception:  # the writer must outlive any single failure
                self.log.exception("step log writer failed; retrying")
                await asyncio.sleep(0.1)

    def _check_reconnect(self) -> None:
        count = self.nc.stats.get("reconnects", 0)
        if count == self._reconnects:
            return
        self._reconnects = count
        # acks of what was in flight may be lost: send again (the server drops duplicates)
        for pending in sorted(self._in_flight.values(), key=lambda p: p.sent, reverse=True):
            self._cancel(pending)
            self._unsent.appendleft(pending)
        self._in_flight.clear()
        if self._reload is None or self._reload.done():
            # forgets and other ranks' completions may have been missed while away
            self._reload = asyncio.create_task(self.reload())

    async def _drain(self) -> None:
        connected = self.nc.is_connected
        while self._outbox:
            item = self._outbox.popleft()
            if isinstance(item, Pending):
                self._unsent.append(item)
            elif connected:  # notes and events are best-effort
                with contextlib.suppress(Exception):
                    await self.nc.publish(item[0], item[1])

    async def _send(self) -> None:
        if not self.nc.is_connected:
            return
        now = time.monotonic()
        for pending in [p for p in self._in_flight.values() if now - p.sent > RESEND_AFTER]:
            self._cancel(pending)
            del self._in_flight[pending.msg_id]
            self._unsent.appendleft(pending)
        if self._stream_missing:
            try:
                with anyio.fail_after(self.ack_timeout):
                    await ensure_stream(self.js)
            except Exception as exc:  # JetStream not back yet: next round
                self.log.debug("step stream not available yet", error=str(exc) or repr(exc))
                return
            self._stream_missing = False
        while self._unsent and len(self._in_flight) < MAX_IN_FLIGHT and self.nc.is_connected:
            pending = self._unsent[0]
            try:
                # no wait_stall: with one, nats-py wraps every publish in a task and yields,
                # which sends each on its own (our window stays under its own limit)
                future = await self.js.publish_async(
                    pending.subject,
                    pending.payload,
                    headers={"Nats-Msg-Id": pending.msg_id},
                )
            except Exception as exc:
                self.log.debug("completion not sent, will retry", error=str(exc) or repr(exc))
                return
            self._unsent.popleft()
            pending.future = future
            pending.sent = time.monotonic()
            pending.sends += 1
            self._in_flight[pending.msg_id] = pending
            future.add_done_callback(partial(self._on_ack, pending))

    def _cancel(self, pending: Pending) -> None:
        if pending.future is not None:
            pending.future.cancel()  # frees nats-py's slot for it
            pending.future = None

    def _on_ack(self, pending: Pending, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or pending.future is not future:
            return
        pending.future = None
        self._in_flight.pop(pending.msg_id, None)
        exc = future.exception()
        if exc is None:
            self._acked(pending, future.result().seq)
            return
        if isinstance(exc, js_errors.NoStreamResponseError) or (
            isinstance(exc, js_errors.APIError) and exc.code == 503
        ):
            self._stream_missing = True  # e.g. a server restarted from an empty store
        elif isinstance(exc, js_errors.APIError):
            # the server refused this record (too large, ...): retrying cannot help
            pending.error = f"{exc.description or exc}"
            self._finish(pending)
            self.log.error(
                "step completion refused by the server",
                subject=pending.subject,
                error=pending.error,
            )
            return
        self._unsent.appendleft(pending)
        self._wake.set()

    def _acked(self, pending: Pending, seq: int) -> None:
        rec = pending.record
        self.index[rec.scope][rec.sid] = (seq, rec)
        pending.acked = True
        self._finish(pending)
        self.event(
            "step_done",
            name=rec.name,
            key=rec.key,
            scope=rec.scope,
            config_hash=rec.config_hash,
            attempt=rec.attempt,
            duration=rec.duration,
            seq=seq,
        )

    def _finish(self, pending: Pending) -> None:
        with self._count_lock:
            self._finished += 1
        pending.done.set()

    # --- loading and notices -----------------------------------------------------------

    async def load(self) -> None:
        """Read this rank's and the run's records (once, at start; again after a reconnect)."""
        scopes = (self.rank, RUN_SCOPE)
        fresh: dict[str, Index] = {scope: {} for scope in scopes}
        markers: dict[tuple[str, str], tuple[int, ForgetMarker]] = {}

        def on_entry(subject: str, data: bytes, seq: int) -> None:
            entry = decode_entry(data)
            if isinstance(entry, StepRecord):
                fresh[entry.scope][entry.sid] = (seq, entry)
            else:
                markers[(entry.scope, entry.name)] = (seq, entry)

        initial = not self._loaded_once
        self._loading = True
        try:
            start_seq = 0
            if not initial:  # a reload: what we hold may be newer than what is read
                start_seq = (await self.js.stream_info(STREAM)).state.last_seq
            await fast_read(self.nc, [step_records_filter(self.run, s) for s in scopes], on_entry)
            for scope in scopes:
                merged = fresh[scope]
                for sid, (seq, rec) in self.index[scope].items():
                    if seq > start_seq and seq > merged.get(sid, (0, rec))[0]:
                        merged[sid] = (seq, rec)
                self.index[scope] = merged  # swapped whole: readers never see a half-load
            self.markers = markers
            held, self._held_markers = self._held_markers, []
            for seq, marker in held:
                self._apply_marker(seq, marker)
            self._loaded_once = True
        finally:
            self._loading = False
        if initial:
            self.interrupted = [
                rec
                for scope in scopes
                for _, rec in self.index[scope].values()
                if rec.status == "started" and (rec.host, rec.pid) != (self.host, self.pid)
            ]
            if self.interrupted:
                self.log.warning(
                    "interrupted steps found: they will run again",
                    count=len(self.interrupted),
                    steps=[step_label(r.name, r.key) for r in self.interrupted[:10]],
                )

    async def reload(self) -> None:
        try:
            with anyio.fail_after(30):
                await ensure_stream(self.js)
                await self.load()
        except Exception as exc:
            self.log.warning("step log reload failed", error=str(exc) or type(exc).__name__)

    async def _on_notice(self, msg: Msg) -> None:
        try:
            entry = decode_entry(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if isinstance(entry, ForgetMarker):
            if self._loading:
                self._held_markers.append((0, entry))
            else:
                self._apply_marker(0, entry)
        elif entry.status == "done" and entry.scope == RUN_SCOPE and entry.rank != self.rank:
            # another rank completed a run-wide step: trust the stored copy, not the wire
            await self._confirm(msg.subject)

    async def _confirm(self, subject: str) -> None:
        try:
            with anyio.fail_after(self.ack_timeout * 2):
                stored = await self.js.get_last_msg(STREAM, subject)
        except Exception:
            return  # not stored (yet): the reload after a reconnect or the next start sees it
        entry = decode_entry(stored.data or b"")
        seq = stored.seq or 0
        if isinstance(entry, StepRecord) and entry.status == "done":
            scope = self.index[entry.scope]
            if seq > scope.get(entry.sid, (0, entry))[0]:
                scope[entry.sid] = (seq, entry)

    def _apply_marker(self, seq: int, marker: ForgetMarker) -> None:
        scope = self.index.get(marker.scope)
        held = self.markers.get((marker.scope, marker.name))
        if scope is None or (
            held is not None and held[1].ts == marker.ts and held[1].selector == marker.selector
        ):
            return  # not ours, or already applied (we forgot it ourselves)
        self.index[marker.scope] = {
            sid: (s, rec)
            for sid, (s, rec) in scope.items()
            if not (s <= marker.upto_seq and covered(marker, rec))
        }
        self.markers[(marker.scope, marker.name)] = (seq, marker)
        self.log.info(
            "steps forgotten",
            selector=marker.selector,
            scope=marker.scope,
            name=marker.name,
            count=marker.count,
        )

    async def forget(self, selector: str | None, *, rank: str | None = None) -> ForgetReport:
        """Forget steps of this run (see :func:`runctl.bus.stepstore.forget`); this agent's done set
        follows before it returns."""
        report = await forget(
            self.nc, self.run, selector, rank=rank, by=f"pid {self.pid} on {self.host}"
        )
        for marker in report.markers:
            self._apply_marker(0, marker)
        return report

    # --- shutdown ----------------------------------------------------------------------

    async def aclose(self, timeout: float = 2.0) -> None:
        """Flush what is queued (bounded), then stop. Unacknowledged completions are lost:
        those steps are not done and run again next time."""
        if self._closed:
            return
        if self.pending and self.nc.is_connected:
            await self.flush(timeout)
        self._closed = True
        self._wake.set()
        for task in (self._task, self._reload):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        for pending in list(self._in_flight.values()):
            self._cancel(pending)
        for sub in self._subs:
            with anyio.move_on_after(0.5), contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.pending:
            self.log.warning(
                "step completions not acknowledged at exit: they will run again", count=self.pending
            )
