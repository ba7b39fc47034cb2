"""The change journal's records: what each change was, who sent it, what it did on each rank.

Pure: no network. The stream and its reads are in :mod:`runctl.bus.journalstore`; replay,
history, undo and schedules are computed from these records by :mod:`runctl.bus.journalplan`.

One record per change and rank, on ``runctl.<run>.<rank>.journal.<change id>`` (stream
``RUNCTL_JOURNAL``), written by the rank that handled the change:

- ``verb`` ``set``, ``patch``, ``reset``, ``assign`` (several paths at once: what an undo
  sends), ``stop``, ``cancel``; ``request`` is the command as it was sent;
- ``outcome`` ``applied`` (``diff``: every field it changed, before and after, and the
  state version before -> after), ``unchanged``, or ``rejected`` (``error``, ``message``
  and pydantic's ``errors``);
- ``step``: the step the rank was at (the ``at_step`` it applied at, for a synchronised
  or scheduled change).

A rank that starts in a run with journaled changes replays them and writes one ``replay``
record: what it applied and what it skipped, and why.

Run-wide records, on ``runctl.<run>.all.journal.<id>``, are written by the operator's
client: ``schedule`` (a change to apply at ``at_step`` on every rank: restored by ranks that
restart before that step) and ``unschedule`` (its cancellation, ``of`` names it).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

from runctl.bus import messages as m
from runctl.bus.messages import Author

__all__ = [
    "CHANGE_VERBS",
    "ELIDE_OVER",
    "FieldChange",
    "Outcome",
    "Record",
    "Skipped",
    "decode_record",
    "elide",
    "encode_record",
    "field_diff",
    "request_json",
    "request_paths",
]

#: verbs whose records change the state (replayed at start, undoable)
CHANGE_VERBS: Final = frozenset({"set", "patch", "reset", "assign"})
#: a diff value whose JSON is longer than this is stored as a summary (no undo for it)
ELIDE_OVER: Final = 16 * 1024

Outcome = Literal["applied", "unchanged", "rejected", "scheduled", "cancelled", "replayed"]


class FieldChange(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One field a change changed: its dotted path, the value before and after."""

    path: str
    before: Any = None
    after: Any = None
    #: the values were too large to keep (their size is in ``before``/``after``)
    elided: bool = False


