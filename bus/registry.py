"""The rank registry: JetStream KV bucket ``RUNCTL_RANKS``.

Keys: ``<run>.<rank>`` holds a :class:`~bus.messages.RankRecord` (last state, heartbeat,
host, pid, status), rewritten by the agent after every change and on every heartbeat;
``<run>.<rank>.schema`` holds the model's JSON schema, written once at start.

Entries live ``ttl`` seconds after their last write (default 7 days), so a dead rank's last
state stays readable and is reported ``stale`` once its heartbeat is overdue.

Why one module of this size: the bucket's configuration, the batched read path and the
writes share one key layout and one decoding rule for unreadable records.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from runctl.bus.errors import UnreadableRecord
from runctl.bus.messages import (
    RankRecord,
    RunRecord,
    decode_record,
    decode_record_head,
    decode_run_record,
)
from runctl.bus.progress import Spread, is_stalled, step_spread
from runctl.bus.replicas import replicas_from_env
from runctl.bus.subjects import ALL, check_rank, check_token, rank_key

__all__ = [
    "ANSWERING",
    "BUCKET",
    "Liveness",
    "RankInfo",
    "Registry",
    "Scan",
    "allows_direct",
    "bucket_config",
    "caught_up",
    "create_bucket",
    "heartbeat_overdue",
    "latest_records",
    "liveness",
    "run_spread",
]

_T = TypeVar("_T")
BUCKET: Final = "RUNCTL_RANKS"
#: the stream that holds the bucket, and the subject prefix of its keys
STREAM: Final = f"KV_{BUCKET}"
KEY_PREFIX: Final = f"$KV.{BUCKET}."
DEFAULT_TTL: Final = 7 * 24 * 3600.0
#: a rank is stale once this many heartbeats are overdue
STALE_AFTER_BEATS: Final = 3.0
#: ... and at least this many seconds
STALE_FLOOR: Final = 1.5
#: seconds the server keeps a registry read's consumer after the read (see records())
WATCHER_LINGER: Final = 2.0
#: keys one batched direct get may return (the server's own cap may be lower: then the
#: batch fails and records() reads with a consumer instead)
DIRECT_BATCH: Final = 100_000
DIRECT_READ_TIMEOUT: Final = 5.0

#: alive: heartbeating and advancing; stalled: heartbeating (its agent answers) but its
#: program made no progress for longer than its threshold (bus/progress.py); stale: no
#: heartbeat for 3 periods (killed, hung, cut off); exited: it said goodbye
Liveness = Literal["alive", "stalled", "stale", "exited"]
#: the states in which a rank's agent answers commands
ANSWERING: Final[frozenset[str]] = frozenset({"alive", "stalled"})


def allows_direct(replicas: int) -> bool:
    """Direct gets (any replica answers) only where there is one copy: a follower of a
    replicated bucket may answer with an older record, and writers rely on reading their
    own writes (bus.Client)."""
    return replicas == 1


def bucket_config(replicas: int, *, ttl: float = DEFAULT_TTL) -> api.StreamConfig:
    """The registry's stream: what nats-py's ``create_key_value`` makes, except that it
    refuses rollups. A KV bucket allows them for its purge operation, and then any login
    that may write one key (every agent) can wipe every key, other runs' run-wide stops
    included, with one ``Nats-Rollup: all`` header. Single messages are never deleted
    either; forgetting a key is the purge API's (the operator's, :meth:`Registry.delete`)."""
    return api.StreamConfig(
        name=STREAM,
        description="runctl rank registry",
        subjects=[KEY_PREFIX + ">"],
        allow_direct=allows_direct(replicas),
        allow_rollup_hdrs=False,
        deny_delete=True,
        deny_purge=False,
        discard=api.DiscardPolicy.NEW,
        duplicate_window=min(120.0, ttl),
        max_age=ttl,
        max_consumers=-1,
        max_msgs=-1,
        max_msgs_per_subject=1,
        num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


async def create_bucket(
    js: JetStreamContext, replicas: int, *, ttl: float = DEFAULT_TTL
) -> KeyValue:
    """Create the registry bucket (:func:`bucket_config`). Two processes may race to
    create it: the same config is accepted by the server."""
    info = await js.add_stream(bucket_config(replicas, ttl=ttl))
    return KeyValue(
        name=BUCKET, stream=STREAM, pre=KEY_PREFIX, js=js, direct=bool(info.config.allow_direct)
    )


def liveness(record: RankRecord, now: float | None = None) -> Liveness:
    """A rank's status at ``now`` from its last record (see :data:`Liveness`)."""
    if record.status == "exited":
        return "exited"
    now = time.time() if now is None else now
    if heartbeat_overdue(record.heartbeat, record.heartbeat_interval, now):
        return "stale"
    return "stalled" if is_stalled(record.progress_ts, record.stall_after, now) else "alive"


