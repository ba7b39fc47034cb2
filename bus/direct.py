"""Fewer turns of the event loop per message: handle it as it is read, write at once.

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
- :func:`write_now` hands what the connection buffered to the socket at once.

All three lean on nats-py's internals (a subscription's queue and pending-bytes count,
the client's write buffer and transport); where those differ, they fall back to nats-py's
own way: the subscription's task, the flusher.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.aio.transport import TcpTransport

__all__ = ["run_now", "subscribe_now", "write_now"]

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
