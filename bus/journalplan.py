"""What the change journal means: replay, history, undo and schedules. Pure functions over
the records of one run (``(stream sequence, Record)`` pairs in stream order).

Replay (a rank starting in a run with journaled changes), :func:`plan_replay`:

- the changes this rank applied (set, patch, reset, assign), in the order it applied them;
- the changes sent to every rank (``all``) that this rank never handled (it was down, or
  it joins later), at their place in the run's order;
- changes scheduled at a step (``schedule`` records) that were not cancelled and that this
  rank has not applied yet: restored as pending, to apply at their step.

A run-wide stop is one record, written by whoever sent it, naming the ranks that
acknowledged it (the ranks write none: 64 or 1,000 journal writes would hold up the
replies); the history shows it as each of those ranks' outcome.

Stops and cancels are history, not replayed: a restarted run is meant to run (a run-wide
stop still stops ranks that start shortly after it, see docs/distributed.md). A change a
rank rejected is not replayed on that rank.

Why one module of this size: replay, history, undo and schedules are four readings of the
same ordered records, and they must agree on what a record means; all pure functions.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import msgspec

from runctl.bus.errors import BadRequest, Conflict, NotFound
from runctl.bus.journal import CHANGE_VERBS, Record, request_paths
from runctl.bus.subjects import ALL, rank_key

__all__ = [
    "Entry",
    "ReplayPlan",
    "UndoPlan",
    "entries",
    "find_change",
    "history",
    "parse_time",
    "plan_replay",
    "plan_undo",
    "schedules",
]

Records = list[tuple[int, Record]]
#: a change id given by hand may be shortened to this many characters (if unambiguous)
MIN_PREFIX: Final = 4
_APPLIED: Final = frozenset({"applied", "unchanged"})


# --- replay ------------------------------------------------------------------------------


@dataclass(slots=True)
class ReplayPlan:
    """What a starting rank applies (in order) and which schedules it restores."""

    changes: list[Record] = field(default_factory=list)
    schedules: list[Record] = field(default_factory=list)


def plan_replay(records: Records, rank: str) -> ReplayPlan:
    """The changes ``rank`` replays at start, and the schedules it restores (module docs)."""
    seen_here: set[str] = set()  # every change this rank handled, whatever the outcome
    cancelled: set[str] = set()
    scheduled: dict[str, tuple[int, Record]] = {}
    for seq, rec in records:
        if rec.rank == rank:
            seen_here.add(rec.id)
            if rec.verb == "cancel" and rec.of:
                cancelled.add(rec.of)
        elif rec.rank == ALL:
            if rec.verb == "schedule" and rec.target in (ALL, rank):
                scheduled.setdefault(rec.id, (seq, rec))
            elif rec.verb == "unschedule" and rec.of:
                cancelled.add(rec.of)
    in_effect = _in_effect(records)
    ordered: dict[str, tuple[int, Record]] = {}
    for seq, rec in records:
        if rec.verb not in CHANGE_VERBS or rec.outcome not in _APPLIED:
            continue
        if rec.rank == rank:
            ordered[rec.id] = (seq, rec)  # its own record wins, at its own place
        elif (
            rec.rank != ALL
            and rec.target == ALL
            and rec.id not in seen_here
            and rec.id not in scheduled
            and rec.id not in ordered
            # a run-wide change that was taken back is not for a rank that never had it,
            # even when the undo went to each rank on its own; nor is an undo of a change
            # such a rank never had (whether the change applies says it all)
            and in_effect(rec.id)
            and not (rec.undo_of and rec.undo_of not in seen_here)
        ):
            ordered[rec.id] = (seq, rec)
    plan = ReplayPlan(changes=[rec for _, rec in sorted(ordered.values(), key=lambda x: x[0])])
    plan.schedules = [
        rec
        for _, rec in sorted(scheduled.values(), key=lambda x: x[0])
        if rec.id not in cancelled and rec.id not in ordered
    ]
    return plan


def _in_effect(records: Records) -> Callable[[str], bool]:
    """Whether a change still holds: not taken back by an undo that itself still holds (an
    undo of an undo is a redo)."""
    undoers: dict[str, set[str]] = {}
    for _, rec in records:
        if rec.undo_of and rec.verb in CHANGE_VERBS and rec.outcome in _APPLIED:
            undoers.setdefault(rec.undo_of, set()).add(rec.id)

    @functools.cache
    def holds(change: str) -> bool:
        return not any(holds(undo) for undo in undoers.get(change, ()))

    return holds


# --- history -----------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One change as the history shows it: the request, who, when, and each rank's outcome."""

    id: str
    seq: int
    ts: float
    verb: str
    target: str
    by: Any
    request: Any = None
    at_step: int | None = None
    undo_of: str = ""
    of: str = ""
    #: rank -> its record
    ranks: dict[str, Record] = field(default_factory=dict)
    #: the run-wide record (a schedule or its cancellation), if any
    run_record: Record | None = None
    undone_by: list[str] = field(default_factory=list)
    #: replays that skipped this change: (rank, ts, reason, errors)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    cancelled_by: str = ""

    @property
    def status(self) -> str:
        """The change's outcome in one word: applied, partly applied, rejected, pending ..."""
        if self.verb == "replay":
            return "replayed"
        outcomes = {rec.outcome for rec in self.ranks.values()}
        if self.run_record is not None and self.run_record.verb == "schedule":
            if self.cancelled_by:
                return "cancelled"
            return "applied" if "applied" in outcomes else "scheduled"
        if not outcomes:
            return self.run_record.outcome if self.run_record is not None else "unknown"
        if outcomes <= {"applied", "unchanged"}:
            return "applied" if "applied" in outcomes else "unchanged"
        if outcomes == {"rejected"}:
            return "rejected"
        return "partly applied"

    @property
    def changes_state(self) -> bool:
        """A set, patch, reset or assign: sent as such, or scheduled at a step (synchronised
        or ``at_step``), whose ranks' records say what it was once it applied."""
        if self.verb in CHANGE_VERBS:
            return True
        return self.verb == "schedule" and any(r.verb in CHANGE_VERBS for r in self.ranks.values())

    def paths(self) -> list[str]:
        """The fields this change named or changed on any rank."""
        out: list[str] = []
        for rec in self.ranks.values():
            out.extend(c.path for c in rec.diff)
        named = request_paths(self.verb, self.request)
        out.extend(named or [])
        return sorted(set(out))

    def to_json(self) -> dict[str, Any]:
        """The entry as ``GET /runs/{run}/history`` and ``runctl history --json`` show it."""
        ranks: dict[str, Any] = {}
        for rank, rec in sorted(self.ranks.items(), key=lambda kv: rank_key(kv[0])):
            item: dict[str, Any] = {"outcome": rec.outcome, "ts": rec.ts, "step": rec.step}
            if rec.verb == "replay":
                item["replayed"] = rec.replayed
                item["skipped"] = msgspec.to_builtins(rec.skipped)
            elif rec.outcome == "rejected":
                item.update(error=rec.error, message=rec.message, errors=rec.errors)
            else:
                item.update(
                    version_before=rec.version_before,
                    version_after=rec.version_after,
                    diff=msgspec.to_builtins(rec.diff),
                )
                if rec.verb == "cancel":
                    item["cancelled"] = rec.cancelled
            ranks[rank] = item
        out: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "ts": self.ts,
            "verb": self.verb,
            "target": self.target,
            "status": self.status,
            "by": msgspec.to_builtins(self.by),
            "request": self.request,
            "at_step": self.at_step,
            "paths": self.paths(),
            "ranks": ranks,
        }
        for key, value in (
            ("undo_of", self.undo_of),
            ("of", self.of),
            ("undone_by", self.undone_by),
            ("replay_skipped", self.skipped),
            ("cancelled_by", self.cancelled_by),
        ):
            if value:
                out[key] = value
        return out


