"""How a step log is shown: records as listed, and what a restart would skip or run, and why.

A pure view over a :class:`runctl.bus.steps.records.RunLog`, shared by the agent
(``ctl.agent.steps.explain()``), ``runctl steps`` (``--explain``) and the HTTP gateway.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from runctl.bus.canonical import canonical_json
from runctl.bus.formatting import ago, format_duration
from runctl.bus.steps.records import (
    ForgetMarker,
    ForgottenStep,
    RunLog,
    StepRecord,
    scopes_for,
    step_label,
)
from runctl.bus.subjects import RUN_SCOPE

__all__ = [
    "Explained",
    "config_diff",
    "explain",
    "record_row",
]


# --- listing ---------------------------------------------------------------------------


def record_row(
    seq: int, rec: StepRecord, alive: Collection[tuple[str, int]] = ()
) -> dict[str, Any]:
    """A record as the CLI and HTTP list it. ``status`` is ``running`` for a started attempt
    whose process is alive, ``interrupted`` for one whose process is gone."""
    status: str = rec.status
    if status == "started":
        status = "running" if (rec.host, rec.pid) in alive else "interrupted"
    return {
        "step": step_label(rec.name, rec.key),
        "name": rec.name,
        "key": rec.key,
        "scope": rec.scope,
        "rank": rec.rank,
        "status": status,
        "config_hash": rec.config_hash,
        "config": rec.config,
        "result": rec.result,
        "error": rec.error,
        "started": rec.started,
        "ended": rec.ended,
        "duration": rec.duration,
        "attempt": rec.attempt,
        "host": rec.host,
        "pid": rec.pid,
        "seq": seq,
        # what the step keeps in the object store (its result and attached files)
        "stored_bytes": rec.stored_bytes,
        "files": {name: ref.size for name, ref in rec.files.items()},
        "stored_result": None
        if rec.artifact is None
        else {"codec": rec.artifact.codec, "size": rec.artifact.size},
    }


# --- explain ---------------------------------------------------------------------------

Action = Literal["skip", "run"]
Reason = Literal["done", "interrupted", "running", "failed", "config changed", "forced"]


@dataclass(frozen=True, slots=True)
class Explained:
    """What a restart would do with one logged step, and why."""

    scope: str
    name: str
    key: Any
    config_hash: str
    action: Action
    reason: Reason
    detail: str
    started: float = 0.0

    @property
    def step(self) -> str:
        """The step as listed: :func:`~runctl.bus.steps.records.step_label`."""
        return step_label(self.name, self.key)

    def to_json(self) -> dict[str, Any]:
        """The explanation as the CLI's ``--json`` and the HTTP gateway return it."""
        return {
            "step": self.step,
            "name": self.name,
            "key": self.key,
            "scope": self.scope,
            "config_hash": self.config_hash,
            "action": self.action,
            "reason": self.reason,
            "detail": self.detail,
        }


def explain(
    log: RunLog,
    *,
    rank: str | None = None,
    configs: Mapping[str, tuple[Any, str]] | None = None,
    alive: Collection[tuple[str, int]] = (),
    now: float | None = None,
) -> list[Explained]:
    """For every step in the log (of ``rank`` and the run scope, or of every scope): would a
    restart skip it or run it, and why.

    ``configs`` maps a step name to the (normalised config, hash) the restart will use;
    without it a restart is assumed to use each step's most recently started config.
    """
    now = time.time() if now is None else now
    scopes = scopes_for(rank)
    Item = tuple[str, str, str]  # (scope, name, key hash)
    groups: dict[Item, list[StepRecord]] = defaultdict(list)
    for _, rec in log.ordered(scopes):
        groups[(rec.scope, rec.name, rec.key_hash)].append(rec)
    gone: dict[Item, list[tuple[ForgetMarker, ForgottenStep]]] = defaultdict(list)
    out: list[Explained] = []
    for (scope, name), (_, marker) in sorted(log.markers.items()):
        if scopes is not None and scope not in scopes:
            continue
        for step in marker.forgotten:
            gone[(scope, name, step.key_hash)].append((marker, step))
        if marker.count > len(marker.forgotten):
            out.append(
                Explained(
                    scope,
                    name,
                    None,
                    "",
                    "run",
                    "forced",
                    f"forced: {marker.count - len(marker.forgotten)} more steps of {name!r} "
                    f"forgotten {ago(now - marker.ts)} ({marker.selector}) not listed",
                    marker.ts,
                )
            )
    for item in sorted(groups.keys() | gone.keys()):
        target = configs.get(item[1]) if configs else None
        out.append(
            _explain_item(
                item[0], item[1], groups.get(item, []), gone.get(item, []), target, alive, now
            )
        )
    out.sort(key=lambda e: e.started)
    return out


