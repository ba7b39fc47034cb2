"""Messages handled as they are read and writes sent at once (bus/direct.py), against a
real nats-server: no turn of a subscription's task or of the flusher in between, the
order of a subscription's messages kept, a failing handler no harm to the connection, and
a coroutine that has to wait finished in a task of the caller's choosing. A runctl
connection parses its bytes in the socket's callback, again after each reconnect, and
keeps their order when a parse has to wait."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from runctl.bus.connection import close_quietly, connect
from runctl.bus.direct import _ReadNow, run_now, subscribe_now, write_now, written_at_once
from runctl.bus.server import NatsServer


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.anyio
async def test_messages_are_handled_in_the_reader_in_order(nc: NATS) -> None:
    seen: list[tuple[bytes, asyncio.Task[object] | None]] = []
    done = anyio.Event()

    def handler(msg: Msg) -> None:
        seen.append((msg.data, asyncio.current_task()))
        if len(seen) == 50:
            done.set()

    await subscribe_now(nc, "direct.order", handler)
    for i in range(50):
        await nc.publish("direct.order", str(i).encode())
    with anyio.fail_after(10):
        await done.wait()
    assert [data for data, _ in seen] == [str(i).encode() for i in range(50)]
    # called by nats-py's reader, not by a task of the subscription's own
    assert {task for _, task in seen} == {nc._reading_task}


@pytest.mark.anyio
async def test_a_failing_handler_costs_its_message_only(nc: NATS) -> None:
    handled: list[bytes] = []
    done = anyio.Event()

    def handler(msg: Msg) -> None:
        if msg.data == b"bad":
            raise ValueError("boom")
        handled.append(msg.data)
        if msg.data == b"last":
            done.set()

    await subscribe_now(nc, "direct.fail", handler)
    for data in (b"first", b"bad", b"last"):
        await nc.publish("direct.fail", data)
    with anyio.fail_after(10):
        await done.wait()
    assert handled == [b"first", b"last"]
    assert nc.is_connected
    # the connection still answers requests
    await nc.flush(timeout=5)


@pytest.mark.anyio
async def test_a_direct_subscription_unsubscribes_and_drains(nc: NATS) -> None:
    got: list[bytes] = []
    first, after = anyio.Event(), anyio.Event()

    def on_unsub(msg: Msg) -> None:
        got.append(msg.data)
        first.set()

    sub = await subscribe_now(nc, "direct.unsub", on_unsub)
    await subscribe_now(nc, "direct.after", lambda msg: after.set())
    await nc.publish("direct.unsub", b"one")
    # a flush does not order the connection's own messages before its PONG (the server
    # may deliver them after it): wait for the message itself
    with anyio.fail_after(10):
        await first.wait()
    await sub.unsubscribe()
    await nc.publish("direct.unsub", b"two")
    # published after "two" to this same connection: once it is here, "two" would be too
    await nc.publish("direct.after", b"")
    with anyio.fail_after(10):
        await after.wait()
    with anyio.fail_after(5):
        await nc.drain()
    assert got == [b"one"]


@contextlib.asynccontextmanager
async def listening(nats_url: str, subject: str) -> AsyncIterator[Subscription]:
    """A subscription to ``subject`` on a connection of its own, ready to receive."""
    other = await nats.connect(nats_url)
    try:
        sub = await other.subscribe(subject)
        await other.flush(timeout=5)
        yield sub
    finally:
        await other.close()


@pytest.mark.anyio
async def test_write_now_sends_without_the_flusher(nc: NATS, nats_url: str) -> None:
    async with listening(nats_url, "direct.write") as sub:
        await nc.publish("direct.write", b"x")
        assert nc._pending  # nats-py leaves it to its flusher's next turn
        write_now(nc)
        assert not nc._pending and nc.pending_data_size == 0
        msg = await sub.next_msg(timeout=5)
        assert msg.data == b"x"


@pytest.mark.anyio
async def test_publishes_written_at_once_wake_no_flusher(nc: NATS, nats_url: str) -> None:
    async with listening(nats_url, "direct.once") as sub:
        await anyio.sleep(0.05)  # the flusher's turns after the setup are over
        queue = nc._flush_queue
        assert queue is not None and queue.empty()
        with written_at_once(nc):
            await nc.publish("direct.once", b"1")
            await nc.publish("direct.once", b"2")
            assert len(nc._pending) == 2  # buffered, and nothing asked the flusher to run
        assert queue.empty() and not nc._pending and nc.pending_data_size == 0
        got = [(await sub.next_msg(timeout=5)).data for _ in range(2)]
        assert got == [b"1", b"2"]


@pytest.mark.anyio
async def test_publishes_written_at_once_while_disconnected_wait_for_the_flusher(
    nats_server: NatsServer,
) -> None:
    lost = anyio.Event()

    async def disconnected() -> None:
        lost.set()

    nc = await connect(nats_server.url, disconnected_cb=disconnected)
    try:
        nats_server.kill()
        with anyio.fail_after(10):
            await lost.wait()
        assert not nc.is_connected
        with written_at_once(nc):
            await nc.publish("direct.later", b"x")
        # not written (no socket): kept for the reconnect, and the flusher asked to run
        assert nc._pending and nc._flush_queue is not None and not nc._flush_queue.empty()
    finally:
        await close_quietly(nc)


@pytest.mark.anyio
async def test_a_coroutine_runs_now_until_it_waits_then_in_the_given_task() -> None:
    trace: list[str] = []

    async def quick() -> None:
        trace.append("quick")

    later: list[object] = []
    assert run_now(quick(), later.append) is True
    assert trace == ["quick"] and later == []  # ran in this very call, no task

    gate = asyncio.get_running_loop().create_future()

    async def waits() -> None:
        trace.append("before")
        value = await gate
        trace.append(f"after {value}")

    async with anyio.create_task_group() as tasks:
        assert run_now(waits(), tasks.start_soon) is False
        assert trace[-1] == "before"  # ran up to its wait in this call
        await anyio.sleep(0.01)
        assert trace[-1] == "before"
        gate.set_result(7)
    assert trace == ["quick", "before", "after 7"]


@pytest.mark.anyio
async def test_the_rest_of_a_coroutine_can_be_cancelled_and_fail_without_raising() -> None:
    cleaned = anyio.Event()

    async def waits_forever() -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            cleaned.set()

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise ValueError("logged, not raised")

    async with anyio.create_task_group() as tasks:
        assert run_now(waits_forever(), tasks.start_soon) is False
        assert run_now(fails_later(), tasks.start_soon) is False
        await anyio.sleep(0.01)
        tasks.cancel_scope.cancel()
    assert cleaned.is_set()


async def _handled_in_the_socket_callback(nc: NATS, subject: str, count: int) -> None:
    """``count`` messages published on ``nc`` come back in order, each handled with no
    task running: in the protocol's callback, not in nats-py's reader task."""
    seen: list[tuple[bytes, asyncio.Task[object] | None]] = []
    done = anyio.Event()

    def handler(msg: Msg) -> None:
        seen.append((msg.data, asyncio.current_task()))
        if len(seen) == count:
            done.set()

    sub = await subscribe_now(nc, subject, handler)
    for i in range(count):
        await nc.publish(subject, str(i).encode())
    with anyio.fail_after(10):
        await done.wait()
    await sub.unsubscribe()
    assert [data for data, _ in seen] == [str(i).encode() for i in range(count)]
    assert {task for _, task in seen} == {None}


@pytest.mark.anyio
async def test_a_runctl_connection_parses_bytes_in_the_socket_callback(nats_url: str) -> None:
    nc = await connect(nats_url)
    try:
        await _handled_in_the_socket_callback(nc, "direct.read", 500)

        async def answer(msg: Msg) -> None:
            await msg.respond(b"pong:" + msg.data)

        await nc.subscribe("direct.ask", cb=answer)  # nats-py's own way beside it
        with anyio.fail_after(10):
            reply = await nc.request("direct.ask", b"1", timeout=5)
        assert reply.data == b"pong:1"
    finally:
        await close_quietly(nc)


@pytest.mark.anyio
async def test_after_a_reconnect_the_new_connection_is_read_the_same_way(nats_url: str) -> None:
    reconnected = anyio.Event()

    async def on_reconnected() -> None:
        reconnected.set()

    nc = await connect(nats_url, on_reconnected=on_reconnected)
    try:
        await _handled_in_the_socket_callback(nc, "direct.before", 20)
        nc._transport._io_writer.transport.abort()  # type: ignore[union-attr]  # the socket dies
        with anyio.fail_after(10):
            await reconnected.wait()
        await _handled_in_the_socket_callback(nc, "direct.after", 20)
    finally:
        await close_quietly(nc)


class _Socket(asyncio.Transport):
    """Counts what a backlog asks of the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


