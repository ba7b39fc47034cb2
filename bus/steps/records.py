"""Step-log records and the step id: the pure bottom of the step log.

A step's identity is its name, the hash of its key and the hash of its config
(:mod:`runctl.bus.canonical`). :func:`step_id` is the one place that spells it; records live
in the JetStream stream ``RUNCTL_STEPS`` (:mod:`runctl.bus.steps.store`), one subject per
step identity::

    runctl.<run>.<scope>.done.<name>.<key hash>-<config hash>   a StepRecord ("step/1")
    runctl.<run>.<scope>.done.<name>._forgotten                the last ForgetMarker ("forget/1")

``scope`` is a rank, or ``run`` for run-wide steps. The stream keeps one message per subject,
so the log holds the latest record of every step: ``started`` (replaced by ``done`` or
``failed`` when the attempt ends; a ``started`` left behind means the attempt was
interrupted), ``done`` or ``failed``.

Nothing here does I/O: the functions take what was read from the stream and return data, so
the agent, the CLI and the HTTP gateway all read records the same way.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from runctl.bus.artifact_codec import ArtifactRef
from runctl.bus.canonical import canonical_json
from runctl.bus.subjects import RUN_SCOPE, check_token

__all__ = [
    "FORGOTTEN_ID",
    "LEFT_EARLY",
    "LEFT_WITH_SKIP",
    "Entry",
    "ForgetMarker",
    "ForgottenStep",
    "RunLog",
    "StepRecord",
    "StepStatus",
    "decode_entry",
    "encode_entry",
    "key_text",
    "record_id",
    "scopes_for",
    "step_id",
    "step_label",
]

#: the error of a step whose loop body did not complete: a ``break`` out of ``ctl.steps``
#: (a stop, max_steps) or an exception that left it
LEFT_EARLY: Final = "the loop body did not complete (break or exception)"
#: the error of a step the program left with ``skip()``: its choice, not a failure
LEFT_WITH_SKIP: Final = "left with skip()"

#: the record-id token of a step name's forget marker (ids are ``<hex>-<hex>``: no clash)
FORGOTTEN_ID: Final = "_forgotten"

StepStatus = Literal["started", "done", "failed"]
_TAG = {"tag_field": "t", "kw_only": True, "omit_defaults": False}


def record_id(key_hash: str, config_hash: str) -> str:
    """The last subject token of a step's record: ``<key hash>-<config hash>``."""
    return f"{key_hash}-{config_hash}"


def step_id(name: str, key_hash: str, config_hash: str) -> str:
    """A step's identity within a scope, ``<name>.<key hash>-<config hash>`` (the last two
    subject tokens of its record): how every done set is keyed.

    >>> step_id("epoch", "9e1c8a5c3f6d2b7a", "44136fa355b3678a")
    'epoch.9e1c8a5c3f6d2b7a-44136fa355b3678a'
    """
    return f"{name}.{key_hash}-{config_hash}"


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
    #: a result too large for the record, or not JSON, kept in the object store
    #: (``result`` is then None): see :mod:`runctl.bus.artifact_codec`
    artifact: ArtifactRef | None = None
    #: files attached to the step (``s.attach``), by file name
    files: dict[str, ArtifactRef] = msgspec.field(default_factory=dict)

    @property
    def stored_bytes(self) -> int:
        """Bytes this step keeps in the object store (its result and its files)."""
        total = self.artifact.size if self.artifact is not None else 0
        return total + sum(ref.size for ref in self.files.values())

    @property
    def id(self) -> str:
        """The record's subject token: :func:`record_id`."""
        return record_id(self.key_hash, self.config_hash)

    @property
    def sid(self) -> str:
        """Unique within a scope: :func:`step_id`."""
        return step_id(self.name, self.key_hash, self.config_hash)


class ForgottenStep(msgspec.Struct, kw_only=True):
    """One step a forget removed, as its marker lists it."""

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


#: what a step-log message holds
Entry = StepRecord | ForgetMarker
_encoder = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Entry)


def encode_entry(entry: Entry) -> bytes:
    """The JSON of a record or marker, as stored in the stream."""
    return _encoder.encode(entry)


def decode_entry(data: bytes) -> Entry:
    """A stored message back as a record or marker (msgspec errors on anything else)."""
    entry: Entry = _decoder.decode(data)
    return entry


# --- how keys and steps are shown ------------------------------------------------------


def key_text(key: Any) -> str:
    """How a key is shown and matched: strings as they are, anything else as canonical JSON."""
    if isinstance(key, str):
        return key
    return canonical_json(key, ignore_prefix=None)


def step_label(name: str, key: Any) -> str:
    """How a step is shown: ``epoch[5]``, or the bare name for a step without a key."""
    return name if key is None else f"{name}[{key_text(key)}]"


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
        """Hold ``entry`` (read at stream sequence ``seq``), replacing an older one."""
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


def scopes_for(rank: str | None) -> set[str] | None:
    """A rank sees its own log and the run-wide one; no rank means every scope."""
    if rank is None:
        return None
    if rank == RUN_SCOPE:
        return {RUN_SCOPE}
    return {check_token(rank, "rank"), RUN_SCOPE}
