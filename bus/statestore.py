"""Recent state messages, kept by JetStream: stream ``RUNCTL_STATES``.

Every rank publishes its whole state on ``runctl.<run>.<rank>.state`` after each change and
on each heartbeat. This stream keeps those messages for a bounded time, size and count per
rank, so a reader that arrives late (the console's curves on page load, a gateway that was
restarted) sees how the numbers moved, not only their last value. The gateway stays
stateless: it reads the history back from the bus on each request.

Agents create the stream when they start (an identical create is accepted by the server;
an existing stream is never changed, so an operator's limits stay). Publishing state costs
the agent nothing more: the server captures the messages it already sends.

Reads use one batched direct get per page of messages (no consumer to create or delete).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from runctl.bus.errors import Unavailable
from runctl.bus.steps.store import ensure_config
from runctl.bus.subjects import check_token, state_subject, states_wildcard

__all__ = [
    "MAX_AGE",
    "MAX_BYTES",
    "MAX_PER_RANK",
    "SEGMENTS",
    "STREAM",
    "StoredStates",
    "ensure_stream",
    "read_states",
    "stream_config",
]

STREAM: Final = "RUNCTL_STATES"
#: how long state messages are kept (seconds)
MAX_AGE: Final = 6 * 3600.0
#: at most this much for every run together (the oldest messages go first)
MAX_BYTES: Final = 512 << 20
#: per rank: about 7 hours of one heartbeat per second
MAX_PER_RANK: Final = 25_000
#: messages asked for in one direct get (the server may send fewer)
BATCH: Final = 1_000
BATCH_BYTES: Final = 8 << 20
READ_TIMEOUT: Final = 5.0

log = structlog.get_logger()


def stream_config(*, replicas: int = 1) -> api.StreamConfig:
    """The stream's config; direct gets are allowed even when replicated (a follower that
    lags by a heartbeat is harmless for a history)."""
    return api.StreamConfig(
        name=STREAM,
        description="runctl: recent state messages of every rank (for curves)",
        subjects=[states_wildcard()],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_age=MAX_AGE,
        max_bytes=MAX_BYTES,
        max_msgs_per_subject=MAX_PER_RANK,
        num_replicas=replicas,
        allow_direct=True,
        allow_rollup_hdrs=False,  # every agent publishes here: none may wipe it
        deny_delete=True,
        deny_purge=True,
    )


async def ensure_stream(js: JetStreamContext, *, replicas: int | None = None) -> None:
    """Create the stream unless it exists. A stream that exists with another config (an
    operator changed its limits) is left as it is, but for its subjects (runctl relies on
    them). ``replicas`` None: ``RUNCTL_REPLICAS``."""
    from runctl.bus.cluster import replicas_from_env

    config = stream_config(replicas=replicas or replicas_from_env() or 1)
    await ensure_config(js, config, enforce=lambda merged: None)


@dataclass(slots=True)
class StoredStates:
    """State messages of one run read back, oldest first, as published (``state/1``
    JSON: decode with :func:`runctl.bus.messages.decode_state`, or lazily)."""

    run: str
    payloads: list[bytes] = field(default_factory=list)
    #: False when the stream does not exist (no agent created it yet)
    available: bool = True
    #: how many messages the window holds; more than were read when ``sampled``
    matching: int = 0
    #: True when the window held more than ``limit`` messages: ``payloads`` are
    #: :data:`SEGMENTS` runs of consecutive messages spread evenly over the window, and
    #: each rank's newest message
    sampled: bool = False


#: a window with more messages than asked for is read as this many evenly spread runs
SEGMENTS: Final = 16


def _start_time(t: float) -> str:
    return datetime.datetime.fromtimestamp(max(t, 0.0), datetime.UTC).isoformat()


async def read_states(
    nc: NATS, run: str, *, since: float, limit: int = 20_000, rank: str | None = None
) -> StoredStates:
    """The run's (or one rank's) state messages stored since ``since`` (unix time).

    At most about ``limit`` messages are read: when the window holds more (many ranks, a
    long window), :data:`SEGMENTS` runs of consecutive messages spread evenly over it are
    read instead, and each rank's newest message, so every rank has points all along the
    window and up to now, at a bounded cost."""
    found = StoredStates(check_token(run, "run"))
    subject = state_subject(run, rank) if rank is not None else states_wildcard(run)
    probe = await _direct_batch(
        nc, {"next_by_subj": subject, "start_time": _start_time(since), "batch": 1}
    )
    if probe.status == "503":  # no responders: the stream does not exist
        found.available = False
        return found
    if not probe.payloads:
        return found
    found.matching = len(probe.payloads) + probe.pending
    got: dict[int, bytes] = {}
    first = probe.seqs[0]
    if found.matching <= limit:
        await _read_run(nc, subject, first, limit, got)
    else:
        found.sampled = True
        newest = await _direct_batch(nc, {"multi_last": [subject], "batch": BATCH})
        got.update(zip(newest.seqs, newest.payloads, strict=True))
        last = max(newest.seqs, default=first)
        quota = max(1, (limit - len(newest.seqs)) // SEGMENTS)
        for i in range(SEGMENTS):
            await _read_run(nc, subject, first + (last - first) * i // SEGMENTS, quota, got)
    found.payloads = [got[seq] for seq in sorted(got)]
    return found


async def _read_run(nc: NATS, subject: str, seq: int, limit: int, into: dict[int, bytes]) -> None:
    """Up to ``limit`` consecutive messages matching ``subject`` from sequence ``seq`` on,
    into ``into`` (by sequence: runs that overlap keep each message once)."""
    got = 0
    while got < limit:
        request = {"next_by_subj": subject, "seq": seq, "batch": min(BATCH, limit - got)}
        page = await _direct_batch(nc, request)
        into.update(zip(page.seqs, page.payloads, strict=True))
        got += len(page.payloads)
        if page.status != "204" or page.pending == 0 or page.last_seq is None:
            return
        seq = page.last_seq + 1


@dataclass(slots=True)
class _Page:
    payloads: list[bytes] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    status: str = ""
    pending: int = 0
    last_seq: int | None = None


async def _direct_batch(nc: NATS, request: dict[str, object]) -> _Page:
    page = _Page()
    ended = anyio.Event()

    async def on_message(msg: Msg) -> None:
        headers = msg.headers or {}
        code = headers.get("Status")
        if code is not None:  # 204 ends the batch, 404: nothing (more) matches
            page.status = code
            page.pending = int(headers.get("Nats-Num-Pending", "0") or 0)
            last = headers.get("Nats-Last-Sequence")
            page.last_seq = int(last) if last else page.last_seq
            ended.set()
            return
        seq = int(headers.get("Nats-Sequence", "0") or 0)
        page.payloads.append(msg.data)
        page.seqs.append(seq)
        page.last_seq = seq or page.last_seq

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_message)
    try:
        body = msgspec.json.encode({**request, "max_bytes": BATCH_BYTES})
        await nc.publish(f"$JS.API.DIRECT.GET.{STREAM}", body, reply=inbox)
        with anyio.move_on_after(READ_TIMEOUT) as scope:
            await ended.wait()
        if scope.cancelled_caught:
            raise Unavailable(f"reading stream {STREAM} timed out after {READ_TIMEOUT:g}s")
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
    return page
