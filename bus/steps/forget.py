"""Forgetting steps, planned: which records a selector covers and the markers that say so.

Pure: :func:`plan_forget` takes a run's log as read back (:class:`RunLog`) and returns the
:class:`ForgetMarker` s to write; :mod:`runctl.bus.steps.store` purges and writes them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from runctl.bus.errors import BadRequest
from runctl.bus.steps.records import ForgetMarker, ForgottenStep, RunLog, StepRecord, key_text
from runctl.bus.subjects import check_token

__all__ = ["MAX_LISTED", "Selector", "covered", "parse_selector", "plan_forget"]

#: forgotten steps listed in one marker (the count is always exact)
MAX_LISTED: Final = 1000


@dataclass(frozen=True, slots=True)
class Selector:
    """``name``, ``name:key`` and either with ``+`` (and every step started after it)."""

    name: str
    key: str | None = None
    successors: bool = False

    def __str__(self) -> str:
        return (
            f"{self.name}{'' if self.key is None else ':' + self.key}"
            f"{'+' if self.successors else ''}"
        )

    def matches(self, rec: StepRecord) -> bool:
        """Whether ``rec`` is the selected step (by key as listed, or by key hash)."""
        if rec.name != self.name:
            return False
        if self.key is None:
            return True
        return self.key in (key_text(rec.key), rec.key_hash)


def parse_selector(text: str) -> Selector:
    """``epoch``, ``epoch+``, ``epoch:5``, ``epoch:5+``, ``tokenize:shard-3`` (the key as
    listed by ``runctl steps``, or its key hash)."""
    raw = text.strip()
    successors = raw.endswith("+")
    if successors:
        raw = raw[:-1]
    name, sep, key = raw.partition(":")
    shown = text if len(text) <= 80 else text[:77] + "..."  # never echoed at size
    try:
        check_token(name, "step")
    except Exception as exc:
        raise BadRequest(f"invalid step selector {shown!r}: {exc}") from None
    if sep and not key:
        raise BadRequest(f"invalid step selector {shown!r}: empty key after ':'")
    return Selector(name, key if sep else None, successors)


def covered(marker: ForgetMarker, rec: StepRecord) -> bool:
    """Whether ``marker`` forgets ``rec``: same scope and name, and all of that step's
    records, or ``rec``'s id is listed, or it started at or after the marker's ``since``."""
    if rec.scope != marker.scope or rec.name != marker.name:
        return False
    if marker.all or rec.id in marker.ids:
        return True
    return marker.since is not None and rec.started >= marker.since


def plan_forget(
    log: RunLog,
    selector: Selector | None,
    *,
    scopes: Collection[str] | None = None,
    now: float | None = None,
    by: str = "",
) -> list[ForgetMarker]:
    """One marker per (scope, step name) to forget; ``selector=None`` forgets the whole run.

    "After" for ``name+`` means *started at or after the earliest start of the selected
    steps' current attempts* (for each matched item, its most recently started record),
    in every selected scope, so forgetting a run-wide ``prepare+`` also forgets the ranks'
    work that came after it. Records of the matched items under older configs are forgotten
    too. Start times are wall-clock times of the ranks' hosts.
    """
    now = time.time() if now is None else now
    records = [rec for _, rec in log.ordered(scopes)]
    since: float | None = None
    if selector is None:
        chosen = records
    else:
        targets = [rec for rec in records if selector.matches(rec)]
        if not targets:
            return []
        chosen = targets
        if selector.successors:
            # "after" counts from the step's current attempt (the latest config of each
            # matched item), not from records of configs it has since moved on from
            latest: dict[tuple[str, str], float] = {}
            for rec in targets:
                k = (rec.scope, rec.key_hash)
                latest[k] = max(latest.get(k, rec.started), rec.started)
            since = min(latest.values())
            chosen = [rec for rec in records if rec.started >= since or selector.matches(rec)]
    groups: dict[tuple[str, str], list[StepRecord]] = defaultdict(list)
    for rec in chosen:
        groups[(rec.scope, rec.name)].append(rec)
    totals: dict[tuple[str, str], int] = defaultdict(int)
    for rec in records:
        totals[(rec.scope, rec.name)] += 1
    markers = []
    label = "*" if selector is None else str(selector)
    for (scope, name), recs in groups.items():
        whole = len(recs) == totals[(scope, name)] and (
            selector is None or selector.key is None or since is not None
        )
        markers.append(
            ForgetMarker(
                run=log.run,
                scope=scope,
                name=name,
                ts=now,
                all=whole,
                ids=[] if whole else [r.id for r in recs if since is None or r.started < since],
                since=None if whole else since,
                selector=label,
                count=len(recs),
                by=by,
                forgotten=[
                    ForgottenStep(
                        key=rec.key,
                        key_hash=rec.key_hash,
                        config_hash=rec.config_hash,
                        status=rec.status,
                    )
                    for rec in recs[:MAX_LISTED]
                ],
            )
        )
    markers.sort(key=lambda mk: (mk.scope, mk.name))
    return markers
