"""Fewer turns of the event loop per message: parse bytes as they arrive, handle each
message as it is read, write at once.

nats-py hands every message of a subscription through a queue to a task of the
subscription's own, which then calls the callback; and a publish only appends to a buffer
that its flusher task writes to the socket on a later turn of the loop. Each turn costs
CPU (0.02-0.07 ms here) and, in a program whose threads hold the GIL, one more hand-off
of the GIL. On a command's way through a rank and a writer there were four such turns.

- :func:`subscribe_now` subscribes a plain function that is called inside nats-py's reader,
  as each message is parsed; it must not block.
- :func:`run_now` runs a coroutine at once, in the caller's turn, until it first waits;
  only then does the rest continue in a task. Code run so must not wait inside a cancel
  scope or timeout it entered before its first wait: those belong to the task they were
  entered in (anyio's scopes, ``asyncio.timeout``), and the rest runs in another.
- :func:`write_now` hands what the connection buffered to the socket at once;
  :func:`written_at_once` does so for everything published inside it, and keeps nats-py
  from waking its flusher for each of those publishes.
- :func:`read_now` parses what the socket delivers in the connection's protocol callback,
  as it arrives, instead of waking nats-py's reader task for it one turn later: a message
  is read, handled and answered in the one turn that found it on the socket.

All of them lean on nats-py's internals (a subscription's queue and pending-bytes count,
the client's write buffer, flush queue, transport and parser, asyncio's stream reader); where those
differ, they fall back to nats-py's own way: the subscription's task, the flusher, the
reader task.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import structlog
from nats import errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport

__all__ = ["WrittenAtOnce", "read_now", "run_now", "subscribe_now", "write_now", "written_at_once"]

log = structlog.get_logger()


class _CallNow(asyncio.Queue[Msg]):
    """Stands in for a subscription's queue: nats-py's reader puts each message into it,
    and this calls the handler instead of queueing. Nothing is ever queued, so the
    subscription's own task waits for nothing, and a drain finds nothing left to do."""

    def __init__(self, sub: Subscription, handler: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub, self._handler = sub, handler

    def put_nowait(self, item: Msg) -> None:
        """Handle ``item`` now (nats-py's reader calls this for each message)."""
        self._sub._pending_size -= len(item.data)  # nats-py counted it as queued
        try:
            self._handler(item)
        except Exception:  # the reader must go on: an error here would end the connection
            log.exception("message handler failed", subject=item.subject)


async def subscribe_now(nc: NATS, subject: str, handler: Callable[[Msg], None]) -> Subscription:
    """Subscribe ``handler`` to ``subject``, called as each message is read (no task of the
    subscription's own); with an unexpected nats-py, through that task as usual."""

    async def through_task(msg: Msg) -> None:
        handler(msg)

    sub = await nc.subscribe(subject, cb=through_task)
    if isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue) and isinstance(
        getattr(sub, "_pending_size", None), int
    ):
        sub._pending_queue = _CallNow(sub, handler)
    return sub


def run_now(
    coro: Coroutine[Any, Any, None],
    continue_in: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
) -> bool:
    """Run ``coro`` now, until it ends or first waits; if it waits, the rest goes to
    ``continue_in`` (given a coroutine function, as anyio's ``start_soon`` is). Returns
    whether it ended at once. Its errors are logged, never raised to the caller."""
    try:
        waits_for = coro.send(None)
    except StopIteration:
        return True
    except Exception:
        log.exception("handler failed")
        return True

    async def rest() -> None:
        try:
            await _Resume(coro, waits_for)
        except Exception:
            log.exception("handler failed")

    continue_in(rest)
    return False


class _Resume:
    """Awaiting this continues a coroutine that was started by hand and is waiting for
    ``waits_for``: the awaiting task waits for that first, then drives the coroutine."""

    __slots__ = ("_coro", "_waits_for")

    def __init__(self, coro: Coroutine[Any, Any, None], waits_for: Any) -> None:
        self._coro, self._waits_for = coro, waits_for

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waits_for = self._coro, self._waits_for
        while True:
            try:
                sent = yield waits_for
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation too: the coroutine decides
                try:
                    waits_for = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waits_for = coro.send(sent)
                except StopIteration:
                    return


def write_now(nc: NATS) -> None:
    """Write what ``nc`` has buffered to its socket now, instead of on the flusher's next
    turn (which then finds nothing to do). Only on a TCP connection (TLS or not) that is
    up; a WebSocket one, or one that reconnects, keeps nats-py's way."""
    pending = getattr(nc, "_pending", None)
    transport = getattr(nc, "_transport", None)
    if pending and type(transport) is TcpTransport and nc.is_connected:
        transport.writelines(pending)  # type: ignore[no-untyped-call]  # nats-py leaves it untyped
        nc._pending = []
        nc._pending_data_size = 0


def written_at_once(nc: NATS) -> WrittenAtOnce:
    """Publishes inside only append to ``nc``'s buffer; on leaving, it is written to the
    socket at once (:func:`write_now`). Each nats-py publish otherwise makes a future and
    wakes the flusher task for a turn of the loop of its own, which then finds nothing to
    write. Holds off the flusher by keeping its queue non-empty (nats-py kicks it only when
    empty): a future the flusher completes, should it run meanwhile (a write that waits)."""
    return WrittenAtOnce(nc)


