"""Wire messages: msgspec Structs, JSON on the wire so ``nats sub 'runctl.>'`` is readable.

Every message is tagged with a versioned tag in the field ``t`` (``"get/1"``, ``"ok/1"``,
``"state/1"`` ...). New fields always get defaults, so an older reader ignores them and a
newer reader accepts older messages. A breaking change gets a new tag (``"get/2"``).

One union per subject kind, one Decoder for each, built once at import.

Why one module of this size: every message of the protocol is here, side by side with its
tag and its decoder, so that a change to one is seen next to the others it must stay
compatible with (docs/protocol.md describes the same set).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

import msgspec

from runctl.bus.errors import BadRequest

__all__ = [
    "COMMAND_TYPES",
    "DEFERRABLE",
    "MAX_GRACE",
    "WRITES",
    "Assign",
    "Author",
    "Cancel",
    "Command",
    "Err",
    "Event",
    "Get",
    "Grace",
    "Ok",
    "Patch",
    "Ping",
    "RankRecord",
    "RankRecordHead",
    "Reply",
    "Reset",
    "RunRecord",
    "Schema",
    "Set",
    "StateMsg",
    "Stop",
    "StopMode",
    "check_grace",
    "decode_command",
    "decode_event",
    "decode_record",
    "decode_record_head",
    "decode_reply",
    "decode_run_record",
    "decode_state",
    "encode",
    "verb_of",
]

_TAG = {"tag_field": "t", "kw_only": True, "omit_defaults": False}


# --- commands: runctl.<run>.<rank|all>.cmd.<verb> ------------------------------------


class Author(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Who sent a change, as the sender states it (recorded in the change journal).

    The gateway fills it from the caller's bearer token, the CLI with ``user@host``, the
    Python client with its ``by=``; a bare NATS request has none (the journal says
    ``via: "nats"``). It is what the sender claims: trust it as far as you trust the NATS
    users allowed to send commands (docs/security.md)."""

    #: the token's name (gateway), ``user@host`` (CLI, Python default), or the ``by=`` given
    name: str = ""
    #: ``http``, ``cli``, ``python`` or ``nats``
    via: str = ""
    #: the gateway token's role (read, write, admin)
    role: str = ""
    #: the NATS user the sender was logged in as
    user: str = ""
    #: the HTTP caller's address (gateway)
    addr: str = ""


class Get(msgspec.Struct, tag="get/1", **_TAG):
    """Read the state, or the value at a dotted ``path``."""

    path: str | None = None


class Set(msgspec.Struct, tag="set/1", **_TAG):
    """Replace the value at ``path`` (a leaf or a whole sub-tree)."""

    path: str
    value: Any
    #: apply at the first ``ctl.sync(step)`` with step >= at_step instead of now
    at_step: int | None = None
    #: names the change in the change journal (and a deferred change, to cancel it)
    change_id: str = ""
    by: Author | None = None
    #: ``value`` is text as typed: JSON if the field takes it so, else the text itself
    text: bool = False
    #: sent by a synchronised write (``sync=True``): a later synchronised change is never
    #: placed before it; a change scheduled at a step of the user's choosing has no such rule
    synced: bool = False


class Patch(msgspec.Struct, tag="patch/1", **_TAG):
    """Merge ``value`` into the state (or into the sub-tree at ``path``): objects merge
    recursively, everything else replaces."""

    value: dict[str, Any]
    path: str | None = None
    at_step: int | None = None
    change_id: str = ""
    by: Author | None = None
    #: dotted paths (inside ``value``) of leaves that are text as typed (see Set.text)
    texts: list[str] = msgspec.field(default_factory=list)
    #: see Set.synced
    synced: bool = False


class Reset(msgspec.Struct, tag="reset/1", **_TAG):
    """Back to the state the program had when it called ``control()``."""

    at_step: int | None = None
    change_id: str = ""
    by: Author | None = None
    #: see Set.synced
    synced: bool = False


#: graceful: the program sees ``stop_requested`` and finishes its step. terminate: as
#: graceful, then SIGTERM after ``grace`` seconds and SIGKILL after twice that, if the
#: rank's process is still running (only when the operator asks for it).
StopMode = Literal["graceful", "terminate"]
#: the longest grace a terminate may give, seconds (a week): any finite bound refuses inf
MAX_GRACE: Final = 7 * 24 * 3600.0
#: seconds before SIGTERM: positive and finite (NaN fails both bounds), so a decoded
#: message can never hold one a rank would refuse
Grace = Annotated[float, msgspec.Meta(gt=0, le=MAX_GRACE)]