def entries(records: Records) -> list[Entry]:
    """One :class:`Entry` per change id, oldest first (by its first record)."""
    by_id: dict[str, Entry] = {}
    for seq, rec in records:
        entry = by_id.get(rec.id)
        if entry is None:
            entry = by_id[rec.id] = Entry(
                id=rec.id,
                seq=seq,
                ts=rec.ts,
                verb=rec.verb,
                target=rec.target,
                by=rec.by,
                request=rec.request,
                at_step=rec.at_step,
                undo_of=rec.undo_of,
                of=rec.of,
            )
        if rec.rank == ALL:
            entry.run_record = rec
            for rank in rec.acknowledged:  # a stop its writer journaled for every rank
                entry.ranks.setdefault(rank, msgspec.structs.replace(rec, rank=rank))
        else:
            entry.ranks[rec.rank] = rec
    for entry in by_id.values():
        if entry.undo_of and entry.undo_of in by_id:
            by_id[entry.undo_of].undone_by.append(entry.id)
        if entry.verb in ("unschedule", "cancel") and entry.of in by_id:
            target = by_id[entry.of]
            if target.run_record is not None or entry.verb == "unschedule":
                target.cancelled_by = target.cancelled_by or entry.id
        if entry.verb == "replay":
            for rank, rec in entry.ranks.items():
                for skip in rec.skipped:
                    if skip.id in by_id:
                        by_id[skip.id].skipped.append(
                            {
                                "rank": rank,
                                "ts": rec.ts,
                                "reason": skip.reason,
                                "errors": skip.errors,
                            }
                        )
    return sorted(by_id.values(), key=lambda e: e.seq)


