"""JSON views of what the bus answers, shared by the gateway's routes, the CLI's ``--json``
and the console: one shape each, built in one place.

* :func:`rank_summary`: one rank as ``/runs`` and ``runctl ls --json`` list it
* :func:`run_counts`: how many ranks of a run are alive, stale, exited
* :func:`write_outcome`: one rank's answer to a write (set, patch, reset, stop)
* :func:`by_rank`: a per-rank mapping in rank order

The answer to a write on every rank (per-rank outcomes) is :meth:`Gathered.to_json
<runctl.bus.client.Gathered.to_json>`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from runctl.bus.client import Result
from runctl.bus.registry import RankInfo
from runctl.bus.subjects import rank_key

__all__ = ["by_rank", "rank_summary", "run_counts", "write_outcome"]

T = TypeVar("T")


def rank_summary(info: RankInfo) -> dict[str, Any]:
    """One rank: liveness, version, heartbeat age, host, pid, step, pending changes."""
    r = info.record
    return {
        **info.summary(),
        "world_size": r.world_size,
        "heartbeat_interval": r.heartbeat_interval,
        "step": r.step,
        "step_rate": r.step_rate,
        "pending": r.pending,
        "replayed": r.replayed,
        "replay_skipped": r.replay_skipped,
    }


def run_counts(infos: Iterable[RankInfo]) -> dict[str, int]:
    """``{"alive": n, "stalled": n, "stale": n, "exited": n}`` over a run's ranks."""
    counts = {"alive": 0, "stalled": 0, "stale": 0, "exited": 0}
    for info in infos:
        counts[info.liveness] += 1
    return counts


def write_outcome(run: str, result: Result) -> dict[str, Any]:
    """One rank's answer to a write: applied, the new version and state.

    >>> write_outcome("exp1", Result("0", 3, {"lr": 0.1}, changed=True))["outcome"]
    'applied'
    """
    return {
        "run": run,
        "rank": result.rank,
        "outcome": "applied",
        "version": result.version,
        "changed": result.changed,
        "value": result.value,
        **({"change_id": result.change_id} if result.change_id else {}),
        **({"journaled": result.journaled} if result.journaled is not None else {}),
    }


def by_rank(mapping: Mapping[str, T]) -> list[tuple[str, T]]:
    """``mapping``'s items in rank order (0, 1, 2, ..., 10, then named ranks)."""
    return sorted(mapping.items(), key=lambda kv: rank_key(kv[0]))
