"""Whether a rank's *program* advances, and how far the ranks of a run are apart.

A rank's agent heartbeats from its own thread, so a program frozen in a collective that
never returns, or in a data loader that hangs, still heartbeats: it is not ``stale``. Its
program reports progress instead (a new step in ``ctl.sync(step)``, an item of
``ctl.steps(...)``, ``ctl.tick()``), and a rank is ``stalled`` when the last report is older
than its threshold::

    stall_after = max(factor * recent seconds per step, floor)

Pure functions over the fields an agent publishes (``progress_ts``, ``stall_after`` in the
registry record and in each state message): every reader (``runctl ls``, ``GET /runs``, the
page, ``runctl watch``) decides the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from runctl.bus.errors import BadRequest

__all__ = [
    "DEFAULT_STALL_FACTOR",
    "DEFAULT_STALL_FLOOR",
    "Spread",
    "StallPolicy",
    "is_stalled",
    "step_spread",
]

#: stalled after this many of the rank's recent step intervals without progress ...
DEFAULT_STALL_FACTOR: Final = 10.0
#: ... and never before this many seconds
DEFAULT_STALL_FLOOR: Final = 60.0
#: a rank is listed as lagging when it is at least this many steps behind the leader
LAG_MIN_STEPS: Final = 1


@dataclass(frozen=True, slots=True)
class StallPolicy:
    """When a rank counts as stalled: no progress for ``max(factor * interval, floor)``
    seconds, ``interval`` being its recent seconds per step (``floor`` alone until it is
    known). ``enabled=False`` never reports a stall."""

    factor: float = DEFAULT_STALL_FACTOR
    floor: float = DEFAULT_STALL_FLOOR
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("factor", "floor"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise BadRequest(f"stall {name} must be a finite number >= 0, not {value!r}")
        if self.enabled and self.floor <= 0:
            raise BadRequest("stall floor must be > 0 seconds (or disable stall detection)")

    def threshold(self, interval: float | None) -> float:
        """Seconds without progress after which the rank is stalled (0: never)."""
        if not self.enabled:
            return 0.0
        if interval is None or not math.isfinite(interval) or interval <= 0:
            return self.floor
        return max(self.factor * interval, self.floor)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StallPolicy:
        """``RUNCTL_STALL_FACTOR`` and ``RUNCTL_STALL_AFTER`` (the floor, seconds; ``off``
        disables), so a whole job is configured from its environment."""
        env = os.environ if env is None else env
        factor_text = env.get("RUNCTL_STALL_FACTOR", "").strip()
        floor_text = env.get("RUNCTL_STALL_AFTER", "").strip()
        if floor_text.lower() in ("off", "0", "false", "no", "never"):
            return cls(
                factor=_number(factor_text, "RUNCTL_STALL_FACTOR", DEFAULT_STALL_FACTOR),
                enabled=False,
            )
        return cls(
            factor=_number(factor_text, "RUNCTL_STALL_FACTOR", DEFAULT_STALL_FACTOR),
            floor=_number(floor_text, "RUNCTL_STALL_AFTER", DEFAULT_STALL_FLOOR),
        )


def _number(text: str, name: str, default: float) -> float:
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name} must be a number of seconds, not {text[:20]!r}") from None
    return value


def is_stalled(progress_ts: float | None, stall_after: float, now: float) -> bool:
    """True when the last progress (``progress_ts``, wall-clock seconds) is older than
    ``stall_after`` seconds at ``now``. A rank that never reported progress, or whose
    threshold is 0 (detection off), is never stalled."""
    if progress_ts is None or stall_after <= 0:
        return False
    return now - progress_ts > stall_after


@dataclass(frozen=True, slots=True)
class Spread:
    """How far apart the ranks of a run are, by their last reported step."""

    #: the highest step any rank reported (None: no rank reported one)
    leader: int | None
    #: the lowest
    slowest: int | None
    #: rank -> steps behind the leader, for each rank at least one step behind, most first
    behind: dict[str, int]

    @property
    def steps(self) -> int:
        """leader - slowest (0 when all are at the same step or none reported)."""
        if self.leader is None or self.slowest is None:
            return 0
        return self.leader - self.slowest

    def describe(self, limit: int = 3) -> str:
        """One line: ``rank 13 is 40 steps behind (step 960, leader at 1000)``."""
        if not self.behind or self.leader is None:
            return "every rank is at the same step" if self.leader is not None else ""
        parts = []
        for rank, lag in list(self.behind.items())[:limit]:
            parts.append(f"rank {rank} is {lag} step{'s' if lag != 1 else ''} behind")
        more = len(self.behind) - limit
        tail = f" (and {more} more)" if more > 0 else ""
        return f"{', '.join(parts)}{tail}; leader at step {self.leader}"

    def to_json(self) -> dict[str, object]:
        """The spread as a JSON object (``GET /runs/{run}``, ``runctl ls --json``)."""
        return {
            "leader": self.leader,
            "slowest": self.slowest,
            "spread": self.steps,
            "behind": self.behind,
            "summary": self.describe(),
        }


def step_spread(steps: Iterable[tuple[str, int | None]]) -> Spread:
    """The spread of ``(rank, step)`` pairs; ranks without a step are left out (pass
    only the ranks that are running: an exited rank's last step is no lag)."""
    known = [(rank, step) for rank, step in steps if step is not None]
    if not known:
        return Spread(None, None, {})
    leader = max(step for _, step in known)
    slowest = min(step for _, step in known)
    lagging = sorted(
        ((rank, leader - step) for rank, step in known if leader - step >= LAG_MIN_STEPS),
        key=lambda item: (-item[1], _rank_order(item[0])),
    )
    return Spread(leader, slowest, dict(lagging))


def _rank_order(rank: str) -> tuple[int, str]:
    return (int(rank), "") if rank.isdigit() else (1 << 62, rank)
