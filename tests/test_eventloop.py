"""The agent's event loop (agent/eventloop.py): non-blocking polls answered without the
kernel, a bounded number of times in a row, and nothing lost."""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Iterator

import pytest

from runctl.agent.eventloop import SKIP_POLLS, FewerPollsSelector, agent_loop


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


@pytest.fixture
def waiting(pair: tuple[socket.socket, socket.socket]) -> Iterator[FewerPollsSelector]:
    """A selector watching a socket with a command waiting to be read."""
    ours, theirs = pair
    with FewerPollsSelector() as selector:
        selector.register(ours, selectors.EVENT_READ)
        theirs.send(b"command")
        yield selector


def test_a_readable_socket_is_reported_at_most_skip_polls_iterations_late(
    waiting: FewerPollsSelector, pair: tuple[socket.socket, socket.socket]
) -> None:
    late = [waiting.select(0) for _ in range(SKIP_POLLS)]
    assert late == [[]] * SKIP_POLLS
    (key, events), *_ = waiting.select(0)  # the next one asks the kernel
    assert key.fileobj is pair[0] and events & selectors.EVENT_READ
    assert waiting.select(0) == []  # and the count starts again


def test_a_poll_that_may_wait_always_asks_the_kernel(waiting: FewerPollsSelector) -> None:
    assert waiting.select(0) == []  # skipped
    assert waiting.select(0.001)  # may wait: asked, and it is there
    assert waiting.select(None)
    assert waiting.select(0) == []  # the count restarted after the real polls


def test_the_agent_loop_runs_socket_io_with_work_always_ready(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """A task that never stops yielding keeps the loop's polls non-blocking: the socket is
    still read, within a few iterations."""
    ours, theirs = pair
    ours.setblocking(False)
    loop = agent_loop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)

        spins = 0

        async def main() -> bytes:
            busy = True

            async def spin() -> None:
                nonlocal spins
                while busy:
                    spins += 1
                    await asyncio.sleep(0)

            spinner = asyncio.ensure_future(spin())
            loop.call_later(0.02, theirs.send, b"hello")  # arrives while the spinner spins
            data = await asyncio.wait_for(loop.sock_recv(ours, 100), 10)
            busy = False
            await spinner
            return data

        assert loop.run_until_complete(main()) == b"hello"
        assert spins > SKIP_POLLS  # work was ready all along: the polls were non-blocking
    finally:
        loop.close()
