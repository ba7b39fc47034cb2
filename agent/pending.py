"""Changes deferred to a step boundary, and the program's step clock.

The rule that makes synchronised changes deterministic across ranks:

- The client picks ``at_step = max(step reported by every rank) + margin`` and sends the
  change with that ``at_step`` to all ranks.
- Each rank validates it at once (so a bad change is refused by every rank before any
  applies), then keeps it pending.
- The program calls ``ctl.sync(step)`` at each step boundary. A pending change is applied at
  the first boundary with ``step >= at_step``, in ``(at_step, arrival)`` order, on the
  program's own thread, before ``sync()`` returns. Every rank calls ``sync`` with the same
  step numbers, so every rank applies the same changes at the same step.
- A rank that is already past ``at_step`` when the change arrives refuses it (``too_late``);
  the client then cancels the change on every rank, so no rank applies it. Retry with a
  larger margin.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NEVER", "RATE_WINDOW", "Pending", "PendingChanges", "StepClock"]

#: a step no program reaches: ``PendingChanges.next_due`` when nothing is kept
NEVER = 1 << 62


@dataclass(order=True, slots=True)
class Pending:
    """One change kept for its step: applied at the first ``sync(step)`` with
    ``step >= at_step``, in (at_step, arrival) order."""

    at_step: int
    seq: int
    change_id: str = field(compare=False)
    command: Any = field(compare=False)
    received: float = field(compare=False, default_factory=time.time)


class PendingChanges:
    """Thread-safe: filled by the agent's thread, drained by the program's ``sync()``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[Pending] = []
        self._seq = itertools.count()
        #: the earliest step a kept change is due at (NEVER: none): what ``sync`` compares
        #: its step with at every step, without a call or a lock
        self.next_due = NEVER

    def add(self, at_step: int, change_id: str, command: Any) -> Pending:
        """Keep ``command`` until ``at_step``."""
        item = Pending(at_step, next(self._seq), change_id, command)
        with self._lock:
            self._items.append(item)
            self._items.sort()
            self._set_next_due()
        return item

    def cancel(self, change_id: str) -> int:
        """Drop the changes with ``change_id``; returns how many there were."""
        with self._lock:
            before = len(self._items)
            self._items = [p for p in self._items if p.change_id != change_id]
            self._set_next_due()
            return before - len(self._items)

    def pop_due(self, step: int) -> list[Pending]:
        """Take the changes due at ``step``, in the order they apply (``sync`` first
        compares ``step`` with :attr:`next_due`, without the lock)."""
        with self._lock:
            due = [p for p in self._items if p.at_step <= step]
            self._items = [p for p in self._items if p.at_step > step]
            self._set_next_due()
        return due

    def _set_next_due(self) -> None:
        # under the lock; one store, so the program's thread sees the old or the new value
        self.next_due = self._items[0].at_step if self._items else NEVER

    def __len__(self) -> int:
        return len(self._items)

    def snapshot(self) -> list[dict[str, Any]]:
        """The kept changes, as ``ping`` reports them."""
        with self._lock:
            return [
                {
                    "at_step": p.at_step,
                    "change_id": p.change_id,
                    "kind": type(p.command).__name__.lower(),
                    "synced": bool(getattr(p.command, "synced", False)),
                }
                for p in self._items
            ]


#: the least time a kept rate is taken over: the agent reads it at any moment (a ping right
#: after a heartbeat), and a rate over a few microseconds says nothing
RATE_WINDOW = 0.2


class StepClock:
    """The last step the program reported, when, and a smoothed rate (steps per second).

    The program's thread only stores marks: ``sync`` runs at every step, and in a program
    that slept between steps every object it touches costs a cache miss or a page walk. The
    agent's thread turns the marks into a rate when it reads :attr:`rate`.
    """

    __slots__ = ("_base", "_rate", "at", "first", "step")

    def __init__(self) -> None:
        #: the last step reported (None before the first), and when (monotonic seconds)
        self.step: int | None = None
        self.at = 0.0
        #: the first step reported, and when: an estimate as soon as a second step came
        self.first: tuple[int, float] | None = None
        self._base: tuple[int, float] | None = None
        self._rate = 0.0

    def observe(self, step: int, now: float | None = None) -> None:
        """The program reached ``step`` (at ``now``, monotonic seconds).

        ``Agent.sync`` stores the same marks inline, in the same order: ``first``, then
        ``step``, then ``at``."""
        now = time.monotonic() if now is None else now
        if self.first is None:
            self.first = (step, now)
        self.step = step
        self.at = now

    @property
    def rate(self) -> float:
        """Steps per second, smoothed; read by the agent's thread only."""
        # ``at`` before ``step``: the program's thread writes them the other way round, so
        # a racing step makes at most one step too many over at least RATE_WINDOW
        at, step = self.at, self.step
        base = self._base or self.first
        if step is None or base is None:
            return self._rate
        if step < base[0]:  # the program counts from the start again
            self._base = (step, at)
        elif step > base[0] and at > base[1]:
            instant = (step - base[0]) / (at - base[1])
            if at - base[1] < RATE_WINDOW:
                # too short to keep (two steps a microsecond apart, then a slow one, would
                # stick for many reads); before the first rate it is the best there is
                return self._rate or instant
            self._rate = instant if not self._rate else 0.8 * self._rate + 0.2 * instant
            self._base = (step, at)
        return self._rate