class _WaitingParser:
    """Parses by recording; the chunk ``b"wait"`` waits until ``go`` is set."""

    def __init__(self) -> None:
        self.parsed: list[bytes] = []
        self.go = asyncio.Event()

    async def parse(self, data: bytes) -> None:
        if data == b"wait":
            await self.go.wait()
        self.parsed.append(data)


@pytest.mark.anyio
async def test_bytes_that_arrive_while_a_parse_waits_are_parsed_after_it_in_order(
    nc: NATS,
) -> None:
    parser, socket = _WaitingParser(), _Socket()
    reads = _ReadNow(nc, parser, socket, limit=4)
    reads.data_received(b"a")
    reads.data_received(b"wait")
    chunks = [b"b", b"c", b"dddddddd"]  # past twice the limit: the socket pauses
    for chunk in chunks:
        reads.data_received(chunk)
    assert parser.parsed == [b"a"]
    assert socket.calls == ["pause"]
    parser.go.set()
    with anyio.fail_after(5):
        await asyncio.wait(set(reads.tasks))  # the task that finishes the waiting parse
    assert not reads.busy
    assert parser.parsed == [b"a", b"wait", *chunks]
    assert socket.calls == ["pause", "resume"]
    reads.data_received(b"e")  # parsed at once again
    assert parser.parsed[-1] == b"e"