class Skipped(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A journaled change a replay did not apply, and why."""

    id: str
    verb: str
    reason: str
    errors: list[dict[str, Any]] = msgspec.field(default_factory=list)


class Record(msgspec.Struct, tag="change/1", tag_field="t", kw_only=True, omit_defaults=True):
    """One journal record (see the module docs)."""

    id: str
    run: str
    #: the rank that handled the change, or ``all`` for a run-wide record
    rank: str
    #: where the change was sent: a rank, or ``all``
    target: str
    verb: str
    ts: float
    by: Author = msgspec.field(default_factory=Author)
    #: the command as sent (JSON), without its ``by`` and ids
    request: Any = None
    outcome: str = "applied"
    #: the rank's step when it handled the change (None: the program never said)
    step: int | None = None
    #: the step a synchronised or scheduled change applies at
    at_step: int | None = None
    version_before: int = 0
    version_after: int = 0
    diff: list[FieldChange] = msgspec.field(default_factory=list)
    #: a rejection: error code, message, pydantic's errors
    error: str = ""
    message: str = ""
    errors: list[dict[str, Any]] = msgspec.field(default_factory=list)
    #: an undo: the change it takes back
    undo_of: str = ""
    #: a cancel / unschedule: the change it cancels; how many pending changes it dropped
    of: str = ""
    cancelled: int = 0
    #: a replay: the changes it applied, and those it skipped
    replayed: list[str] = msgspec.field(default_factory=list)
    skipped: list[Skipped] = msgspec.field(default_factory=list)
    #: a run-wide record of a stop its writer journaled: the ranks that acknowledged it
    acknowledged: list[str] = msgspec.field(default_factory=list)
    #: the process that wrote it
    host: str = ""
    pid: int = 0


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Record)


def encode_record(record: Record) -> bytes:
    """A journal record as its wire JSON (``change/1``)."""
    return _encoder.encode(record)


def decode_record(data: bytes) -> Record:
    """A journal record from the stream."""
    return _decoder.decode(data)


# --- field-level diff ----------------------------------------------------------------------


def field_diff(before: Any, after: Any, prefix: str = "") -> list[FieldChange]:
    """Every leaf that differs between two JSON documents, as dotted paths.

    Objects (models and dicts) are compared key by key; an object whose keys changed (a dict
    key added or removed) is reported whole, so that setting ``path`` back to ``before``
    undoes it exactly. Lists of the same length are compared item by item (``layers.0.w``);
    otherwise whole.
    """
    out: list[FieldChange] = []
    _diff(before, after, prefix, out)
    return out


def _diff(before: Any, after: Any, path: str, out: list[FieldChange]) -> None:
    if type(before) is dict and type(after) is dict:
        if before.keys() != after.keys() and path:
            if before != after:
                out.append(FieldChange(path=path, before=before, after=after))
            return
        for key in after:
            if key in before:
                _diff(before[key], after[key], f"{path}.{key}" if path else key, out)
            else:  # top level only: a field that appeared (an extra)
                out.append(FieldChange(path=f"{path}.{key}" if path else key, after=after[key]))
        for key in before:
            if key not in after:
                out.append(FieldChange(path=f"{path}.{key}" if path else key, before=before[key]))
        return
    if type(before) is list and type(after) is list and len(before) == len(after) and path:
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            _diff(b, a, f"{path}.{i}", out)
        return
    if type(before) is not type(after) or before != after:
        out.append(FieldChange(path=path, before=before, after=after))


def elide(diff: list[FieldChange], limit: int = ELIDE_OVER) -> list[FieldChange]:
    """The diff with every value whose JSON is over ``limit`` bytes replaced by a summary
    (a 100 MB tensor is not copied into the journal; such a change cannot be undone)."""
    out = []
    for change in diff:
        before, after = _encoder.encode(change.before), _encoder.encode(change.after)
        if len(before) <= limit and len(after) <= limit:
            out.append(change)
            continue
        out.append(
            FieldChange(
                path=change.path,
                before=_summary(change.before, len(before)),
                after=_summary(change.after, len(after)),
                elided=True,
            )
        )
    return out


def _summary(value: Any, size: int) -> str:
    return f"<{type(value).__name__} of {size} bytes>"


def request_paths(verb: str, request: Any) -> list[str] | None:
    """The dotted paths a request names (None: the whole state, e.g. a reset). The
    request's own tag wins over ``verb`` (a schedule holds a set, a patch ...)."""
    if not isinstance(request, dict):
        return None
    verb = str(request.get("t") or verb).split("/", 1)[0]
    if verb == "set":
        path = request.get("path") or ""
        return [path] if path else None
    if verb == "assign":
        return list((request.get("values") or {}).keys())
    if verb == "patch":
        base = request.get("path") or ""
        value = request.get("value")
        if not isinstance(value, dict):
            return [base] if base else None
        paths: list[str] = []
        _leaves(value, base, paths)
        return paths or ([base] if base else None)
    return None


def _leaves(value: dict[str, Any], prefix: str, out: list[str]) -> None:
    for key, item in value.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict) and item:
            _leaves(item, path, out)
        else:
            out.append(path)


def request_json(command: m.Command) -> dict[str, Any]:
    """The command as sent (with its tag ``t``: what a replay decodes), for the journal:
    without its id and author, which the record keeps apart."""
    data = msgspec.to_builtins(command)
    for key in ("by", "change_id", "id", "undo_of", "journaled_by_writer"):
        data.pop(key, None)
    for key in ("text", "texts", "synced"):  # typed text is journaled as the rank read it
        if not data.get(key):
            data.pop(key, None)
    if isinstance(command, m.Cancel):
        data["change_id"] = command.change_id
    return {k: v for k, v in data.items() if v is not None or k in ("value", "path")}
