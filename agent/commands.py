"""The agent's command handling as a pure core: ``(rank state, command) -> outcome``.

Every command a rank receives -- over NATS now, or at ``ctl.sync(step)`` for one deferred
to a step -- goes through :func:`execute` (bytes off the wire) or :func:`apply` (a decoded
command). They never raise and never touch the network, a thread or a clock they were not
given: the :class:`Outcome` says what to reply, the new state to publish (if the command
changed it) and the :data:`Effect` s the caller carries out (a stop's callbacks and its
escalation). The agent (:mod:`runctl.agent.agent`) does the I/O around it.

    rank = RankState(run="exp1", rank="0", live=LiveState(cfg))
    outcome = execute(rank, "set", b'{"t":"set/1","path":"lr","value":0.01}', now=time.time())
    outcome.reply        # Ok(run="exp1", rank="0", version=1, value=<the new state>, ...)
    outcome.new_state    # the state's JSON, to publish (None when nothing changed)

The state is the live pydantic model (changed in place, as the program holds it), the
deferred changes, the step clock and the stop flag: :class:`RankState`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import structlog
from msgspec.structs import replace

from runctl.agent.pending import PendingChanges, StepClock
from runctl.agent.state import LiveState
from runctl.agent.typed_text import patch_typed, set_typed
from runctl.bus import messages as m
from runctl.bus.defaults import MAX_PAYLOAD
from runctl.bus.errors import BadRequest, PayloadTooLarge, RunctlError, TooLate
from runctl.bus.messages import verb_of  # the agent's callers import it from here

__all__ = [
    "MAX_ERRORS",
    "Effect",
    "Outcome",
    "RankState",
    "StopEffect",
    "apply",
    "error_reply",
    "execute",
    "request_stop",
    "verb_of",
]

#: a rejection lists at most this many of pydantic's errors
MAX_ERRORS: Final = 50

log = structlog.get_logger()


@dataclass(slots=True)
class RankState:
    """What commands read and change on one rank: who it is, the live state, the deferred
    changes, the step clock and whether a stop was asked for."""

    run: str
    rank: str
    live: LiveState[Any]
    host: str = ""
    pid: int = 0
    started: float = 0.0
    world_size: int | None = None
    pending: PendingChanges = field(default_factory=PendingChanges)
    clock: StepClock = field(default_factory=StepClock)
    max_payload: int = MAX_PAYLOAD
    stop_requested: bool = False
    stop_reason: str = ""
    #: journaled changes applied when the rank started, and those the replay skipped
    replayed: int = 0
    replay_skipped: int = 0


@dataclass(frozen=True, slots=True)
class StopEffect:
    """A stop was asked for: run the stop callbacks (``first``: only on the first stop) and,
    for ``mode="terminate"``, escalate to signals after ``grace`` seconds."""

    reason: str
    mode: m.StopMode
    grace: float
    first: bool


#: what the caller carries out after a command (today only a stop has an effect)
Effect = StopEffect


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one command did: the reply, the state to publish, the effects to carry out."""

    #: the decoded command (None when it could not be decoded)
    command: m.Command | None
    reply: m.Reply
    #: the state's JSON when the command changed it, else None
    new_state: bytes | None = None
    effects: tuple[Effect, ...] = ()


def execute(rank: RankState, verb: str, data: bytes, *, now: float | None = None) -> Outcome:
    """Decode and run one command off the wire, deferring one with ``at_step``.

    Never raises: a malformed or oversized payload, an unknown verb or a refused change
    becomes an :class:`~runctl.bus.messages.Err` reply.
    """
    try:
        if len(data) > rank.max_payload:
            raise PayloadTooLarge(len(data), rank.max_payload)
        if verb not in m.COMMAND_TYPES:
            raise BadRequest(f"unknown verb {verb!r}")
        try:
            cmd = m.decode_command(verb, data)
        except (
            msgspec.DecodeError,
            msgspec.ValidationError,
            ValueError,
            TypeError,
            RecursionError,
        ) as exc:  # RecursionError: 100k-deep nesting
            raise BadRequest(f"malformed {verb} command: {exc}") from None
    except RunctlError as exc:
        return Outcome(None, error_reply(rank, exc))
    return apply(rank, cmd, defer=True, now=now)


