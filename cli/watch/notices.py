"""What ``runctl watch`` tells people: one :class:`Notice` per condition that started.

Kinds::

    stalled         a rank's program stopped advancing (its agent still heartbeats)
    stale           a rank stopped heartbeating (killed, hung, cut off)
    recovered       a rank that was stalled or stale advances again
    exited          a rank's program ended with an uncaught exception
    stopped         a run stopped: none of its ranks is running any more
    unacknowledged  a stop or a synchronised change that some ranks did not take
    step_failed     a logged step (ctl.steps, ctl.once, @ctl.cached) failed
    condition       a --when condition became true on a run
    action          what a --then action did (which ranks acknowledged it)
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

__all__ = ["KINDS", "Notice", "NoticeKind"]

NoticeKind = Literal[
    "stalled",
    "stale",
    "recovered",
    "exited",
    "stopped",
    "unacknowledged",
    "step_failed",
    "condition",
    "action",
]
#: every kind, in the order above
KINDS: Final[tuple[NoticeKind, ...]] = get_args(NoticeKind)


@dataclass(frozen=True, slots=True)
class Notice:
    """One notification: what happened (``kind``), where, a one-line ``summary`` for
    people and ``data`` for programs."""

    kind: NoticeKind
    run: str
    rank: str | None
    summary: str
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)
    #: unique per notice: a receiver that sees it twice (a retry after a lost answer)
    #: can drop the copy
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self, watcher: str) -> dict[str, Any]:
        """The generic webhook's body (and the shell command's stdin)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "run": self.run,
            "rank": self.rank,
            "summary": self.summary,
            "ts": self.ts,
            "data": self.data,
            "watcher": watcher,
        }