def heartbeat_overdue(heartbeat: float, interval: float, now: float) -> bool:
    """No heartbeat for :data:`STALE_AFTER_BEATS` periods (at least 1.5 s)."""
    return now - heartbeat > max(STALE_AFTER_BEATS * interval, STALE_FLOOR)


@dataclass(frozen=True, slots=True)
class RankInfo:
    """A registry record plus what a reader derives from it."""

    record: RankRecord
    liveness: Liveness
    age: float

    @classmethod
    def of(cls, record: RankRecord, now: float | None = None) -> RankInfo:
        """``record`` as seen at ``now`` (default: the current time)."""
        now = time.time() if now is None else now
        return cls(record, liveness(record, now), max(0.0, now - record.heartbeat))

    @property
    def idle(self) -> float | None:
        """Seconds since the program last advanced (None: it never reported progress)."""
        if self.record.progress_ts is None:
            return None
        return max(0.0, self.record.heartbeat + self.age - self.record.progress_ts)

    def summary(self) -> dict[str, Any]:
        """The rank as ``runctl ls`` and ``GET /runs/<run>`` list it."""
        r = self.record
        idle = self.idle
        return {
            "run": r.run,
            "rank": r.rank,
            "status": self.liveness,
            "version": r.version,
            "heartbeat_age_s": round(self.age, 3),
            "host": r.host,
            "pid": r.pid,
            "started": r.started,
            "stop_requested": r.stop_requested,
            "model": r.model,
            "idle_s": None if idle is None else round(idle, 3),
            "stall_after_s": r.stall_after,
            "error": r.error,
        }


def run_spread(infos: list[RankInfo]) -> Spread:
    """How far the running ranks of a run are apart (exited and stale ranks left out)."""
    return step_spread((i.record.rank, i.record.step) for i in infos if i.liveness in ANSWERING)