def apply(
    rank: RankState,
    cmd: m.Command,
    *,
    defer: bool,
    now: float | None = None,
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> Outcome:
    """Run a decoded command now, or (``defer`` and it has an ``at_step``) validate it and
    keep it for its step. ``new_id`` names a deferred change that came without an id.
    Never raises: a refused change or a bug in the user's validator becomes an Err reply."""
    live = rank.live
    value: Any = None
    changed = False
    effects: tuple[Effect, ...] = ()
    try:
        if defer and isinstance(cmd, m.DEFERRABLE) and cmd.at_step is not None:
            return Outcome(cmd, _defer(rank, cmd, new_id))
        match cmd:
            case m.Get(path=path):
                value = msgspec.Raw(_readable(rank, live.get(path)))
            case m.Set(path=path, value=new, text=True):
                before = live.version
                cmd = replace(cmd, value=set_typed(live, path, str(new)), text=False)
                changed = live.version != before
            case m.Set(path=path, value=new):
                changed = live.set(path, new)
            case m.Patch(value=new, path=path, texts=texts) if texts:
                before = live.version
                cmd = replace(cmd, value=patch_typed(live, new, path, texts), texts=[])
                changed = live.version != before
            case m.Patch(value=new, path=path):
                changed = live.patch(new, path)
            case m.Reset():
                changed = live.reset()
            case m.Stop(reason=reason, mode=mode, grace=grace):
                effects = (StopEffect(reason, mode, grace, request_stop(rank, reason)),)
                value = {"stop_requested": True, "mode": mode}
            case m.Schema():
                value = live.schema()
            case m.Ping():
                value = _ping(rank, time.time() if now is None else now)
            case m.Cancel(change_id=change_id):
                value = {"cancelled": rank.pending.cancel(change_id)}
            case m.Assign(values=values):
                changed = live.assign(values)
        new_state: bytes | None = None
        if isinstance(cmd, m.Set | m.Patch | m.Reset | m.Assign):
            dumped = live.dump_json_after_change() if changed else live.dump_json()
            value = msgspec.Raw(dumped)
            new_state = dumped if changed else None
        reply = m.Ok(
            run=rank.run, rank=rank.rank, version=live.version, value=value, changed=changed
        )
        return Outcome(cmd, reply, new_state, effects)
    except RunctlError as exc:
        return Outcome(cmd, error_reply(rank, exc))
    except Exception as exc:  # a user validator's bug must not crash the program
        log.exception("command failed", run=rank.run, rank=rank.rank, command=type(cmd).__name__)
        err = m.Err(
            run=rank.run,
            rank=rank.rank,
            code="internal",
            message=f"{type(exc).__name__}: {exc}",
            version=live.version,
        )
        return Outcome(cmd, err)


def request_stop(rank: RankState, reason: str) -> bool:
    """Mark the rank as asked to stop (the latest reason wins); True the first time."""
    first = not rank.stop_requested
    # the reason first: the program's thread may read the flag, then the reason, in between
    rank.stop_reason = reason
    rank.stop_requested = True
    return first


def error_reply(rank: RankState, exc: RunctlError) -> m.Err:
    """The Err reply for ``exc``, its error list cut to :data:`MAX_ERRORS` entries."""
    detail = list(getattr(exc, "errors", []))
    if len(detail) > MAX_ERRORS:  # 60k bad keys must not make a reply over max_payload
        more = len(detail) - MAX_ERRORS
        detail = [
            *detail[:MAX_ERRORS],
            {"type": "too_many_errors", "loc": [], "msg": f"and {more} more errors"},
        ]
    return m.Err(
        run=rank.run,
        rank=rank.rank,
        code=exc.code,
        message=str(exc),
        detail=detail,
        version=rank.live.version,
    )


def _defer(
    rank: RankState, cmd: m.Set | m.Patch | m.Reset | m.Stop, new_id: Callable[[], str]
) -> m.Reply:
    """Validate now (every rank refuses a bad change before any applies), apply later."""
    at_step = cmd.at_step
    assert at_step is not None
    live = rank.live
    # Validity first: an invalid change is refused as such on every rank, however late.
    # Typed text is read now, and the change kept as read (every rank the same way).
    match cmd:
        case m.Set(path=path, value=new, text=True):
            cmd = replace(cmd, value=set_typed(live, path, str(new), dry_run=True), text=False)
        case m.Patch(value=new, path=path, texts=texts) if texts:
            cmd = replace(cmd, value=patch_typed(live, new, path, texts, dry_run=True), texts=[])
        case m.Set(path=path, value=new):
            live.set(path, new, dry_run=True)
        case m.Patch(value=new, path=path):
            live.patch(new, path, dry_run=True)
        case m.Reset():
            live.reset(dry_run=True)
    current = rank.clock.step
    if current is not None and current >= at_step:
        raise TooLate(f"rank {rank.rank} is at step {current}, past at_step {at_step}")
    change_id = cmd.change_id or new_id()
    rank.pending.add(at_step, change_id, cmd)
    return m.Ok(
        run=rank.run,
        rank=rank.rank,
        version=live.version,
        value={"pending": True, "at_step": at_step, "change_id": change_id, "step": current},
    )


def _readable(rank: RankState, value: bytes) -> bytes:
    """``value`` if a reply can carry it, else the error that names the limit."""
    limit = rank.live.size_limit
    if limit is not None and not limit.fits(len(value)):
        raise limit.unreadable(len(value), f"rank {rank.rank} of run {rank.run}")
    return value


def _ping(rank: RankState, now: float) -> dict[str, Any]:
    return {
        "host": rank.host,
        "pid": rank.pid,
        "uptime": round(now - rank.started, 3),
        "step": rank.clock.step,
        "step_rate": round(rank.clock.rate, 3),
        "pending": rank.pending.snapshot(),
    }
