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
from runctl.bus.subjects import check_token, states_wildcard

__all__ = [
    "MAX_AGE",
    "MAX_BYTES",
    "MAX_PER_RANK",
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
    #: True when ``limit`` stopped the read before the newest message
    truncated: bool = False


async def read_states(nc: NATS, run: str, *, since: float, limit: int = 50_000) -> StoredStates:
    """The run's state messages stored since ``since`` (unix time), at most ``limit``."""
    history = StoredStates(check_token(run, "run"))
    subject = states_wildcard(run)
    start = datetime.datetime.fromtimestamp(max(since, 0.0), datetime.UTC).isoformat()
    request: dict[str, object] = {"next_by_subj": subject, "start_time": start}
    while len(history.payloads) < limit:
        page = await _direct_batch(
            nc, {**request, "batch": min(BATCH, limit - len(history.payloads))}
        )
        if page.status == "503":  # no responders: the stream does not exist
            history.available = False
            return history
        history.payloads.extend(page.payloads)
        if page.status != "204" or page.pending == 0 or page.last_seq is None:
            return history
        request = {"next_by_subj": subject, "seq": page.last_seq + 1}
    history.truncated = True
    return history


@dataclass(slots=True)
class _Page:
    payloads: list[bytes] = field(default_factory=list)
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
        page.payloads.append(msg.data)
        seq = headers.get("Nats-Sequence")
        if seq:
            page.last_seq = int(seq)

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
