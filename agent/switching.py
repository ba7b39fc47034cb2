"""The process's GIL switch interval, lowered only where that costs the program nothing.

Why: the agent's thread sleeps in ``epoll_wait`` without the GIL. When a command arrives
while the program's thread runs pure Python, the agent's thread waits CPython's switch
interval (5 ms by default) before it gets the GIL, and again each time it gives the GIL up
on the way (every event-loop iteration, every socket call). A set in such a program cost
about three of those waits (docs/performance.md).

The interval only matters while some thread *waits* for the GIL. So:

- **At rest**, when at most one of the program's own threads ran in the last sample
  (the agent's heartbeat, about once a second), the interval is :data:`LOW`: the only
  thread that can then wait for the GIL is the agent's, and it wakes only for a command
  or its heartbeat. A program with a single busy thread pays nothing for it.
- **While it is low at rest** and the program has two or more threads of its own (idle
  ones that could start working: data loaders, a second compute thread), one agent of the
  process samples every :data:`QUICK_SAMPLE` seconds instead of at its heartbeat. Two busy
  threads switching every half millisecond instead of every 5 ms lose about 7 % of their
  throughput (5-11 % measured on a 2-core VM); when they start working after a quiet
  spell, they pay that until the next quick sample, not until the next heartbeat.
- **While a command is handled** (:meth:`Switching.command`), it is :data:`LOW` whatever
  the program does, and restored as soon as the last command in flight is done. A program
  with several busy threads of its own (data loaders, a second compute thread) keeps its
  own interval at rest, since there a low one would make its threads switch ten times more
  often; it pays the low interval only for the ~1 ms a command is handled.
- The program's own value wins: if it calls ``sys.setswitchinterval`` itself, runctl
  leaves the interval alone from then on, until every agent of the process has ended (a
  later ``control()`` starts afresh from the program's value). Everything is restored when
  the last agent of the process ends.

``RUNCTL_SWITCH_INTERVAL``: ``auto`` (default), ``off`` (never touch the interval), or a
number of seconds to use as the low value.

Which threads ran is read from ``/proc/self/task/<tid>/schedstat`` (Linux); elsewhere every
thread of the program counts as busy.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Final

import structlog

from runctl.bus.errors import BadRequest

__all__ = ["BUSY_SHARE", "LOW", "QUICK_SAMPLE", "Switching", "low_interval", "switching"]

#: the low interval: a waiting thread gets the GIL within half a millisecond
LOW: Final = 0.0005
#: a thread that was on a CPU this share of the time since the last sample is busy
BUSY_SHARE: Final = 0.05
#: seconds between samples while the interval is low at rest and the program has threads
#: that could start working (a wake-up of the agent's thread five times a second)
QUICK_SAMPLE: Final = 0.2
#: samples closer together than this are not taken: too short to tell busy from idle
MIN_SAMPLE: Final = 0.05
#: threads whose name starts with this are runctl's (agent loops, gateway, cluster)
OWN_PREFIX: Final = "runctl-"

log = structlog.get_logger()


def low_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The low interval ``RUNCTL_SWITCH_INTERVAL`` asks for; None: leave it alone."""
    text = (os.environ if env is None else env).get("RUNCTL_SWITCH_INTERVAL", "auto").strip()
    if text in ("", "auto"):
        return LOW
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:  # also refuses nan and inf
        raise BadRequest(
            f"RUNCTL_SWITCH_INTERVAL must be 'auto', 'off' or seconds in (0, 1], not {text[:20]!r}"
        )
    return value


def _cpu_ns(tid: int) -> int | None:
    """Nanoseconds thread ``tid`` of this process spent on a CPU (Linux), else None."""
    try:  # os-level calls: cheaper than pathlib's, and this runs five times a second
        fd = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
        try:
            return int(os.read(fd, 128).split()[0])
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return None


