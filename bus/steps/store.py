"""The step-log stream on JetStream: its config, fast read-back, and forgetting.

Stream ``RUNCTL_STEPS`` (file storage, limits retention) captures ``runctl.*.*.done.>``,
which no command subject can match. It keeps **one message per subject**: the latest record
of each step identity (see :mod:`runctl.bus.steps.records`). So resuming reads one message per step,
a retried write can never leave two records, and a record left at ``started`` is an
interrupted attempt.

Reads use an ephemeral push consumer with flow control, no acks and in-memory state, read
through a plain subscription callback: the fast path (~100k records/s; ``stream_info``
with a subjects filter would stop at 100,000 subjects).

Every side uses this module: agents (whose writer, :class:`runctl.agent.steps.log.StepLog`,
appends completions), the gateway and the CLI (which list, explain and forget).

Why one module of this size: the stream's configuration, its fast read path and forgetting
must agree on one subject layout and one-message-per-subject rule; they are read together.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js import errors as js_errors

from runctl.bus.artifact_codec import run_prefix, step_prefix
from runctl.bus.artifact_store import ArtifactStore
from runctl.bus.errors import NotFound, RunctlError, Timeout, Unavailable, map_nats_error
from runctl.bus.replicas import replicas_from_env
from runctl.bus.steps.forget import Selector, covered, parse_selector, plan_forget
from runctl.bus.steps.records import (
    FORGOTTEN_ID,
    ForgetMarker,
    RunLog,
    decode_entry,
    encode_entry,
    scopes_for,
    step_label,
)
from runctl.bus.subjects import (
    check_token,
    step_record_subject,
    step_records_filter,
    steps_stream_subjects,
)

__all__ = [
    "DUPLICATE_WINDOW",
    "STREAM",
    "ForgetReport",
    "ensure_config",
    "ensure_stream",
    "fast_read",
    "forget",
    "read_log",
    "stream_config",
]

STREAM: Final = "RUNCTL_STEPS"
#: a read-back fails if the server sends nothing (not even a heartbeat) for this long
READ_IDLE_TIMEOUT: Final = 5.0
#: Nats-Msg-Id dedup window; a retry after it is still harmless (one message per subject)
DUPLICATE_WINDOW: Final = 120.0
_ERR_STREAM_CONFIG_DIFFERS: Final = 10058
_ERR_STREAM_NOT_FOUND: Final = 10059

log = structlog.get_logger()


# --- the stream ------------------------------------------------------------------------


def stream_config(*, replicas: int = 1, max_age: float = 0.0) -> api.StreamConfig:
    """The step stream's configuration: one record per subject, file storage, dedup."""
    return api.StreamConfig(
        name=STREAM,
        description="runctl completed-step log (latest record per step)",
        subjects=steps_stream_subjects(),
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        discard=api.DiscardPolicy.OLD,
        max_msgs_per_subject=1,
        max_age=max_age,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
        allow_direct=True,
        # a record is only ever forgotten by the purge API (the operator's): no login
        # deletes single records or rolls the stream up
        allow_rollup_hdrs=False,
        deny_delete=True,
    )


async def ensure_stream(
    js: JetStreamContext, *, replicas: int | None = None, max_age: float = 0.0
) -> None:
    """Create the stream, or update it when its config differs. Safe to race: the server
    accepts an identical create. ``replicas`` None: ``RUNCTL_REPLICAS``
    (:mod:`runctl.bus.replicas`), else 1 for a new stream and the existing stream's count
    (never scaled down unasked)."""
    asked = replicas if replicas is not None else replicas_from_env()

    def enforce(merged: api.StreamConfig) -> None:
        # Someone made it differently: enforce only what runctl relies on (its subjects,
        # one record per subject, dedup window, direct get); keep what an operator chose
        # (max_age, max_bytes, replicas unless asked), so agents never undo it.
        merged.max_msgs_per_subject = 1
        merged.duplicate_window = max(merged.duplicate_window or 0.0, DUPLICATE_WINDOW)
        merged.allow_direct = True
        if asked is not None:
            merged.num_replicas = asked
        if max_age:
            merged.max_age = max_age

    await ensure_config(js, stream_config(replicas=asked or 1, max_age=max_age), enforce)


