"""The change journal on JetStream: its stream, reading it back, confirming a write, and
removing a run's journal.

Stream ``RUNCTL_JOURNAL`` (file storage, limits retention, replicated like the step log
with ``RUNCTL_REPLICAS``) captures ``runctl.*.*.journal.*``: one message per change and
rank (see :mod:`runctl.bus.journal`). Retention: records older than ``max_age`` (default
90 days) or beyond ``max_bytes`` for the whole journal (default 1 GiB) are dropped, oldest
first; ``RUNCTL_JOURNAL_MAX_AGE`` (seconds) and ``RUNCTL_JOURNAL_MAX_BYTES`` set them when
the stream is created (an operator's later ``nats stream edit`` is kept, as for the step log).

Writers: the ranks (their own records, through :class:`runctl.agent.journaling.Journaler`)
and the operator's client (run-wide records, :func:`append`). Readers: any role that may
read the stream (``nats stream view RUNCTL_JOURNAL``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from typing import Final

import anyio
import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js import errors as js_errors

from runctl.bus.errors import BadRequest, RunctlError, Unavailable, map_nats_error
from runctl.bus.journal import Record, decode_record, encode_record
from runctl.bus.replicas import replicas_from_env
from runctl.bus.steps.store import ensure_config, fast_read
from runctl.bus.subjects import (
    check_rank,
    check_token,
    journal_filter,
    journal_stream_subjects,
    journal_subject,
)

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_BYTES",
    "STREAM",
    "append",
    "confirm",
    "ensure_journal",
    "forget_run",
    "read_journal",
    "stream_config",
]

STREAM: Final = "RUNCTL_JOURNAL"
DEFAULT_MAX_AGE: Final = 90 * 24 * 3600.0
DEFAULT_MAX_BYTES: Final = 1 << 30
MAX_AGE_ENV: Final = "RUNCTL_JOURNAL_MAX_AGE"
MAX_BYTES_ENV: Final = "RUNCTL_JOURNAL_MAX_BYTES"
#: Nats-Msg-Id dedup window: a rank re-sends an unacknowledged record with the same id
DUPLICATE_WINDOW: Final = 120.0
#: how long a writer waits, by default, for every rank's record to be stored
CONFIRM_TIMEOUT: Final = 2.0

log = structlog.get_logger()


def _env_number(name: str, default: float, env: Mapping[str, str] | None = None) -> float:
    text = (os.environ if env is None else env).get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name}={text[:20]!r} is not a number") from None
    if value < 0:
        raise BadRequest(f"{name} must not be negative")
    return value


def stream_config(
    *, replicas: int = 1, max_age: float | None = None, max_bytes: int | None = None
) -> api.StreamConfig:
    """The journal stream; limits default to the environment, else 90 days and 1 GiB
    (0 means unlimited, as in JetStream)."""
    age = _env_number(MAX_AGE_ENV, DEFAULT_MAX_AGE) if max_age is None else max_age
    size = int(_env_number(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)) if max_bytes is None else max_bytes
    return api.StreamConfig(
        name=STREAM,
        description="runctl change journal (one record per change and rank)",
        subjects=journal_stream_subjects(),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_age=age,
        max_bytes=size or -1,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
        # A writer confirms its records by direct get; a lagging follower can only answer
        # "not yet" (it never has a record the leader has not committed): it is then asked
        # again.
        allow_direct=True,
        allow_rollup_hdrs=False,  # one header would wipe every run's history
        deny_delete=True,
    )


async def ensure_journal(js: JetStreamContext, *, replicas: int | None = None) -> None:
    """Create the stream, or make an existing one capture what runctl relies on (its
    subjects, the dedup window, direct gets) and keep the rest of an operator's config.
    ``replicas`` None: ``RUNCTL_REPLICAS``, else 1 (an existing stream keeps its count)."""
    asked = replicas if replicas is not None else replicas_from_env()

    def enforce(merged: api.StreamConfig) -> None:
        merged.duplicate_window = max(merged.duplicate_window or 0.0, DUPLICATE_WINDOW)
        merged.allow_direct = True
        if asked is not None:
            merged.num_replicas = asked

    await ensure_config(js, stream_config(replicas=asked or 1), enforce)


# --- reading ----------------------------------------------------------------------------


async def read_journal(
    nc: NATS, run: str, *, ranks: Iterable[str] | None = None
) -> list[tuple[int, Record]]:
    """Every record of ``run`` (or of ``ranks`` only: ranks and/or ``all``), in stream
    order, with its stream sequence. A missing stream reads as empty; a record that does
    not decode is left out (logged)."""
    check_token(run, "run")
    filters = (
        [journal_filter(run)]
        if ranks is None
        else sorted({journal_filter(run, check_rank(r)) for r in ranks})
    )
    out: list[tuple[int, Record]] = []

    def on_entry(subject: str, data: bytes, seq: int) -> None:
        try:
            out.append((seq, decode_record(data)))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable journal record skipped", subject=subject, error=str(exc))

    if not filters:
        return out
    try:
        await fast_read(nc, filters, on_entry, stream=STREAM)
    except RunctlError:
        raise
    except js_errors.ServiceUnavailableError as exc:  # the JetStream API has no responder
        raise Unavailable(
            "JetStream is not available on the NATS server (not enabled: nats-server -js; "
            "or a cluster still electing its leaders)"
        ) from exc
    except Exception as exc:
        raise map_nats_error(exc, run=run) from exc
    return out


# --- writing run-wide records; confirming a rank's -----------------------------------------


async def append(js: JetStreamContext, record: Record, *, timeout: float = 2.0) -> int:
    """Store a record and wait for the server's acknowledgement; returns its sequence.
    The stream is created on first use."""
    subject = journal_subject(record.run, record.rank, record.id)
    headers = {"Nats-Msg-Id": f"{record.rank}-{record.id}"}
    payload = encode_record(record)
    try:
        try:
            ack = await js.publish(subject, payload, timeout=timeout, headers=headers)
        except js_errors.NoStreamResponseError:
            await ensure_journal(js)
            ack = await js.publish(subject, payload, timeout=timeout, headers=headers)
    except RunctlError:
        raise
    except Exception as exc:
        raise Unavailable(f"the change journal is unavailable: {map_nats_error(exc)}") from exc
    return int(ack.seq)


async def confirm(
    nc: NATS,
    run: str,
    change_id: str,
    ranks: Iterable[str],
    *,
    timeout: float = CONFIRM_TIMEOUT,
) -> set[str]:
    """Wait until the journal holds ``change_id``'s record of each of ``ranks`` (bounded);
    returns the ranks whose record is stored. One batched direct get per attempt."""
    wanted = {check_rank(r, allow_all=False) for r in ranks}
    found: set[str] = set()
    if not wanted:
        return found
    check_token(run, "run")
    pattern = journal_filter(run, None if len(wanted) > 1 else next(iter(wanted)), change_id)
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        with contextlib.suppress(Exception):  # a server away for a moment: ask again
            found |= await _stored_ranks(nc, pattern, wanted)
        if wanted <= found or time.monotonic() >= deadline:
            return found & wanted
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _stored_ranks(nc: NATS, pattern: str, wanted: set[str]) -> set[str]:
    """The ranks with a stored record on subjects matching ``pattern`` (batched direct get)."""
    request = msgspec.json.encode({"multi_last": [pattern], "batch": max(len(wanted), 1) * 2})
    ranks: set[str] = set()
    ended = anyio.Event()

    async def on_message(msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get("Status") is not None:  # 204 end of batch, 404 none yet
            ended.set()
            return
        subject = headers.get("Nats-Subject", "")
        parts = subject.split(".")
        if len(parts) == 5:
            ranks.add(parts[2])

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_message)
    try:
        await nc.publish(f"{api.DEFAULT_PREFIX}.DIRECT.GET.{STREAM}", request, reply=inbox)
        with anyio.move_on_after(1.0):
            await ended.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()
    return ranks


async def forget_run(nc: NATS, run: str) -> int:
    """Remove every journal record of ``run`` (admin); returns how many were removed."""
    check_token(run, "run")
    # the stream purge API itself (nats-py's purge_stream answers only yes or no)
    subject = f"{api.DEFAULT_PREFIX}.STREAM.PURGE.{STREAM}"
    body = msgspec.json.encode({"filter": journal_filter(run)})
    try:
        answer = msgspec.json.decode((await nc.request(subject, body, timeout=5.0)).data)
        if "error" in answer:
            js_errors.APIError.from_error(answer["error"])
    except js_errors.NotFoundError:
        return 0
    except Exception as exc:
        raise map_nats_error(exc, run=run) from exc
    return int(answer.get("purged", 0))