class WrittenAtOnce:
    """What :func:`written_at_once` returns: a class rather than a generator, since it runs
    on every command, in processes that wake cold for it, where each call costs."""

    __slots__ = ("_held", "_items", "_nc", "_queue")

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        queue = getattr(nc, "_flush_queue", None)
        items = getattr(queue, "_queue", None)
        if not isinstance(queue, asyncio.Queue) or not isinstance(items, deque) or items:
            queue = items = None  # the flusher is due already (or nats-py differs): let it be
        self._queue: asyncio.Queue[asyncio.Future[None]] | None = queue
        self._items: deque[asyncio.Future[None]] | None = items
        self._held: asyncio.Future[None] | None = None

    def __enter__(self) -> None:
        held = self._held = asyncio.get_running_loop().create_future()
        if self._items is not None:
            self._items.append(held)  # not put(): that would wake the flusher

    def __exit__(self, *exc: object) -> None:
        nc, held, items, queue = self._nc, self._held, self._items, self._queue
        assert held is not None
        if items is not None and held in items:  # else the flusher took it (and wrote)
            items.remove(held)
        write_now(nc)
        if queue is not None and nc._pending_data_size > 0:
            # not written (reconnecting, or a WebSocket): the flusher's turn, as nats-py's
            queue.put_nowait(
                held if not held.done() else asyncio.get_running_loop().create_future()
            )


async def read_now(nc: NATS) -> bool:
    """From now on, parse the bytes ``nc`` receives as they arrive, in its protocol's
    ``data_received``, instead of waking nats-py's reader task for them. Called by that task
    as it starts (bus/connection.py), once per connection: a reconnect calls it again. What
    the stream reader already holds is parsed here first, so the order never changes.

    Returns whether it took over; False on a WebSocket or an unexpected nats-py or asyncio,
    which keep nats-py's way. The reader task then stays in its read until the connection
    ends (end of file or an error), and handles that end as before."""
    transport = getattr(nc, "_transport", None)
    if type(transport) is not TcpTransport:
        return False
    reader = getattr(transport, "_io_reader", None)
    if not isinstance(reader, asyncio.StreamReader) or reader.at_eof():
        return False
    socket_transport = getattr(reader, "_transport", None)
    if not isinstance(socket_transport, asyncio.Transport):
        return False
    protocol = socket_transport.get_protocol()
    buffered = getattr(reader, "_buffer", None)
    parser = getattr(nc, "_ps", None)
    if (
        not isinstance(protocol, asyncio.StreamReaderProtocol)
        or getattr(protocol, "_stream_reader", None) is not reader
        or not isinstance(buffered, bytearray)
        or not callable(getattr(parser, "parse", None))
    ):
        return False
    direct = _ReadNow(nc, parser, socket_transport, getattr(reader, "_limit", 2**16))
    # from here on nothing reaches the stream reader: what it holds is parsed first, and
    # what arrives meanwhile waits in the backlog behind it
    direct.busy = True
    protocol.data_received = direct.data_received  # type: ignore[method-assign]
    earlier = bytes(buffered)
    buffered.clear()
    resume = getattr(reader, "_maybe_resume_transport", None)
    if callable(resume):
        resume()
    if earlier:
        direct.backlog.appendleft(earlier)
    await direct.drain()
    return True


class _ReadNow:
    """One connection's bytes, parsed as they arrive. Parsing is sequential: should the
    parser wait (rarely: a JetStream consumer being reset, an error callback), what arrives
    meanwhile is kept, in order, and the socket paused once that grows past the stream
    reader's own limit, until a task has parsed it."""

    __slots__ = ("backlog", "busy", "limit", "nc", "parser", "paused", "tasks", "transport")

    def __init__(self, nc: NATS, parser: Any, transport: asyncio.Transport, limit: int) -> None:
        self.nc, self.parser, self.transport = nc, parser, transport
        self.limit = 2 * limit
        self.backlog: deque[bytes] = deque()
        self.busy = False
        self.paused = False
        #: the tasks it started, kept until done (the loop holds only weak references)
        self.tasks: set[asyncio.Task[None]] = set()

    def data_received(self, data: bytes) -> None:
        """The protocol's callback: parse ``data`` now, or queue it behind a parse that waits."""
        self.backlog.append(data)
        if not self.busy:
            self.busy = True
            # parsed at once; only a parse that waits goes on in a task (and the bytes
            # arriving meanwhile with it)
            run_now(self.drain(), lambda rest: self._start(rest()))
        elif not self.paused and sum(map(len, self.backlog)) > self.limit:
            self.paused = True
            self.transport.pause_reading()

    async def drain(self) -> None:
        """Parse what waits, in order; then parse as bytes arrive again."""
        try:
            while self.backlog:
                await self.parser.parse(self.backlog.popleft())
        except Exception as exc:
            self.backlog.clear()
            self.failed(exc)
        finally:
            self.busy = False
            if self.paused:
                self.paused = False
                self.transport.resume_reading()

    def failed(self, exc: Exception) -> None:
        """What nats-py's reader does with a parse that failed: the connection is treated
        as broken (and reconnects)."""
        if not isinstance(exc, errors.ProtocolError | OSError):
            log.error("nats: encountered error", error=str(exc) or type(exc).__name__)
        cause = errors.ProtocolError() if isinstance(exc, errors.ProtocolError) else exc
        self._start(self.nc._process_op_err(cause))

    def _start(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