def check_grace(grace: float) -> float:
    """``grace`` if a rank takes it, else :class:`BadRequest` naming the rule (before
    anything is sent or recorded: msgspec would write ``inf`` as ``null``)."""
    if not (isinstance(grace, int | float) and math.isfinite(grace) and 0 < grace <= MAX_GRACE):
        raise BadRequest(
            f"grace must be a number of seconds above 0 and at most {MAX_GRACE:g}, not {grace!r}"
        )
    return float(grace)


class Stop(msgspec.Struct, tag="stop/1", **_TAG):
    reason: str = ""
    mode: StopMode = "graceful"
    grace: Grace = 30.0
    at_step: int | None = None
    change_id: str = ""
    by: Author | None = None
    #: save a checkpoint at ``at_step`` before stopping (``ctl.on_checkpoint``)
    checkpoint: bool = False
    #: see Set.synced
    synced: bool = False
    #: a run-wide stop that its writer journals in one record (naming the ranks that
    #: acknowledged it): the ranks write none of their own
    journaled_by_writer: bool = False


class Cancel(msgspec.Struct, tag="cancel/1", **_TAG):
    """Drop a deferred change (``at_step``) that has not been applied yet."""

    #: the deferred change to drop
    change_id: str
    #: this cancellation's own id in the change journal
    id: str = ""
    by: Author | None = None


class Assign(msgspec.Struct, tag="assign/1", **_TAG):
    """Set several dotted paths at once, all or nothing (``{"opt.lr": 0.1, "layers.0.w":
    4}``): what an undo sends, the recorded before-values of the fields a change changed."""

    values: dict[str, Any]
    change_id: str = ""
    by: Author | None = None
    #: the change this one takes back (an undo)
    undo_of: str = ""


class Schema(msgspec.Struct, tag="schema/1", **_TAG):
    """The model's JSON schema."""


class Ping(msgspec.Struct, tag="ping/1", **_TAG):
    pass


Command = Get | Set | Patch | Reset | Stop | Schema | Ping | Cancel | Assign
COMMAND_TYPES: Final[dict[str, type[Command]]] = {
    "get": Get,
    "set": Set,
    "patch": Patch,
    "reset": Reset,
    "stop": Stop,
    "schema": Schema,
    "ping": Ping,
    "cancel": Cancel,
    "assign": Assign,
}
#: commands that may be deferred to a step boundary
DEFERRABLE: Final = (Set, Patch, Reset, Stop)
#: commands that change something on a rank: each is recorded in the change journal
WRITES: Final = (Set, Patch, Reset, Stop, Cancel, Assign)
_VERB_OF: Final[dict[type[Command], str]] = {cls: v for v, cls in COMMAND_TYPES.items()}


def verb_of(command: Command) -> str:
    """The verb (subject token) of a command.

    >>> verb_of(Set(path="lr", value=0.1))
    'set'
    """
    try:
        return _VERB_OF[type(command)]
    except KeyError:
        raise TypeError(f"not a command: {command!r}") from None


# --- replies ------------------------------------------------------------------------


class Ok(msgspec.Struct, tag="ok/1", **_TAG):
    run: str
    rank: str
    version: int
    value: Any = None
    #: True when the command changed the state (set/patch/reset that altered something)
    changed: bool = False
    #: a write's id in the change journal (the one sent, or one the rank made up)
    change_id: str = ""
    #: the rank sent this write's journal record (the writer waits until it is stored)
    journaled: bool = False
    #: store acknowledgements the rank had sent to the writer's inbox (bus/acks.py)
    acks: int = 0


class Err(msgspec.Struct, tag="err/1", **_TAG):
    run: str
    rank: str
    code: str
    message: str
    #: pydantic's error list for code "validation"
    detail: list[dict[str, Any]] = msgspec.field(default_factory=list)
    version: int = 0


Reply = Ok | Err


# --- published by agents ---------------------------------------------------------------


class StateMsg(msgspec.Struct, tag="state/1", **_TAG):
    """Full state on ``runctl.<run>.<rank>.state``: after each change and on heartbeat."""

    run: str
    rank: str
    version: int
    ts: float
    state: Any
    #: "changed" when published because the state changed, "heartbeat" otherwise
    cause: str = "heartbeat"
    #: what a subscriber needs to tell alive / stale / stalled without the registry
    #: (see bus/progress.py): the agent's heartbeat period, the program's last step,
    #: when the program last advanced (wall clock; None: it never reported progress)
    #: and after how many seconds without progress it counts as stalled (0: never)
    heartbeat_interval: float = 0.0
    step: int | None = None
    progress_ts: float | None = None
    stall_after: float = 0.0
    #: steps per second, recent average (as in the registry record): for curves
    step_rate: float = 0.0
    #: the state's size in bytes when it is too large for a message (``state`` is then
    #: None), with the server's max_payload it was measured against (bus/sizelimit.py)
    state_omitted: int = 0
    max_payload: int = 0


