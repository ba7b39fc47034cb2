"""The agent's event loop: the standard asyncio loop, polling its sockets less often.

Why: between two iterations that have work ready, asyncio polls its sockets without
waiting (``epoll_wait`` with a zero timeout). Each poll is a system call that gives the
GIL up and takes it back; in a program whose own threads hold the GIL, taking it back can
wait for the switch interval. A command crosses three or four such iterations in the agent
(nats-py's reader, the subscription's task, the flusher), and they found nothing new in
nearly every case: what they would find is the next message, which arrives later.

:class:`FewerPollsSelector` answers a non-blocking poll itself ("nothing new"), at most
:data:`SKIP_POLLS` times in a row; the next one, and every poll that may wait, goes to the
kernel. Readiness is level-triggered, so nothing is lost: a socket that became readable
meanwhile is reported by that poll, at most :data:`SKIP_POLLS` iterations later.
Measured (docs/performance.md, design item 10): fewer waits for the GIL in a program with
busy threads of its own; no CPU difference beyond the noise in one that sleeps.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Final

__all__ = ["SKIP_POLLS", "FewerPollsSelector", "agent_loop"]

#: non-blocking polls in a row answered without the system call
SKIP_POLLS: Final = 4


class FewerPollsSelector(selectors.DefaultSelector):
    """The platform's default selector, with at most :data:`SKIP_POLLS` non-blocking polls
    in a row answered without asking the kernel."""

    def __init__(self) -> None:
        super().__init__()
        self._skipped = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """As the standard selector's, but a non-blocking poll may return nothing at once."""
        if timeout is not None and timeout <= 0 and self._skipped < SKIP_POLLS:
            self._skipped += 1
            return []
        self._skipped = 0
        return super().select(timeout)


def agent_loop() -> asyncio.AbstractEventLoop:
    """A new event loop for an agent's thread: asyncio's, with a :class:`FewerPollsSelector`."""
    return asyncio.SelectorEventLoop(FewerPollsSelector())
