"""What a command's answer looks like to a caller: :class:`Result` (one rank) and
:class:`Gathered` (every rank of ``all``: applied, rejected, no answer), with the per-rank
outcome view :meth:`Gathered.to_json` that the gateway, the CLI and the console show.

Plain data, no I/O: :class:`runctl.bus.client.Client` returns them (and re-exports them),
:mod:`runctl.bus.changes` builds them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runctl.bus.errors import RunctlError
from runctl.bus.subjects import rank_key

__all__ = ["Gathered", "Result"]


@dataclass(frozen=True, slots=True)
class Result:
    """One rank's answer: its state version and ``value`` (the state, the value at a path,
    or what the verb returns), whether it ``changed``, and where it came from."""

    rank: str
    version: int
    value: Any
    changed: bool = False
    #: "agent" (answered by the rank) or "registry" (its last published state)
    source: str = "agent"
    liveness: str = "alive"
    age: float = 0.0
    #: a write's id in the change journal
    change_id: str = ""
    #: the change journal holds this rank's record of it (None: the rank kept no record)
    journaled: bool | None = None
    #: store acknowledgements the rank sent to the writer's inbox (bus/acks.py)
    acks: int = field(default=0, repr=False, compare=False)

    def journaled_as(self, journaled: bool) -> Result:
        """This result with ``journaled`` set: a plain constructor call, several times
        cheaper than ``dataclasses.replace``, which a broadcast pays once per rank on its
        caller's path."""
        return Result(
            self.rank,
            self.version,
            self.value,
            self.changed,
            self.source,
            self.liveness,
            self.age,
            self.change_id,
            journaled,
            self.acks,
        )


@dataclass(slots=True)
class Gathered:
    """Every rank's answer to one command on ``all``: ``results`` (applied), ``errors``
    (rejected, each rank's own error) and ``missing`` (known alive, did not answer in
    time). :meth:`to_json` is the per-rank outcome view the gateway and the CLI print."""

    run: str
    verb: str
    results: dict[str, Result] = field(default_factory=dict)
    errors: dict[str, RunctlError] = field(default_factory=dict)
    #: ranks the registry knows alive that did not answer before the deadline
    missing: list[str] = field(default_factory=list)
    #: ranks the registry showed stale (no heartbeat for three intervals: killed, frozen or
    #: cut off) that did not answer in the short grace they get either; not ``missing``
    stale: list[str] = field(default_factory=list)
    #: for a synchronised change: the step at which every rank applies it
    at_step: int | None = None
    change_id: str = ""
    #: a synchronised change taken back on every rank because not every rank took it
    cancelled: bool = False
    #: a synchronised or scheduled change: the journal holds it (ranks that restart before
    #: its step apply it there); None when not asked
    journaled: bool | None = None
    #: a checkpointing stop: each rank's ``checkpoint`` report (what it stored, or why not)
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ranks that took a checkpointing stop but reported no checkpoint before the deadline
    no_checkpoint: list[str] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[str]:
        """The ranks that answered (applied or rejected), in rank order."""
        return sorted([*self.results, *self.errors], key=rank_key)

    def to_json(self) -> dict[str, Any]:
        """``{"run", "verb", "acknowledged", "missing", "stale", "ranks": {rank: outcome}}``;
        each outcome is ``applied`` (or ``ok``, ``pending``, ``cancelled``), ``rejected`` with
        the error's code, message and detail, or ``no_answer`` (with ``"status": "stale"``
        for a stale rank)."""
        ranks: dict[str, Any] = {}
        for rank, res in self.results.items():
            ranks[rank] = {
                "outcome": self._outcome(res),
                "version": res.version,
                "changed": res.changed,
                "value": res.value,
                **({"status": res.liveness} if res.source == "registry" else {}),
                **({"journaled": res.journaled} if res.journaled is not None else {}),
            }
        for rank, err in self.errors.items():
            entry: dict[str, Any] = {"outcome": "rejected", "error": err.code, "message": str(err)}
            if detail := getattr(err, "errors", None):
                entry["detail"] = detail
            ranks[rank] = entry
        for rank in self.missing:
            ranks[rank] = {"outcome": "no_answer"}
        for rank in self.stale:
            ranks[rank] = {"outcome": "no_answer", "status": "stale"}
        for rank, report in self.checkpoints.items():
            ranks.setdefault(rank, {})["checkpoint"] = report
        for rank in self.no_checkpoint:
            ranks.setdefault(rank, {})["checkpoint"] = {"ok": False, "error": "no report in time"}
        sync = (
            {
                "at_step": self.at_step,
                "change_id": self.change_id,
                "cancelled": self.cancelled,
                **({"journaled": self.journaled} if self.journaled is not None else {}),
            }
            if self.at_step is not None
            else {"change_id": self.change_id}
            if self.change_id
            else {}
        )
        return {
            "run": self.run,
            "verb": self.verb,
            **sync,
            "acknowledged": self.acknowledged,
            "missing": sorted(self.missing, key=rank_key),
            "stale": sorted(self.stale, key=rank_key),
            "ranks": dict(sorted(ranks.items(), key=lambda kv: rank_key(kv[0]))),
        }

    def _outcome(self, res: Result) -> str:
        if self.verb not in _WRITES:
            return "ok"
        if isinstance(res.value, dict) and res.value.get("pending"):
            return "cancelled" if self.cancelled else "pending"
        return "applied"


_WRITES = frozenset({"set", "patch", "reset", "assign", "stop"})