def history(
    records: Records,
    *,
    rank: str | None = None,
    path: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
) -> list[Entry]:
    """The run's changes, newest first, filtered by rank (changes sent to it or to every
    rank, and what it did), by field path (a change that named or changed the path, a
    field inside it or one containing it) and by time (unix seconds, inclusive)."""
    out = []
    for entry in reversed(entries(records)):
        if rank is not None and not (
            rank in entry.ranks or (entry.target in (rank, ALL) and entry.verb != "replay")
        ):
            continue
        if path is not None and not any(_overlaps(path, p) for p in entry.paths()):
            continue
        if since is not None and entry.ts < since:
            continue
        if until is not None and entry.ts > until:
            continue
        out.append(entry)
        if limit is not None and len(out) >= limit:
            break
    return out


def find_change(records: Records, change: str) -> Entry:
    """The change whose id is ``change`` or starts with it (at least 4 characters)."""
    if len(change) < MIN_PREFIX:
        raise BadRequest(f"a change id needs at least {MIN_PREFIX} characters")
    matches = [e for e in entries(records) if e.id.startswith(change)]
    exact = [e for e in matches if e.id == change]
    if exact:
        return exact[0]
    if not matches:
        raise NotFound("", message=f"no change {change!r} in the journal of this run")
    if len(matches) > 1:
        shown = ", ".join(e.id[:12] for e in matches[:5])
        raise BadRequest(f"change {change!r} is ambiguous: {shown}")
    return matches[0]


# --- undo --------------------------------------------------------------------------------


@dataclass(slots=True)
class UndoPlan:
    """The inverse of a change: per rank, the before-values of exactly what it changed.
    ``broadcast``: every rank gets the same values, sent once to ``all`` (so a rank that
    starts later replays the undo too)."""

    change: Entry
    values: dict[str, dict[str, Any]]
    broadcast: bool
    #: later changes that touched the same fields (the undo was forced past them)
    conflicts: list[Entry] = field(default_factory=list)