class Registry:
    """The rank registry of one connection: reads and writes of rank and run records.

    Opened with :meth:`open`; ``direct`` says whether the bucket answers direct gets
    (then :meth:`records` reads a whole run with one batched request).
    """

    def __init__(self, nc: NATS, js: JetStreamContext, kv: KeyValue, *, direct: bool) -> None:
        self.nc = nc
        self.js = js  # the context ``kv`` was opened with: its acks share one inbox
        self.kv = kv
        self.direct = direct

    @classmethod
    async def open(cls, nc: NATS, *, create: bool = True, ttl: float = DEFAULT_TTL) -> Registry:
        """The registry on ``nc``; the bucket is created (``RUNCTL_REPLICAS`` copies, else
        one) when missing, unless ``create`` is False (then BucketNotFoundError)."""
        js = nc.jetstream()
        try:
            info = await js.stream_info(STREAM)
        except NotFoundError:
            if not create:
                raise BucketNotFoundError from None
            replicas = replicas_from_env() or 1
            kv = await create_bucket(js, replicas, ttl=ttl)
            return cls(nc, js, kv, direct=allows_direct(replicas))
        # what js.key_value() does, keeping the stream info it reads (one round trip)
        direct = bool(info.config.allow_direct)
        kv = KeyValue(name=BUCKET, stream=STREAM, pre=KEY_PREFIX, js=js, direct=direct)
        return cls(nc, js, kv, direct=direct)

    @staticmethod
    def key(run: str, rank: str) -> str:
        """The key of a rank's record: ``<run>.<rank>``, both checked."""
        return f"{check_token(run, 'run')}.{check_rank(rank, allow_all=False)}"

    async def put(self, record: RankRecord) -> int:
        """Write a rank's record and wait for the server; returns its revision."""
        return await self.kv.put(self.key(record.run, record.rank), msgspec.json.encode(record))

    async def put_nowait(self, record: RankRecord) -> asyncio.Future[Any]:
        """Send the write now (in call order) and return the future of the server's ack,
        so a caller can answer first and wait after. The future never times out by
        itself: bound the wait (a cancelled future frees its in-flight slot)."""
        subject = KEY_PREFIX + self.key(record.run, record.rank)
        return await self.js.publish_async(subject, msgspec.json.encode(record))

    async def put_acked_to(self, record: RankRecord, reply: str) -> None:
        """Send the write now; the server acknowledges it to ``reply`` (the writer's inbox,
        see bus/acks.py), not to this connection."""
        subject = KEY_PREFIX + self.key(record.run, record.rank)
        await self.nc.publish(subject, msgspec.json.encode(record), reply=reply)

    async def put_unacked(self, record: RankRecord) -> None:
        """Send the write now and ask for no acknowledgement (a heartbeat's: the next one
        makes good a lost one, and no ack wakes the rank for it): with no reply subject the
        server answers nobody."""
        await self.put_acked_to(record, reply="")

    async def put_schema(self, run: str, rank: str, schema: bytes) -> int:
        """Write the model's JSON schema of a rank (once, at start)."""
        return await self.kv.put(self.key(run, rank) + ".schema", schema)

    async def get(self, run: str, rank: str) -> RankRecord | None:
        """A rank's latest record, or None; :class:`UnreadableRecord` if it cannot be
        decoded."""
        key = self.key(run, rank)
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        if entry.value is None:
            return None
        return _decode(key, entry.value, decode_record)

    async def schema(self, run: str, rank: str) -> Any:
        """A rank's model schema (decoded JSON), or None."""
        try:
            entry = await self.kv.get(self.key(run, rank) + ".schema")
        except (KeyNotFoundError, NotFoundError):
            return None
        return msgspec.json.decode(entry.value) if entry.value else None

    async def put_run(self, record: RunRecord) -> int:
        """Write what applies to a whole run (key ``<run>.all``), e.g. a broadcast stop."""
        return await self.kv.put(
            f"{check_token(record.run, 'run')}.{ALL}", msgspec.json.encode(record)
        )

    async def put_run_nowait(self, record: RunRecord) -> asyncio.Future[Any]:
        """As :meth:`put_run`, returning the ack future instead of waiting for it."""
        subject = f"{KEY_PREFIX}{check_token(record.run, 'run')}.{ALL}"
        return await self.js.publish_async(subject, msgspec.json.encode(record))

    async def get_run(self, run: str) -> RunRecord | None:
        """The run's record, or None; :class:`UnreadableRecord` if it cannot be decoded
        (e.g. a stop recorded by a version that wrote ``grace: null``)."""
        key = f"{check_token(run, 'run')}.{ALL}"
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        return _decode(key, entry.value, decode_run_record) if entry.value else None

    async def clear_run(self, run: str) -> RunRecord | None:
        """Remove the run's record (a recorded run-wide stop): a rank that starts in the
        run afterwards is not stopped at once. Returns the record that was there."""
        record = await self.get_run(run)
        if record is not None:
            await self.delete_run(run)
        return record

    async def records(self, run: str | None = None, *, states: bool = True) -> list[RankRecord]:
        """Latest record of every rank (of one run), in one pass: a batched direct get
        where the bucket allows it, else an ordered consumer. Never N gets. Records that
        cannot be decoded are left out (:meth:`scan` names them). ``states=False``: each
        record's state is left as raw JSON (:class:`~runctl.bus.messages.RankRecordHead`),
        for readers that only need who is alive and at which version."""
        return (await self.scan(run, states=states)).records

    async def scan(self, run: str | None = None, *, states: bool = True) -> Scan:
        """As :meth:`records`, with the keys whose records could not be decoded: one bad
        record never hides the others."""
        pattern = f"{check_token(run, 'run')}.*" if run else "*.*"
        unreadable: list[UnreadableRecord] = []
        decoder = decode_record if states else decode_record_head
        records = await self._read_direct(pattern, unreadable, decoder)
        if records is None:
            unreadable.clear()
            records = await self._read_watching(pattern, unreadable, decoder)
        records.sort(key=lambda r: (r.run, rank_key(r.rank)))
        unreadable.sort(key=lambda u: u.key)
        return Scan(records, unreadable)

    async def _read_direct(
        self,
        pattern: str,
        unreadable: list[UnreadableRecord],
        decoder: Callable[[bytes], RankRecord],
    ) -> list[RankRecord] | None:
        """The last value of every key matching ``pattern`` from one batched direct get
        (``multi_last``, nats-server 2.11+): no consumer to create and delete, and one
        consistent cut of the store. None if the bucket does not allow direct gets or
        the server did not end the batch normally (too many keys, an older server)."""
        if not self.direct:
            return None
        nc = self.nc
        request = msgspec.json.encode({"multi_last": [KEY_PREFIX + pattern], "batch": DIRECT_BATCH})
        records: list[RankRecord] = []
        status: list[str] = []
        ended = anyio.Event()

        async def on_message(msg: Msg) -> None:
            headers = msg.headers or {}
            code = headers.get("Status")
            if code is not None:  # 204 EOB ends the batch; anything else fails it
                cut_short = headers.get("Nats-Num-Pending", "0") != "0"
                status.append("truncated" if code == "204" and cut_short else code)
                ended.set()
            else:
                key = headers.get("Nats-Subject", "").removeprefix(KEY_PREFIX)
                _take(key, msg.data, decoder, records, unreadable)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=on_message)
        try:
            await nc.publish(f"{api.DEFAULT_PREFIX}.DIRECT.GET.{STREAM}", request, reply=inbox)
            with anyio.move_on_after(DIRECT_READ_TIMEOUT):
                await ended.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
        if status == ["404"]:  # no key matches: an empty run, not a failure
            return []
        return records if status == ["204"] else None

    async def _read_watching(
        self,
        pattern: str,
        unreadable: list[UnreadableRecord],
        decoder: Callable[[bytes], RankRecord],
    ) -> list[RankRecord]:
        subjects: list[str] = []
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._list_subjects, pattern, subjects)
            records = await self._read_watched(pattern, unreadable, decoder)
        await self._add_skipped(records, subjects, unreadable)
        return records

    async def _read_watched(
        self,
        pattern: str,
        unreadable: list[UnreadableRecord],
        decoder: Callable[[bytes], RankRecord],
    ) -> list[RankRecord]:
        # The server keeps a stopped watcher's consumer until its inactive threshold (5 min
        # by default): at a few reads per second that hits the stream's consumer limit.
        watcher = await self.kv.watch(
            pattern, ignore_deletes=True, inactive_threshold=WATCHER_LINGER
        )
        entries: list[KeyValue.Entry] = []
        try:
            while True:
                entry = await watcher.updates(timeout=5.0)  # type: ignore[no-untyped-call]
                if entry is None:  # end of the initial values
                    break
                entries.append(entry)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return latest_records(entries, unreadable, decoder)

    async def _list_subjects(self, pattern: str, into: list[str]) -> None:
        info = await self.js.stream_info(STREAM, subjects_filter=KEY_PREFIX + pattern)
        into.extend(info.state.subjects or {})

    async def _add_skipped(
        self, records: list[RankRecord], subjects: list[str], unreadable: list[UnreadableRecord]
    ) -> None:
        """A key rewritten while the watcher's consumer is created can be left out of its
        initial values (nats-server 2.15, last-per-subject: ~5% of reads of a run whose
        ranks are answering a broadcast, i.e. writing their records, missed a rank). The
        stream's subject list (read at the same time) has every key: fetch the ones the
        watcher did not deliver."""
        seen = {(r.run, r.rank) for r in records} | {
            tuple(u.key.split(".")[-2:]) for u in unreadable
        }
        keys = [tuple(s.split(".")[-2:]) for s in subjects]
        missed = [(run, rank) for run, rank in keys if rank != ALL and (run, rank) not in seen]

        async def fetch(run: str, rank: str) -> None:
            try:
                record = await self.get(run, rank)  # None if deleted (purged keys stay listed)
            except UnreadableRecord as exc:
                unreadable.append(exc)
                return
            if record is not None:
                records.append(record)

        async with anyio.create_task_group() as tasks:
            for run, rank in missed:
                tasks.start_soon(fetch, run, rank)

    async def delete(self, run: str, rank: str) -> None:
        """Remove a rank's record and schema (the purge API: the bucket refuses rollups)."""
        key = self.key(run, rank)
        await self.js.purge_stream(STREAM, subject=KEY_PREFIX + key)
        await self.js.purge_stream(STREAM, subject=f"{KEY_PREFIX}{key}.schema")

    async def delete_run(self, run: str) -> None:
        """Remove a run's run-wide record (a recorded stop)."""
        await self.js.purge_stream(STREAM, subject=f"{KEY_PREFIX}{check_token(run, 'run')}.{ALL}")


