"""close_quietly: closing a connection is cleanup. A lost server must not turn it into an
error of the caller's, while a cancellation asked of the caller still goes through."""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

import anyio
import pytest
from nats.aio.client import Client as NATS

from runctl.bus.connection import close_quietly, connect
from runctl.bus.server import NatsServer


class _Closing:
    """What nats-py's close() can surface on a dead socket (pure unit: no bus involved)."""

    def __init__(self, raises: BaseException | None = None, hang: bool = False) -> None:
        self.is_closed = False
        self.raises = raises
        self.hang = hang

    async def close(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)
        if self.raises is not None:
            raise self.raises
        self.is_closed = True


@pytest.mark.anyio
@pytest.mark.parametrize(
    "raised", [asyncio.CancelledError(), ConnectionResetError("Connection lost")]
)
async def test_what_nats_py_raises_from_its_own_internals_is_not_the_callers(
    raised: BaseException,
) -> None:
    await close_quietly(cast(NATS, _Closing(raises=raised)))


@pytest.mark.anyio
async def test_a_cancellation_asked_of_the_caller_still_propagates() -> None:
    closing = _Closing(hang=True)
    task = asyncio.create_task(close_quietly(cast(NATS, closing)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_an_already_closed_connection_is_left_alone() -> None:
    closing = _Closing(raises=RuntimeError("must not be called"))
    closing.is_closed = True
    await close_quietly(cast(NATS, closing))


@pytest.mark.anyio
@pytest.mark.parametrize("after", [0.0, 0.01, 0.3, 1.0])
async def test_closing_after_the_server_was_killed(nats_server: NatsServer, after: float) -> None:
    """A client with a watcher and a flush in flight, reconnecting to a killed server."""
    nc = await connect(nats_server.url)
    kv = await nc.jetstream().create_key_value(bucket="CLOSE")
    watcher = await kv.watchall()

    async def flushing() -> None:
        # nats-py drops a lost PONG, so this times out: the flush's own fate is nats-py's
        with contextlib.suppress(Exception):
            await nc.flush(timeout=1)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(flushing)
        nats_server.kill()
        await anyio.sleep(after)
        await close_quietly(nc)
    assert nc.is_closed
    del watcher
