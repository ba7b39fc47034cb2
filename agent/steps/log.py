"""One rank's view of the step log: its own scope and the run scope, in memory.

Writes go through the :class:`~runctl.agent.steps.outbox.Outbox`: a completion is done
**only once the server acknowledged it** (the caller waits at most ``ack_timeout``; an
unacknowledged completion stays queued and is re-sent until it is). Only an acknowledged
completion enters the in-memory done set.

Reads: the rank's and the run's records are loaded once at start (fast path, see
:mod:`runctl.bus.steps.store`), and again after a reconnect (a forget may have been missed).
Afterwards "is it done?" is one dict lookup from the program's thread, without a lock: a
lookup is a single dict operation, and a load or a forget swaps in a whole new dict, so a
reader never sees half of one. The agent's loop is the only writer.

Live updates: forget markers for this rank and run-wide records arrive on plain
subscriptions; another rank's run-wide completion is trusted only once read back from the
stream (so nothing is counted done that the server has not stored).

Why one module of this size: the in-memory done sets, their loading and their live updates
share one rule (only what the server stored counts as done), kept in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from runctl.agent.steps.outbox import Outbox, Pending
from runctl.bus import messages as m
from runctl.bus.artifact_codec import ArtifactRef, Encoded, object_name
from runctl.bus.artifact_store import ArtifactStore, Progress
from runctl.bus.replicas import replicas_from_env
from runctl.bus.steps.forget import covered
from runctl.bus.steps.records import (
    FORGOTTEN_ID,
    ForgetMarker,
    RunLog,
    StepRecord,
    decode_entry,
    encode_entry,
    step_label,
)
from runctl.bus.steps.store import STREAM, ForgetReport, ensure_stream, fast_read, forget
from runctl.bus.subjects import (
    RUN_SCOPE,
    check_token,
    event_subject,
    step_record_subject,
    step_records_filter,
)

__all__ = ["ACK_TIMEOUT", "Index", "StepLog"]

#: longest a program waits for the PubAck of one completion before carrying on
ACK_TIMEOUT: Final = 1.0
#: between reads of another rank's run-wide completion not yet stored
CONFIRM_RETRY: Final = 0.02

#: a scope's done set: step id -> (stream sequence, latest record)
Index = dict[str, tuple[int, StepRecord]]

log = structlog.get_logger()


class StepLog:
    """One rank's view of the log: its own scope and the run scope, in memory.
    Made by :meth:`open` on the agent's loop; every method but the coroutines may be
    called from any thread."""

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
        #: scope (this rank, "run") -> its done set
        self.index: dict[str, Index] = {self.rank: {}, RUN_SCOPE: {}}
        self.markers: dict[tuple[str, str], tuple[int, ForgetMarker]] = {}
        #: attempts found at ``started`` when the log was loaded: interrupted by a crash
        self.interrupted: list[StepRecord] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: Outbox | None = None
        self._reload: asyncio.Task[None] | None = None
        self._subs: list[Subscription] = []
        self._loading = False
        self._loaded_once = False
        self._held_markers: list[tuple[int, ForgetMarker]] = []
        self._prefixes: dict[tuple[str, str], str] = {}
        self._closed = False
        self._artifacts: ArtifactStore | None = None
        self.log = log.bind(run=run, rank=rank)

    @classmethod
    async def open(cls, nc: NATS, **kwargs: Any) -> StepLog:
        """Ensure the stream, listen for forgets and run-wide completions, load the log,
        start the writer. ``kwargs``: as the constructor."""
        self = cls(nc, **kwargs)
        self.loop = asyncio.get_running_loop()
        await ensure_stream(self.js)
        # forget markers for this rank; every run-wide record and marker
        for subject in (
            step_records_filter(self.run, self.rank)[:-1] + FORGOTTEN_ID,
            step_records_filter(self.run, RUN_SCOPE),
        ):
            self._subs.append(await nc.subscribe(subject, cb=self._on_notice))
        await self.load()
        self._outbox = Outbox(
            nc,
            ack_timeout=self.ack_timeout,
            on_acked=self._acked,
            on_reconnect=self._reload_soon,
            log=self.log,
        )
        return self

    # --- reads: plain dict lookups, safe from any thread -------------------------------

    def lookup(self, scope: str, sid: str) -> tuple[int, StepRecord] | None:
        """The latest record of step ``sid`` in ``scope`` this rank holds, with its stream
        sequence; None if it has none."""
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
        """True once :meth:`aclose` ran: nothing more can be logged."""
        return self._closed

    @property
    def pending(self) -> int:
        """Completions not yet acknowledged by the server."""
        return 0 if self._outbox is None else self._outbox.pending

    # --- writes ----------------------------------------------------------------------

    def subject(self, rec: StepRecord) -> str:
        """The subject of ``rec``: ``runctl.<run>.<scope>.done.<name>.<record id>``."""
        prefix = self._prefixes.get((rec.scope, rec.name))
        if prefix is None:
            prefix = step_record_subject(self.run, rec.scope, rec.name, "x")[:-1]
            self._prefixes[(rec.scope, rec.name)] = prefix
        return prefix + rec.id

    def note(self, rec: StepRecord) -> None:
        """Publish a ``started``/``failed`` record, without waiting. Thread-safe."""
        self._writer().post(self.subject(rec), encode_entry(rec))

    def event(self, kind: str, **data: Any) -> None:
        """Publish a ``step_*`` event on this rank's event subject. Thread-safe."""
        if self.events:
            ev = m.Event(run=self.run, rank=self.rank, kind=kind, ts=time.time(), data=data)
            self._writer().post(event_subject(self.run, self.rank, kind), m.encode(ev))

    def submit(self, rec: StepRecord) -> Pending:
        """Queue a completion; it is re-sent until acknowledged. Thread-safe."""
        pending = Pending(rec, self.subject(rec), encode_entry(rec), secrets.token_hex(12))
        self._writer().submit(pending)
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

    # --- results and files in the object store (on the agent's loop) --------------------

    async def artifacts(self) -> ArtifactStore:
        """The object store of step results and files, opened (or created) on first use."""
        if self._artifacts is None:
            self._artifacts = await ArtifactStore.open(self.js, replicas=replicas_from_env())
        return self._artifacts

    async def put_result(self, rec: StepRecord, encoded: Encoded) -> ArtifactRef:
        """Store a result that does not fit in its record; the reference to keep there."""
        assert encoded.data is not None
        name = object_name(rec.run, rec.scope, rec.name, rec.id, rec.attempt, "result")
        store = await self.artifacts()
        return await store.put_bytes(name, encoded.data, encoded.codec)

    async def put_file(
        self, rec: StepRecord, file_name: str, path: Path, progress: Progress | None
    ) -> ArtifactRef:
        """Stream a file into the object store as one of ``rec``'s files."""
        name = object_name(rec.run, rec.scope, rec.name, rec.id, rec.attempt, f"files/{file_name}")
        store = await self.artifacts()
        return await store.put_file(name, path, progress)

    async def get_artifact(self, ref: ArtifactRef) -> bytes:
        """A stored result's bytes, verified (:class:`~runctl.bus.errors.CorruptArtifact`)."""
        return await (await self.artifacts()).get_bytes(ref)

    async def download(self, ref: ArtifactRef, path: Path, progress: Progress | None) -> Path:
        """Stream a stored file to ``path``, verified before it gets that name."""
        return await (await self.artifacts()).download(ref, path, progress)

    def check(self) -> None:
        """Look at the connection soon: after a reconnect, completions in flight are sent
        again and what was missed is read again. Called by the agent's heartbeat, on the
        loop's thread; the writer sleeps between its rounds otherwise."""
        if self._outbox is not None:
            self._outbox.check()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued completion is acknowledged (bounded). True if none is left."""
        return await self._writer().flush(timeout)

    def _writer(self) -> Outbox:
        if self._outbox is None:
            raise RuntimeError("the step log is not open: use StepLog.open()")
        return self._outbox

    def _acked(self, pending: Pending, seq: int) -> None:
        rec = pending.record
        self.index[rec.scope][rec.sid] = (seq, rec)
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

    def _reload_soon(self) -> None:
        if self._reload is None or self._reload.done():
            # forgets and other ranks' completions may have been missed while away
            self._reload = asyncio.create_task(self.reload())

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
        """:meth:`load` again, bounded; a failure is logged, the held log kept."""
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
        """Count another rank's run-wide completion as done once the stream shows it. A read
        that fails (a busy server) or does not show it yet is tried again, bounded: one
        failed read must not leave the step undone here until the next start."""
        with anyio.move_on_after(self.ack_timeout * 2):
            while True:
                try:
                    stored = await self.js.get_last_msg(STREAM, subject)
                    entry = decode_entry(stored.data or b"")
                except Exception:  # not stored yet, or unreadable: read again
                    entry = None
                if isinstance(entry, StepRecord) and entry.status == "done":
                    seq = stored.seq or 0
                    scope = self.index[entry.scope]
                    if seq > scope.get(entry.sid, (0, entry))[0]:
                        scope[entry.sid] = (seq, entry)
                    return
                await anyio.sleep(CONFIRM_RETRY)
        # not stored in time: the reload after a reconnect or the next start sees it

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
        """Forget steps of this run (see :func:`runctl.bus.steps.store.forget`); this
        agent's done set follows before it returns."""
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
        if self._outbox is not None:
            await self._outbox.aclose()
        if self._reload is not None and not self._reload.done():
            self._reload.cancel()
            with contextlib.suppress(BaseException):
                await self._reload
        for sub in self._subs:
            with anyio.move_on_after(0.5), contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.pending:
            self.log.warning(
                "step completions not acknowledged at exit: they will run again", count=self.pending
            )