def plan_undo(records: Records, change: str | None = None, *, force: bool = False) -> UndoPlan:
    """Plan the undo of ``change`` (default: the latest change that was applied and is not
    an undo or undone). Refuses (:class:`~runctl.bus.errors.Conflict`) when a later change
    touched the same fields, unless ``force``."""
    all_entries = entries(records)
    if change is None:
        candidates = [
            e
            for e in all_entries
            if e.changes_state
            and not e.undo_of
            and not e.undone_by
            and any(r.outcome == "applied" for r in e.ranks.values())
        ]
        if not candidates:
            raise NotFound("", message="nothing to undo: no applied change in the journal")
        target = candidates[-1]
    else:
        target = find_change(records, change)
    if target.status == "scheduled":
        raise BadRequest(
            f"change {target.id[:12]} is scheduled at step {target.at_step} and not applied "
            "yet: cancel it instead (runctl cancel RUN CHANGE)"
        )
    if not target.changes_state:
        raise BadRequest(f"a {target.verb} cannot be undone (only set, patch, reset, assign)")
    if target.undone_by and not force:
        raise Conflict(
            f"change {target.id[:12]} was already undone by {target.undone_by[-1][:12]}; "
            "undo that to redo it (or force)"
        )
    values: dict[str, dict[str, Any]] = {}
    for rank, rec in target.ranks.items():
        if rec.outcome != "applied" or not rec.diff:
            continue
        if any(c.elided for c in rec.diff):
            raise BadRequest(
                f"change {target.id[:12]} changed values too large to keep in the journal: "
                "it cannot be undone"
            )
        values[rank] = {c.path: c.before for c in rec.diff}
    if not values:
        raise BadRequest(f"change {target.id[:12]} changed nothing: there is nothing to undo")
    conflicts = _later_overlapping(all_entries, target, values)
    if conflicts and not force:
        first = conflicts[0]
        who = first.by.name if getattr(first.by, "name", "") else "someone"
        raise Conflict(
            f"change {target.id[:12]} was followed by {len(conflicts)} change(s) to the same "
            f"fields (latest: {first.id[:12]} by {who}, {', '.join(first.paths()[:3])}); "
            "undo it anyway with force"
        )
    same = len({msgspec.json.encode(v, order="sorted") for v in values.values()}) == 1
    return UndoPlan(target, values, broadcast=target.target == ALL and same, conflicts=conflicts)


def _later_overlapping(
    all_entries: list[Entry], target: Entry, values: dict[str, dict[str, Any]]
) -> list[Entry]:
    later = [e for e in all_entries if e.seq > target.seq and e.changes_state]
    # a later change taken back by a later undo cancels out: both are left out
    undone = {e.undo_of for e in later if e.undo_of}
    later = [e for e in later if e.id not in undone and e.undo_of not in {x.id for x in later}]
    out = []
    for entry in later:
        for rank, paths in values.items():
            rec = entry.ranks.get(rank)
            if rec is None or rec.outcome != "applied":
                continue
            if any(_overlaps(c.path, p) for c in rec.diff for p in paths):
                out.append(entry)
                break
    return list(reversed(out))


# --- schedules ---------------------------------------------------------------------------


def schedules(records: Records, *, include_done: bool = False) -> list[Entry]:
    """Changes scheduled at a step: pending ones (not cancelled, not applied everywhere),
    or all of them with ``include_done``; soonest step first."""
    out = []
    for entry in entries(records):
        if entry.run_record is None or entry.run_record.verb != "schedule":
            continue
        if not include_done and entry.status != "scheduled":
            continue
        out.append(entry)
    return sorted(out, key=lambda e: (e.at_step or 0, e.seq))


def _overlaps(a: str, b: str) -> bool:
    """One path is the other or inside it (``opt`` and ``opt.lr``); "" is everything."""
    if not a or not b or a == b:
        return True
    return a.startswith(b + ".") or b.startswith(a + ".")


def ranks_of(records: Iterable[tuple[int, Record]]) -> list[str]:
    """The ranks that wrote records, in rank order."""
    return sorted({rec.rank for _, rec in records if rec.rank != ALL}, key=rank_key)


_AGE: Final = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str | None, now: float | None = None) -> float | None:
    """Unix seconds from ``1795...``, ``2026-11-28T10:00:00`` (ISO 8601, local time unless
    it says otherwise) or an age ``15m`` (that long before ``now``)."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    if match := _AGE.fullmatch(text):
        return (time.time() if now is None else now) - float(match[1]) * _UNITS[match[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise BadRequest(
            f"{text[:40]!r} is not a time: use unix seconds, ISO 8601 or an age like 15m"
        ) from None