async def ensure_config(
    js: JetStreamContext, config: api.StreamConfig, enforce: Callable[[api.StreamConfig], None]
) -> None:
    """Create a stream with ``config``; if it exists with another config, add ``config``'s
    subjects, let ``enforce`` set what runctl relies on in a copy of the existing config,
    and update it only if that changed anything. Safe to race: the server accepts an
    identical create."""
    name = config.name
    try:
        await js.add_stream(config)
    except js_errors.ServiceUnavailableError as exc:
        raise Unavailable("JetStream is not enabled on the NATS server (nats-server -js)") from exc
    except js_errors.BadRequestError as exc:
        if exc.err_code != _ERR_STREAM_CONFIG_DIFFERS:
            raise Unavailable(f"cannot create stream {name}: {exc.description}") from exc
        existing = (await js.stream_info(str(name))).config
        merged = copy.copy(existing)
        merged.subjects = sorted(set(existing.subjects or []) | set(config.subjects or []))
        enforce(merged)
        if merged == existing:
            return
        try:
            await js.update_stream(merged)
        except js_errors.APIError as upd:
            raise Unavailable(f"cannot update stream {name}: {upd.description}") from upd


# --- reading back ------------------------------------------------------------------------


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a big log is read back: the records are many
    small containers, and collections triggered by their allocation cost ~20% of the read
    (measured). Nested and concurrent uses are counted; the previous state is restored."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


class _Gap(Exception):
    """The push consumer skipped a message (slow consumer): read again."""


async def fast_read(
    nc: NATS,
    filters: list[str],
    on_entry: Callable[[str, bytes, int], None],
    *,
    idle_timeout: float = READ_IDLE_TIMEOUT,
    attempts: int = 3,
    stream: str = STREAM,
) -> int:
    """Deliver every stored message matching ``filters`` to ``on_entry(subject, data, seq)``
    in stream order; returns how many. A missing stream reads as empty. ``stream``: the
    step log's by default (the change journal reads its own the same way)."""
    for attempt in range(attempts):
        try:
            with _gc_paused():
                return await _read_once(nc, filters, on_entry, idle_timeout, stream)
        except _Gap:
            log.info("step log read skipped a message, reading again", attempt=attempt + 1)
    raise Unavailable(f"could not read the step log consistently in {attempts} attempts")


async def _read_once(
    nc: NATS,
    filters: list[str],
    on_entry: Callable[[str, bytes, int], None],
    idle_timeout: float,
    stream: str = STREAM,
) -> int:
    js = nc.jetstream()
    inbox = nc.new_inbox()
    finished = asyncio.Event()
    count = 0
    heartbeat = time.monotonic()
    failure: list[BaseException] = []

    async def callback(msg: Msg) -> None:
        nonlocal count, heartbeat
        if not msg.data and msg.headers and msg.headers.get("Status") == "100":
            heartbeat = time.monotonic()
            if msg.reply:  # flow control: everything before it has been processed
                with contextlib.suppress(Exception):
                    await nc.publish(msg.reply)
            return
        tokens = msg.reply.split(".")
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2
        # form with domain and account hash in front and a token at the end
        sseq, cseq, pending = (
            (tokens[5], tokens[6], tokens[8])
            if len(tokens) == 9
            else (tokens[7], tokens[8], tokens[10])
        )
        if int(cseq) != count + 1:
            failure.append(_Gap())
            finished.set()
            return
        count += 1
        try:
            on_entry(msg.subject, msg.data, int(sseq))
        except Exception as exc:  # a foreign message in our stream is not ours to read
            log.debug("unreadable step record skipped", subject=msg.subject, error=str(exc))
        if pending == "0":
            finished.set()

    sub = await nc.subscribe(
        inbox, cb=callback, pending_msgs_limit=1 << 21, pending_bytes_limit=1 << 29
    )
    config = api.ConsumerConfig(
        deliver_subject=inbox,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_policy=api.AckPolicy.NONE,
        max_deliver=1,
        flow_control=True,
        idle_heartbeat=1.0,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=30.0,
    )
    if len(filters) == 1:
        config.filter_subject = filters[0]
    else:
        config.filter_subjects = list(filters)
    name = ""
    try:
        try:
            info = await js.add_consumer(stream, config=config)
        except js_errors.NotFoundError as exc:
            if exc.err_code == _ERR_STREAM_NOT_FOUND:
                return 0
            raise
        name = info.name
        if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):
            return 0
        seen, progress = count, time.monotonic()
        while not finished.is_set():
            with anyio.move_on_after(min(1.0, idle_timeout)):
                await finished.wait()
            now = time.monotonic()
            if count != seen:
                seen, progress = count, now
            if not finished.is_set() and now - max(progress, heartbeat) > idle_timeout:
                raise Timeout(f"step log read stalled after {count} records")
        if failure:
            raise failure[0]
        return count
    finally:
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            if name:
                with anyio.move_on_after(1.0), contextlib.suppress(Exception):
                    await js.delete_consumer(stream, name)