class Event(msgspec.Struct, tag="event/1", **_TAG):
    """On ``runctl.<run>.<rank>.evt.<kind>``."""

    run: str
    rank: str
    kind: str
    ts: float
    version: int = 0
    data: dict[str, Any] = msgspec.field(default_factory=dict)


RankStatus = Literal["running", "exited"]


class RankRecord(msgspec.Struct, tag="rank/1", **_TAG):
    """KV bucket ``RUNCTL_RANKS``, key ``<run>.<rank>``: discovery and last state."""

    run: str
    rank: str
    host: str
    pid: int
    started: float
    heartbeat: float
    heartbeat_interval: float
    version: int
    state: Any
    status: RankStatus = "running"
    stop_requested: bool = False
    world_size: int | None = None
    model: str = ""
    #: last step the program passed to ``ctl.sync(step)``; None if it never did
    step: int | None = None
    #: steps per second, recent average
    step_rate: float = 0.0
    #: deferred changes waiting for their step
    pending: int = 0
    #: journaled changes applied when this rank started (replay), and those skipped
    replayed: int = 0
    replay_skipped: int = 0
    #: when the program last advanced (a new step, an item of ctl.steps, ctl.tick());
    #: None if it never reported progress (see bus/progress.py)
    progress_ts: float | None = None
    #: the program's recent seconds per step (0: not known yet)
    progress_interval: float = 0.0
    #: seconds without progress after which the rank is ``stalled`` (0: never)
    stall_after: float = 0.0
    #: why the program ended, when it ended with an uncaught exception ("" otherwise)
    error: str = ""
    #: the state's size in bytes when it is too large for a message (``state`` is then
    #: None), with the server's max_payload it was measured against (bus/sizelimit.py)
    state_omitted: int = 0
    max_payload: int = 0


class RankRecordHead(RankRecord, tag="rank/1", **_TAG):
    """A :class:`RankRecord` read without decoding its state: ``state`` stays the raw JSON
    bytes. Who is alive, and at which version, is all a broadcast or a read-your-writes
    wait needs; decoding a large state into Python objects for each rank costs the
    client several times more (bench/bench_fanout.py)."""

    state: msgspec.Raw = msgspec.Raw(b"null")


class RunRecord(msgspec.Struct, tag="run/1", **_TAG):
    """KV key ``<run>.all``: what applies to the whole run, e.g. a broadcast stop, so a
    rank that starts later in the same run sees it."""

    run: str
    stop_requested: bool = False
    reason: str = ""
    ts: float = 0.0
    mode: StopMode = "graceful"
    grace: Grace = 30.0


_encoder = msgspec.json.Encoder()
_command_decoder: Final = msgspec.json.Decoder(Command)
_reply_decoder: Final = msgspec.json.Decoder(Reply)
_state_decoder: Final = msgspec.json.Decoder(StateMsg)
_event_decoder: Final = msgspec.json.Decoder(Event)
_record_decoder: Final = msgspec.json.Decoder(RankRecord)
_record_head_decoder: Final = msgspec.json.Decoder(RankRecordHead)
_run_record_decoder: Final = msgspec.json.Decoder(RunRecord)


def encode(msg: msgspec.Struct) -> bytes:
    """Any message Struct as its wire JSON."""
    return _encoder.encode(msg)


def decode_command(verb: str, payload: bytes) -> Command:
    """Decode a command; an empty payload means the verb's defaults (``nats req ... ''``).

    Raises ``msgspec.ValidationError``/``DecodeError`` on a malformed payload and
    ``ValueError`` when the payload's tag does not match the subject's verb.
    """
    expected = COMMAND_TYPES[verb]
    if not payload.strip():
        # set/patch have required fields: the TypeError is reported as a bad command
        return expected()  # type: ignore[call-arg]
    cmd = _command_decoder.decode(payload)
    if type(cmd) is not expected:
        raise ValueError(f"payload is a {type(cmd).__name__} command, subject says {verb!r}")
    return cmd


def decode_reply(payload: bytes) -> Reply:
    """A command's reply (``reply/1``)."""
    reply: Reply = _reply_decoder.decode(payload)
    return reply


def decode_state(payload: bytes) -> StateMsg:
    """A state message (``state/1``)."""
    return _state_decoder.decode(payload)


def decode_event(payload: bytes) -> Event:
    """An event message (``event/1``)."""
    return _event_decoder.decode(payload)


def decode_record(payload: bytes) -> RankRecord:
    """A rank's registry record (``rank/1``)."""
    return _record_decoder.decode(payload)


def decode_record_head(payload: bytes) -> RankRecord:
    """A rank's registry record with its state left undecoded (:class:`RankRecordHead`)."""
    return _record_head_decoder.decode(payload)


def decode_run_record(payload: bytes) -> RunRecord:
    """A run's registry record: its run-wide stop (``run/1``)."""
    return _run_record_decoder.decode(payload)