@dataclass(frozen=True, slots=True)
class Scan:
    """What a registry read found: the records, and the keys it could not decode."""

    records: list[RankRecord]
    unreadable: list[UnreadableRecord]


def latest_records(
    entries: list[KeyValue.Entry],
    unreadable: list[UnreadableRecord],
    decoder: Callable[[bytes], _T],
) -> list[_T]:
    """The last record of every key among a watcher's ``entries``, in the order they came.

    A key rewritten while the watcher delivers its initial values comes twice: its
    rewrite is counted in the pending messages, so it arrives before the end of the
    initial values. The later entry is the newer one (the consumer delivers in stream
    order); it alone counts, so a rank is never listed twice. Keys whose last value
    cannot be decoded go to ``unreadable``; deleted keys and run-wide records are left out.
    """
    last: dict[str, KeyValue.Entry] = {}
    for entry in entries:
        last.pop(entry.key, None)  # re-insert: a key's place is where its last value came
        last[entry.key] = entry
    records: list[_T] = []
    for key, entry in last.items():
        _take(key, entry.value, decoder, records, unreadable)
    return records


def _take(
    key: str,
    value: bytes | None,
    decoder: Callable[[bytes], _T],
    records: list[_T],
    unreadable: list[UnreadableRecord],
) -> None:
    """Add the rank record ``value`` of ``key`` to ``records``, or name it in
    ``unreadable``. A deleted key (no value) and a run-wide record are not ranks."""
    if not value or key.endswith(f".{ALL}"):
        return
    try:
        records.append(_decode(key, value, decoder))
    except UnreadableRecord as exc:
        unreadable.append(exc)


def _decode(key: str, value: bytes, decoder: Callable[[bytes], _T]) -> _T:
    try:
        return decoder(value)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError is one too
        raise UnreadableRecord(key, str(exc)) from None


async def caught_up(
    registry: Registry, run: str, versions: dict[str, int], *, every: float = 0.001
) -> int:
    """Wait (unbounded: the caller bounds it) until the registry shows at least
    ``versions[rank]`` for each rank; returns how many reads it took. One rank is read
    with a get; several with one batched read of the run per attempt (a broadcast to 64
    ranks waits once for all of them, not rank after rank). A rank whose record is gone
    is not waited for."""
    behind = dict(versions)
    reads = 0
    while behind:
        reads += 1
        if len(behind) == 1:
            (rank,) = behind
            record = await registry.get(run, rank)
            seen = {} if record is None else {rank: record.version}
        else:
            seen = {r.rank: r.version for r in await registry.records(run, states=False)}
        behind = {
            rank: version
            for rank, version in behind.items()
            if rank in seen and seen[rank] < version
        }
        if behind:
            await anyio.sleep(every)
    return reads
