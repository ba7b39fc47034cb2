"""Step-log records and the pure logic over them: listing, explaining, planning a forget.

Records live in the JetStream stream ``RUNCTL_STEPS`` (see :mod:`runctl.bus.steplog`), one subject
per step identity::

    runctl.<run>.<scope>.done.<name>.<key hash>-<config hash>   a StepRecord ("step/1")
    runctl.<run>.<scope>.done.<name>._forgotten                the last ForgetMarker ("forget/1")

``scope`` is a rank, or ``run`` for run-wide steps. The stream keeps one message per subject,
so the log holds the latest record of every step: ``started`` (replaced by ``done`` or
``failed`` when the attempt ends; a ``started`` left behind means the attempt was
interrupted), ``done`` or ``failed``.

Nothing here does I/O: the functions take what was read from the stream and return data, so
the agent, the CLI and the HTTP gateway all explain and forget the same way.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from runctl.bus.canonical import canonical_json
from runctl.bus.errors import BadRequest
from runctl.bus.subjects import RUN_SCOPE, check_token

__all__ = [
    "FORGOTTEN_ID",
    "ForgetMarker",
    "ForgottenStep",
    "RunLog",
    "Selector",
    "StepRecord",
    "StepStatus",
    "covered",
    "decode_entry",
    "encode_entry",
    "key_text",
    "parse_selector",
    "plan_forget",
    "record_row",
    "scopes_for",
    "step_label",
]

#: the record-id token of a step name's forget marker (ids are ``<hex>-<hex>``: no clash)
FORGOTTEN_ID: Final = "_forgotten"
#: forgotten steps listed in one marker (the count is always exact)
MAX_LISTED: Final = 1000

StepStatus = Literal["started", "done", "failed"]
_TAG = {"tag_field": "t", "kw_only": True, "omit_defaults": False}


class StepRecord(msgspec.Struct, tag="step/1", gc=False, **_TAG):
    """One attempt of one step. Its subject is ``...done.<name>.<key_hash>-<config_hash>``."""

    run: str
    #: the rank whose log it is in, or "run" for a run-wide step
    scope: str
    name: str
    key_hash: str
    config_hash: str
    status: StepStatus
    started: float
    key: Any = None
    config: Any = None
    result: Any = None
    error: str = ""
    ended: float | None = None
    duration: float | None = None
    attempt: int = 1
    #: the rank that ran it (differs from scope for run-wide steps)
    rank: str = ""
    host: str = ""
    pid: int = 0
    #: the Nats-Msg-Id of the completion (the server drops a retried duplicate)
    msg_id: str = ""

    @property
    def id(self) -> str:
        return f"{self.key_hash}-{self.config_hash}"

    @property
    def sid(self) -> str:
        """Unique within a scope: ``<name>.<id>`` (the last two subject tokens)."""
        return f"{self.name}.{self.key_hash}-{self.config_hash}"


class ForgottenStep(msgspec.Struct, kw_only=True):
    key: Any = None
    key_hash: str = ""
    config_hash: str = ""
    status: str = ""


class ForgetMarker(msgspec.Struct, tag="forget/1", **_TAG):
    """Written after a forget purged records of one (scope, step name).

    A record is *covered* when ``all`` is set, its id is in ``ids``, or it started at or
    after ``since``. Live agents drop covered entries they hold with a stream sequence up
    to ``upto_seq`` (anything newer completed after the forget and stands).
    """

    run: str
    scope: str
    name: str
    ts: float
    all: bool = False
    ids: list[str] = msgspec.field(default_factory=list)
    since: float | None = None
    upto_seq: int = 0
    #: what was asked, e.g. "epoch:5+", or "*" for the whole run
    selector: str = ""
    count: int = 0
    forgotten: list[ForgottenStep] = msgspec.field(default_factory=list)
    by: str = ""


Entry = StepRecord | ForgetMarker
_encoder = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode_entry(data: bytes) -> Entry:
    entry: Entry = _decoder.decode(data)
    return entry


# --- display --------------------------------------------------------------------------


def key_text(key: Any) -> str:
    """How a key is shown and matched: strings as they are, anything else as canonical JSON."""
    if isinstance(key, str):
        return key
    return canonical_json(key, ignore_prefix=None)


def step_label(name: str, key: Any) -> str:
    return name if key is None else f"{name}[{key_text(key)}]"


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
    }


# --- a run's log as read back ----------------------------------------------------------


@dataclass(slots=True)
class RunLog:
    """Everything the stream holds for one run (or one rank and the run scope)."""

    run: str
    #: (scope, sid) -> (stream sequence, record)
    records: dict[tuple[str, str], tuple[int, StepRecord]] = field(default_factory=dict)
    #: (scope, name) -> (stream sequence, marker)
    markers: dict[tuple[str, str], tuple[int, ForgetMarker]] = field(default_factory=dict)

    def add(self, seq: int, entry: Entry) -> None:
        if isinstance(entry, StepRecord):
            self.records[(entry.scope, entry.sid)] = (seq, entry)
        else:
            self.markers[(entry.scope, entry.name)] = (seq, entry)

    def ordered(self, scopes: Collection[str] | None = None) -> list[tuple[int, StepRecord]]:
        """Records in first-start order (ties: stream order)."""
        items = [
            (seq, rec)
            for (scope, _), (seq, rec) in self.records.items()
            if scopes is None or scope in scopes
        ]
        items.sort(key=lambda item: (item[1].started, item[0]))
        return items

    def scopes(self) -> set[str]:
        return {scope for scope, _ in self.records} | {scope for scope, _ in self.markers}


def scopes_for(rank: str | None) -> set[str] | None:
    """A rank sees its own log and the run-wide one; no rank means every scope."""
    if rank is None:
        return None
    if rank == RUN_SCOPE:
        return {RUN_SCOPE}
    return {check_token(rank, "rank"), RUN_SCOPE}


# --- forget ----------------------------------------------------------------------------


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