def _explain_item(
    scope: str,
    name: str,
    recs: list[StepRecord],
    gone: list[tuple[ForgetMarker, ForgottenStep]],
    target: tuple[Any, str] | None,
    alive: Collection[tuple[str, int]],
    now: float,
) -> Explained:
    latest = max(recs, key=lambda r: r.started) if recs else None
    last_gone = max(gone, key=lambda g: g[0].ts) if gone else None
    first = min([r.started for r in recs] + [m.ts for m, _ in gone])
    if target is not None:
        target_cfg, target_hash = target
    elif last_gone is not None and (latest is None or last_gone[0].ts > latest.started):
        # the last thing that happened to this item is a forget
        target_cfg, target_hash = _UNKNOWN, last_gone[1].config_hash
    else:
        assert latest is not None
        target_cfg, target_hash = latest.config, latest.config_hash
    cur = next((r for r in recs if r.config_hash == target_hash), None)
    others = [r for r in recs if r.config_hash != target_hash and r.status == "done"]
    changed = ""
    if others and target_cfg is not _UNKNOWN:
        prev = max(others, key=lambda r: r.started)
        changes = config_diff(prev.config, target_cfg)
        changed = f"config changed since it was done ({', '.join(changes) or 'same keys'})"
    if cur is None:
        forced = next(((m, g) for m, g in gone if g.config_hash == target_hash), None)
        if forced is not None:
            marker, step = forced
            by = f", by {marker.by}" if marker.by else ""
            return Explained(
                scope,
                name,
                step.key,
                target_hash,
                "run",
                "forced",
                f"forced: forgotten {ago(now - marker.ts)} ({marker.selector}{by})",
                first,
            )
        key = latest.key if latest is not None else (last_gone[1].key if last_gone else None)
        return Explained(
            scope,
            name,
            key,
            target_hash,
            "run",
            "config changed",
            changed or "config changed: not logged under this config",
            first,
        )
    who = f"rank {cur.rank}" if scope == RUN_SCOPE else f"pid {cur.pid} on {cur.host}"
    if cur.status == "done":
        took = f" in {format_duration(cur.duration)}" if cur.duration is not None else ""
        return Explained(
            scope,
            name,
            cur.key,
            cur.config_hash,
            "skip",
            "done",
            f"done {ago(now - (cur.ended or cur.started))} by {who}{took}",
            first,
        )
    reason: Reason
    if cur.status == "failed":
        reason = "failed"
        detail = f"failed {ago(now - (cur.ended or cur.started))}: {cur.error or 'error'}"
    elif (cur.host, cur.pid) in alive:
        reason, detail = "running", f"running now ({who}, attempt {cur.attempt})"
    else:
        reason = "interrupted"
        detail = (
            f"interrupted: started {ago(now - cur.started)} by {who} "
            f"(attempt {cur.attempt}), never completed"
        )
    if changed:
        detail += f"; {changed}"
    return Explained(scope, name, cur.key, cur.config_hash, "run", reason, detail, first)


_UNKNOWN: Final[Any] = object()


def config_diff(old: Any, new: Any, *, limit: int = 5) -> list[str]:
    """Short human list of what differs between two normalised configs (dotted paths)."""
    changes: list[str] = []
    _diff(old, new, "", changes)
    if len(changes) > limit:
        changes = [*changes[:limit], f"... {len(changes) - limit} more"]
    return changes


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old.keys() | new.keys()):
            sub = f"{path}.{k}" if path else k
            if k not in new:
                out.append(f"-{sub}")
            elif k not in old:
                out.append(f"+{sub}={_short(new[k])}")
            else:
                _diff(old[k], new[k], sub, out)
    elif old != new or type(old) is not type(new):
        out.append(f"{path or 'config'}: {_short(old)} -> {_short(new)}")


def _short(value: Any) -> str:
    text = canonical_json(value, ignore_prefix=None)
    return text if len(text) <= 40 else text[:37] + "..."