class Switching:
    """The process-wide switch-interval policy (one per process: :func:`switching`).

    Thread-safe: several agents in one process (each on its own loop thread, or on one)
    share it; commands are counted, not nested per agent.
    """

    def __init__(self, low: float | None = LOW) -> None:
        self.low = low
        self._lock = threading.Lock()
        self._agents: dict[int, int] = {}  # agent thread ident -> agents on it
        self._in_flight = 0
        self._quiet = False
        self._baseline: float | None = None  # the program's own interval
        self._ours: float | None = None  # what we last set (to notice the program's own)
        self._disowned = False
        self._cpu: dict[int, int] = {}
        self._sampled = 0.0
        #: the last sample asks for the next one before the heartbeat (see resample_in)
        self._watch = False
        self._sampler: object | None = None  # the agent that samples quickly, if one does
        self._command_window = _CommandWindow(self)

    @property
    def active(self) -> bool:
        """Whether runctl manages the interval now (an agent runs, not turned off, and the
        program did not set its own)."""
        return self.low is not None and bool(self._agents) and not self._disowned

    @property
    def attached(self) -> int:
        """How many agents of this process are serving now."""
        return sum(self._agents.values())

    @property
    def quiet(self) -> bool:
        """At most one of the program's threads ran at the last sample."""
        return self._quiet

    # --- agents ------------------------------------------------------------------------

    def attach(self) -> None:
        """An agent starts serving on the calling thread."""
        with self._lock:
            if not self._agents and not self._disowned:
                self._baseline = sys.getswitchinterval()  # the program's, as it is now
            ident = threading.get_ident()
            self._agents[ident] = self._agents.get(ident, 0) + 1

    def detach(self) -> None:
        """An agent on the calling thread ends; the last one restores the interval."""
        with self._lock:
            ident = threading.get_ident()
            left = self._agents.get(ident, 0) - 1
            if left > 0:
                self._agents[ident] = left
            else:
                self._agents.pop(ident, None)
            if not self._agents:
                self._restore()
                self._disowned = False  # a later agent starts afresh from the program's value

    # --- commands ----------------------------------------------------------------------

    def command(self) -> _CommandWindow:
        """Low interval while the body runs (a command being handled), then back."""
        return self._command_window

    # --- at rest -----------------------------------------------------------------------

    def resample_in(self, agent: object) -> float | None:
        """Seconds until ``agent`` should sample again, sooner than its heartbeat: while the
        interval is low at rest and the program has two or more threads of its own that
        could start working, or while some thread is too new to be judged (it counts as
        busy until measured). None: the heartbeat's sample is soon enough. One agent of the
        process samples quickly (the first to ask), so many agents in one process do not
        each wake five times a second."""
        with self._lock:
            if not (self.active and self._watch):
                return None
            if self._sampler is None:
                self._sampler = agent
            return QUICK_SAMPLE if self._sampler is agent else None

    def release_sampling(self, agent: object) -> None:
        """``agent`` ends: another agent of the process may sample quickly instead."""
        with self._lock:
            if self._sampler is agent:
                self._sampler = None

    def sample(self, now: float | None = None) -> bool:
        """Which of the program's threads ran since the last sample; sets the interval at
        rest (low when at most one did). Returns whether the program is quiet."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._sampled if self._sampled else 0.0
        if 0 < elapsed < MIN_SAMPLE:
            # too soon after the last (a heartbeat next to a quick sample): a thread that
            # was merely not scheduled in between would look idle
            return self._quiet
        busy = program = unmeasured = 0
        seen: dict[int, int] = {}
        for thread in threading.enumerate():
            tid = thread.native_id
            if tid is None or thread.ident in self._agents or thread.name.startswith(OWN_PREFIX):
                continue
            program += 1
            ns = _cpu_ns(tid)
            if ns is None:  # no per-thread CPU times here: count it as busy
                busy += 1
                continue
            seen[tid] = ns
            before = self._cpu.get(tid)
            if before is None or elapsed <= 0:
                busy += 1  # new threads count as busy until measured
                unmeasured += 1
            elif (ns - before) / 1e9 >= BUSY_SHARE * elapsed:
                busy += 1
        self._cpu, self._sampled = seen, now
        with self._lock:
            self._quiet = busy <= 1
            # low at rest with threads that could start working, or threads not yet judged
            self._watch = (self._quiet and program >= 2) or unmeasured > 0
            self._apply()
        return self._quiet

    # --- the one place that sets it ------------------------------------------------------

    def _apply(self) -> None:
        if not self.active or self._baseline is None or self.low is None:
            return
        current = sys.getswitchinterval()
        if self._ours is not None and current != self._ours:
            # the program set its own interval: it wins from now on
            self._disowned = True
            log.info("switch interval set by the program; runctl leaves it", interval=current)
            return
        want = self.low if (self._in_flight or self._quiet) else self._baseline
        if want != current:
            sys.setswitchinterval(want)
        self._ours = sys.getswitchinterval()

    def _restore(self) -> None:
        ours, baseline = self._ours, self._baseline
        if baseline is not None and not self._disowned and sys.getswitchinterval() == ours:
            sys.setswitchinterval(baseline)
        self._ours = None
        self._in_flight = 0
        self._quiet = False
        self._cpu.clear()
        self._sampled = 0.0
        self._watch = False
        self._sampler = None


_switching: Switching | None = None
_create = threading.Lock()


class _CommandWindow:
    """``with switching().command():``, a class rather than a generator: it runs on every
    command, in processes that wake cold for it, where each call costs."""

    __slots__ = ("_switching",)

    def __init__(self, switching: Switching) -> None:
        self._switching = switching

    def __enter__(self) -> None:
        switching = self._switching
        with switching._lock:
            switching._in_flight += 1
            switching._apply()

    def __exit__(self, *exc: object) -> None:
        switching = self._switching
        with switching._lock:
            switching._in_flight -= 1
            switching._apply()


def switching() -> Switching:
    """The process's :class:`Switching` (created on first use from the environment)."""
    global _switching
    with _create:
        if _switching is None:
            _switching = Switching(low_interval())
        return _switching