async def read_log(nc: NATS, run: str, *, rank: str | None = None) -> RunLog:
    """The run's log: every scope, or ``rank``'s and the run-wide one."""
    check_token(run, "run")
    scopes = scopes_for(rank)
    filters = (
        [step_records_filter(run)]
        if scopes is None
        else [step_records_filter(run, s) for s in sorted(scopes)]
    )
    result = RunLog(run)

    def on_entry(subject: str, data: bytes, seq: int) -> None:
        result.add(seq, decode_entry(data))

    try:
        await fast_read(nc, filters, on_entry)
    except RunctlError:
        raise
    except Exception as exc:
        raise map_nats_error(exc, run=run) from exc
    return result


# --- forget ------------------------------------------------------------------------------


@dataclass(slots=True)
class ForgetReport:
    """What a forget removed: one marker per (scope, step name)."""

    run: str
    selector: str
    rank: str | None
    markers: list[ForgetMarker] = field(default_factory=list)
    #: objects (results, files) removed from the object store with the steps
    objects: int = 0

    @property
    def forgotten(self) -> int:
        """How many steps were forgotten in all."""
        return sum(mk.count for mk in self.markers)

    def to_json(self, limit: int = 1000) -> dict[str, Any]:
        """The report as the CLI's ``--json`` and the HTTP gateway return it (at most
        ``limit`` steps listed; the count is exact)."""
        listed = [
            {
                "scope": mk.scope,
                "step": step_label(mk.name, gone.key),
                "config_hash": gone.config_hash,
                "status": gone.status,
            }
            for mk in self.markers
            for gone in mk.forgotten
        ]
        return {
            "run": self.run,
            "selector": self.selector,
            "rank": self.rank,
            "forgotten": self.forgotten,
            "objects_deleted": self.objects,
            "steps": listed[:limit],
        }


async def forget(
    nc: NATS,
    run: str,
    selector: str | Selector | None,
    *,
    rank: str | None = None,
    by: str = "",
) -> ForgetReport:
    """Forget steps so they run again: ``selector`` ``name``, ``name:key``, either with ``+``
    (and every step started after it), or ``None`` for the whole run. ``rank`` limits it to
    that rank's log (``"run"``: the run-wide log); by default every scope of the run.

    Purges the records, then writes one :class:`ForgetMarker` per (scope, step name) on
    ``...done.<name>._forgotten``; live agents receive it and drop the steps from their
    in-memory done set; ``--explain`` reads it to say "forced".
    """
    check_token(run, "run")
    sel = parse_selector(selector) if isinstance(selector, str) else selector
    js = nc.jetstream()
    report = ForgetReport(run, "*" if sel is None else str(sel), rank)
    try:
        runlog = await read_log(nc, run)
        report.markers = plan_forget(runlog, sel, scopes=scopes_for(rank), by=by)
        prefixes: list[str] = []
        for marker in report.markers:
            if marker.all:
                prefixes.append(step_prefix(run, marker.scope, marker.name))
                await js.purge_stream(
                    STREAM, subject=step_records_filter(run, marker.scope, marker.name)
                )
                continue
            forgotten = [rec for _, rec in runlog.records.values() if covered(marker, rec)]
            prefixes += [step_prefix(run, rec.scope, rec.name, rec.id) for rec in forgotten]
            subjects = [step_record_subject(run, rec.scope, rec.name, rec.id) for rec in forgotten]
            for chunk in range(0, len(subjects), 256):  # pipelined: a big "+" is many purges
                await asyncio.gather(
                    *(js.purge_stream(STREAM, subject=s) for s in subjects[chunk : chunk + 256])
                )
        if report.markers:
            # everything stored up to here that a marker covers is purged (or newer than the
            # read, and then dropped by live agents too: it only runs again)
            upto = (await js.stream_info(STREAM)).state.last_seq
            for marker in report.markers:
                marker.upto_seq = upto
                await js.publish(
                    step_record_subject(run, marker.scope, marker.name, FORGOTTEN_ID),
                    encode_entry(marker),
                )
        report.objects = await _delete_objects(js, run, prefixes)
    except RunctlError:
        raise
    except Exception as exc:
        raise map_nats_error(exc, run=run) from exc
    return report


async def _delete_objects(js: JetStreamContext, run: str, prefixes: list[str]) -> int:
    """Remove the stored results and files of forgotten steps (every attempt's)."""
    if not prefixes:
        return 0
    try:
        store = await ArtifactStore.open(js, create=False)
    except NotFound:
        return 0  # nothing was ever stored
    deleted = 0
    for info in await store.list(run_prefix(run)):
        if info.name.startswith(tuple(prefixes)):
            deleted += await store.delete(info.name)
    return deleted
