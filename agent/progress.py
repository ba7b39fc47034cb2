"""Is the program advancing? Measured on the program's side, judged on the agent's.

The agent's heartbeat runs on its own thread, so it says nothing about the program: a loop
frozen in a collective still heartbeats. The program marks progress instead:
``ctl.sync(step)`` with a new step, each item of ``ctl.steps(...)``, or ``ctl.tick()``.
A mark is one integer increment on the program's thread: no lock, no clock, no network,
no hand-off to another thread. The agent's thread samples the marks on its heartbeat, learns the
program's recent seconds per step, and decides (bus/progress.py) whether the rank is
``stalled``; it publishes a ``stalled`` event when that starts and ``recovered`` when the
program advances again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal

from runctl.bus.progress import StallPolicy

__all__ = ["ExitErrors", "Progress", "ProgressMonitor", "Transition"]

#: weight of the newest sample in the smoothed seconds-per-step
SMOOTHING: Final = 0.3


class Progress:
    """The program's progress marks: a counter, nothing else.

    Written only by the program's thread(s), read by the agent's, which notes the time at
    which it saw the counter move (so the program's thread does not even read a clock).
    A tick racing a sample is counted in the next sample: harmless for a rate."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def tick(self) -> None:
        """Mark progress (a step, a batch, an item): one integer increment, never waits."""
        self.count += 1


Transition = Literal["stalled", "recovered"]


class ProgressMonitor:
    """The agent's view of :class:`Progress`: recent interval, threshold, stalled or not.

    Only the agent's thread calls :meth:`sample` (on each heartbeat). Progress is timed
    at the sample that saw the counter move: late by at most one heartbeat, which the
    threshold (at least its floor) dwarfs."""

    def __init__(self, progress: Progress, policy: StallPolicy) -> None:
        self.progress = progress
        self.policy = policy
        #: smoothed seconds per progress mark (None until known)
        self.interval: float | None = None
        self.stalled = False
        #: the count at the last sample, and when (monotonic) a sample last saw it move
        self._count = 0
        self._moved: float | None = None

    @property
    def stall_after(self) -> float:
        """Seconds without progress after which the rank is stalled (0: never)."""
        return self.policy.threshold(self.interval)

    def idle(self, now: float | None = None) -> float | None:
        """Seconds since the program last advanced (None: it never did)."""
        if self._moved is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, now - self._moved)

    def progress_ts(self, now_wall: float | None = None, now: float | None = None) -> float | None:
        """When the program last advanced, as wall-clock time (what records carry)."""
        idle = self.idle(now)
        if idle is None:
            return None
        return (time.time() if now_wall is None else now_wall) - idle

    def sample(self, now: float | None = None) -> Transition | None:
        """Read the counter; return ``"stalled"`` or ``"recovered"`` when that changed."""
        now = time.monotonic() if now is None else now
        count = self.progress.count
        advanced = count != self._count
        if advanced:
            marks = count - self._count
            if self._moved is not None and marks > 0 and not self.stalled:
                # seconds per mark since the last sample that saw progress; a gap that was
                # itself a stall is not learnt (it would raise the threshold for the next)
                sample = (now - self._moved) / marks
                self.interval = (
                    sample
                    if self.interval is None
                    else (1 - SMOOTHING) * self.interval + SMOOTHING * sample
                )
            self._count, self._moved = count, now
        if self._moved is None:
            return None
        threshold = self.stall_after
        if not self.stalled and threshold > 0 and now - self._moved > threshold:
            self.stalled = True
            return "stalled"
        if self.stalled and advanced:
            self.stalled = False
            return "recovered"
        return None


class ExitErrors:
    """Remembers the uncaught exception that ends the program, so the rank's ``exited``
    event and record can say it ended with an error. Chains to the previous hooks."""

    def __init__(self) -> None:
        self.error = ""
        self._installed = False
        self._previous: Callable[..., object] | None = None

    def record(self, exc_type: type[BaseException] | None, exc: BaseException | None) -> None:
        """Note ``exc`` as the reason the program ends (the first one wins)."""
        if exc_type is None or self.error:
            return
        if issubclass(exc_type, SystemExit):
            code = getattr(exc, "code", 0)
            if code in (None, 0):
                return
            self.error = f"SystemExit: {code}"
            return
        if issubclass(exc_type, KeyboardInterrupt):
            self.error = "KeyboardInterrupt"
            return
        self.error = f"{exc_type.__name__}: {exc}"[:500]

    def install(self) -> None:
        """Wrap ``sys.excepthook`` (uncaught exceptions of the main thread run it before
        the interpreter's exit handlers, where the agent says goodbye)."""
        if self._installed:
            return
        self._installed = True
        previous = sys.excepthook

        def hook(
            exc_type: type[BaseException],
            exc: BaseException,
            tb: TracebackType | None,
        ) -> None:
            if threading.current_thread() is threading.main_thread():
                self.record(exc_type, exc)
            previous(exc_type, exc, tb)

        self._previous = previous
        sys.excepthook = hook
