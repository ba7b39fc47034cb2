"""Is the program advancing? Measured on the program's side, judged on the agent's.

The agent's heartbeat runs on its own thread, so it says nothing about the program: a loop
frozen in a collective still heartbeats. The program marks progress instead:
``ctl.sync(step)`` with a new step, each item of ``ctl.steps(...)``, or ``ctl.tick()``.
A mark is two attribute writes on the program's thread: no lock, no network, no hand-off
to another thread. The agent's thread samples the marks on its heartbeat, learns the
program's recent seconds per step, and decides (bus/progress.py) whether the rank is
``stalled``; it publishes a ``stalled`` event when that starts and ``recovered`` when the
program advances again.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Literal

from runctl.bus.progress import StallPolicy

__all__ = ["ExitErrors", "Progress", "ProgressMonitor", "Transition"]

#: weight of the newest sample in the smoothed seconds-per-step
SMOOTHING: Final = 0.3


class Progress:
    """The program's progress marks: a counter and the monotonic time of the last one.

    Written only by the program's thread(s), read by the agent's. A tick racing a sample
    may be counted in the next sample instead: harmless for a rate."""

    __slots__ = ("count", "last")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0

    def tick(self) -> None:
        """Mark progress (a step, a batch, an item): ~100 ns, never waits on anything."""
        self.count += 1
        self.last = time.monotonic()


Transition = Literal["stalled", "recovered"]


@dataclass(slots=True)
class _Sample:
    count: int
    last: float


class ProgressMonitor:
    """The agent's view of :class:`Progress`: recent interval, threshold, stalled or not.

    Only the agent's thread calls :meth:`sample` (on each heartbeat)."""

    def __init__(self, progress: Progress, policy: StallPolicy) -> None:
        self.progress = progress
        self.policy = policy
        #: smoothed seconds per progress mark (None until two marks were seen)
        self.interval: float | None = None
        self.stalled = False
        #: when the current stall started (monotonic), for the recovered event
        self.stalled_since: float | None = None
        self._seen: _Sample | None = None

    @property
    def stall_after(self) -> float:
        """Seconds without progress after which the rank is stalled (0: never)."""
        return self.policy.threshold(self.interval)

    def idle(self, now: float | None = None) -> float | None:
        """Seconds since the last mark (None: no mark yet)."""
        if self.progress.count == 0:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, now - self.progress.last)

    def progress_ts(self, now_wall: float | None = None, now: float | None = None) -> float | None:
        """The last mark as wall-clock time (what records and messages carry)."""
        idle = self.idle(now)
        if idle is None:
            return None
        return (time.time() if now_wall is None else now_wall) - idle

    def sample(self, now: float | None = None) -> Transition | None:
        """Read the marks; return ``"stalled"`` or ``"recovered"`` when that changed."""
        now = time.monotonic() if now is None else now
        count, last = self.progress.count, self.progress.last
        seen, self._seen = self._seen, _Sample(count, last)
        if count == 0:
            return None
        advanced = seen is None or count != seen.count
        if advanced and seen is not None and seen.count > 0 and not self.stalled:
            # the average interval over the marks since the last sample; a gap that was
            # itself a stall is not learnt (it would raise the threshold for the next one)
            marks = count - seen.count
            if marks > 0 and last > seen.last:
                sample = (last - seen.last) / marks
                self.interval = (
                    sample
                    if self.interval is None
                    else (1 - SMOOTHING) * self.interval + SMOOTHING * sample
                )
        threshold = self.stall_after
        idle = now - last
        if not self.stalled and threshold > 0 and idle > threshold:
            self.stalled = True
            self.stalled_since = last
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
