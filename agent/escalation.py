"""How a stop reaches a rank besides its own stop command.

- A run-wide stop recorded before this rank started (the client writes it to the registry
  with a broadcast stop) applies to the rank too: :func:`recorded_stop`.
- ``mode="terminate"``: when the operator asked for it, a rank that does not stop by
  itself gets SIGTERM after ``grace`` seconds and SIGKILL after twice that:
  :func:`escalate`.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Final

import anyio
import structlog

from runctl.agent.publish import PUBLISH_TIMEOUT, Publisher
from runctl.bus import messages as m
from runctl.bus.registry import ANSWERING, Registry, liveness

__all__ = ["STOP_RECORD_WINDOW", "escalate", "recorded_stop"]

#: a recorded run-wide stop applies to a rank starting this long after it was issued,
#: or at any time while another rank of the run is still alive
STOP_RECORD_WINDOW: Final = 60.0


async def recorded_stop(registry: Registry | None, run: str, rank: str) -> m.RunRecord | None:
    """The run's recorded stop if it applies to ``rank``, starting now: issued less than
    :data:`STOP_RECORD_WINDOW` ago, or while another rank of the run is still alive.
    None when there is none, or the registry cannot say (bounded by PUBLISH_TIMEOUT)."""
    if registry is None:
        return None
    try:
        with anyio.fail_after(PUBLISH_TIMEOUT):
            record = await registry.get_run(run)
            if record is None or not record.stop_requested:
                return None
            if time.time() - record.ts < STOP_RECORD_WINDOW:
                return record
            others = any(
                r.rank != rank and liveness(r) in ANSWERING
                for r in await registry.records(run, states=False)
            )
    except Exception as exc:
        structlog.get_logger().debug(
            "run record unavailable", run=run, rank=rank, error=str(exc) or type(exc).__name__
        )
        return None
    return record if others else None


async def escalate(grace: float, *, pid: int, publisher: Publisher) -> None:
    """The operator asked for it: SIGTERM to ``pid`` after ``grace``, SIGKILL after twice
    that, each announced by an ``escalated`` event first. Cancelled when the agent closes,
    i.e. when the program stopped by itself."""
    log = publisher.log
    await anyio.sleep(grace)
    log.warning("rank did not stop in time: SIGTERM", grace=grace)
    await publisher.event("escalated", signal="SIGTERM", grace=grace)
    await publisher.flush()
    os.kill(pid, signal.SIGTERM)
    await anyio.sleep(grace)
    log.warning("rank ignored SIGTERM: SIGKILL", grace=grace)
    await publisher.event("escalated", signal="SIGKILL", grace=grace)
    await publisher.flush()
    os.kill(pid, signal.SIGKILL)
