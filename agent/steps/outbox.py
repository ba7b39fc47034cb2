"""The step log's writer: sends what the program logs, and completions until acknowledged.

- ``started`` and ``failed`` records and the ``step_*`` events are plain publishes (no
  wait: they only inform); they are dropped while the bus is down.
- A completion is a JetStream publish with a ``Nats-Msg-Id``. It stays queued until the
  server acknowledges it and is re-sent with the same id (the server drops a duplicate)
  after :data:`RESEND_AFTER`, after a reconnect, or once the stream is back after a server
  restart from an empty store. Only then does :class:`Outbox` report it acknowledged.
- With nothing queued or unacknowledged the writer sleeps until something is posted or
  :meth:`Outbox.check` is called (the agent's heartbeat does, once a second, to notice a
  reconnect): an idle rank's thread is not woken for nothing, since on a machine where
  a woken thread runs cold each wake-up costs far more than the check.

Anything may be posted from any thread (the program's); the writer runs on the agent's
loop as an asyncio task the outbox owns: it must outlive the agent's own tasks, which end
before the agent's shutdown flushes what is queued (:meth:`Outbox.aclose`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from math import inf
from typing import Any, Final

import anyio
from nats.aio.client import Client as NATS
from nats.js import errors as js_errors
from structlog.typing import FilteringBoundLogger

from runctl.bus.steps.records import StepRecord
from runctl.bus.steps.store import ensure_stream

__all__ = ["BUSY_RECHECK", "MAX_IN_FLIGHT", "RESEND_AFTER", "Outbox", "Pending"]

#: an unacknowledged completion is sent again (same Nats-Msg-Id) after this long
RESEND_AFTER: Final = 2.0
#: completions sent and not yet acknowledged, at most
MAX_IN_FLIGHT: Final = 1024
#: seconds between the writer's rounds while something waits to be sent or acknowledged
BUSY_RECHECK: Final = 0.05


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


class Outbox:
    """What one agent sends to the step log, in order, from any thread.

    ``on_acked(pending, seq)`` runs on the loop when the server stored a completion at
    stream sequence ``seq``; ``on_reconnect()`` when the connection came back (what was
    missed meanwhile may need reading again).
    """

    def __init__(
        self,
        nc: NATS,
        *,
        ack_timeout: float,
        on_acked: Callable[[Pending, int], None],
        on_reconnect: Callable[[], None],
        log: FilteringBoundLogger,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.ack_timeout = ack_timeout
        self.loop = asyncio.get_running_loop()
        self.log = log
        self._on_acked = on_acked
        self._on_reconnect = on_reconnect
        self._loop_thread = threading.get_ident()
        self._queue: deque[Pending | tuple[str, bytes]] = deque()
        self._unsent: deque[Pending] = deque()
        self._in_flight: dict[str, Pending] = {}
        #: completions submitted / finished (acknowledged or refused), under _count_lock:
        #: submitted from the program's thread, finished on the loop's
        self._submitted = 0
        self._finished = 0
        self._count_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._reconnects = nc.stats.get("reconnects", 0)
        self._stream_missing = False
        self._closed = False
        self._task = asyncio.create_task(self._writer(), name="runctl-steplog-writer")

    @property
    def pending(self) -> int:
        """Completions not yet acknowledged (or refused) by the server."""
        return self._submitted - self._finished

    def post(self, subject: str, payload: bytes) -> None:
        """Publish ``payload`` on ``subject`` soon, best effort. Thread-safe."""
        self._post((subject, payload))

    def submit(self, pending: Pending) -> None:
        """Queue a completion; it is re-sent until acknowledged. Thread-safe."""
        with self._count_lock:
            self._submitted += 1
        self._post(pending)

    def check(self) -> None:
        """Let the writer look at the connection now (a reconnect), on the loop's thread."""
        self._wake.set()

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued completion is acknowledged (bounded). True if none is left."""
        with anyio.move_on_after(timeout):
            while self.pending:  # noqa: ASYNC110 - counted across threads; a short poll is simplest
                await asyncio.sleep(0.005)
        return not self.pending

    async def aclose(self) -> None:
        """Stop the writer; what is still unacknowledged stays so (the caller flushed)."""
        self._closed = True
        self._wake.set()
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        for pending in list(self._in_flight.values()):
            self._cancel(pending)

    def _post(self, item: Pending | tuple[str, bytes]) -> None:
        self._queue.append(item)
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        elif not self._wake_pending:
            self._wake_pending = True
            self.loop.call_soon_threadsafe(self._wake.set)

    # --- the writer task ---------------------------------------------------------------

    async def _writer(self) -> None:
        while not self._closed:
            with anyio.move_on_after(BUSY_RECHECK if self._in_flight or self._unsent else inf):
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
        self._on_reconnect()

    async def _drain(self) -> None:
        connected = self.nc.is_connected
        while self._queue:
            item = self._queue.popleft()
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
            pending.acked = True
            self._on_acked(pending, future.result().seq)
            self._finish(pending)
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

    def _finish(self, pending: Pending) -> None:
        with self._count_lock:
            self._finished += 1
        pending.done.set()
