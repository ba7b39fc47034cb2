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

__all__ = ["Pending", "PendingChanges", "StepClock"]


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

    def add(self, at_step: int, change_id: str, command: Any) -> Pending:
        """Keep ``command`` until ``at_step``."""
        item = Pending(at_step, next(self._seq), change_id, command)
        with self._lock:
            self._items.append(item)
            self._items.sort()
        return item

    def cancel(self, change_id: str) -> int:
        """Drop the changes with ``change_id``; returns how many there were."""
        with self._lock:
            before = len(self._items)
            self._items = [p for p in self._items if p.change_id != change_id]
            return before - len(self._items)

    def pop_due(self, step: int) -> list[Pending]:
        """Take the changes due at ``step``, in the order they apply."""
        # Lock-free fast path: sync() is called every step and is usually a no-op.
        items = self._items
        if not items or items[0].at_step > step:
            return []
        with self._lock:
            due = [p for p in self._items if p.at_step <= step]
            self._items = [p for p in self._items if p.at_step > step]
        return due

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


class StepClock:
    """The last step the program reported and a smoothed rate (steps per second)."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.rate = 0.0
        self._last: tuple[int, float] | None = None

    def observe(self, step: int, now: float | None = None) -> None:
        """The program reached ``step`` (at ``now``, monotonic seconds)."""
        now = time.monotonic() if now is None else now
        last = self._last
        if last is not None and step > last[0] and now > last[1]:
            instant = (step - last[0]) / (now - last[1])
            self.rate = instant if self.rate == 0.0 else 0.8 * self.rate + 0.2 * instant
        self._last = (step, now)
        self.step = step
