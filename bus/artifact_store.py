"""Step results and files on JetStream's object store (bucket ``RUNCTL_ARTIFACTS``).

The object store chunks every object (128 KiB messages), keeps its SHA-256 digest and is
replicated like the step stream (``RUNCTL_REPLICAS``). Objects are named by
:func:`runctl.bus.artifact_codec.object_name`: ``<run>/<scope>/<step>/<record id>/<part>``,
so a run's or a step's objects are found by prefix.

Every read is checked twice: against the digest the object store recorded while the
chunks were written (nats-py checks it as the chunks arrive), and against the digest the
step record holds (:class:`ArtifactRef`), so an object replaced or damaged after the step
completed is reported as :class:`CorruptArtifact`, never returned.

Files are streamed both ways: an upload reads the file chunk by chunk, a download writes
each chunk as it arrives into ``<path>.partial`` and renames it only once the digest
matched. Neither holds the whole file in memory.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import structlog
from nats.js import JetStreamContext, api
from nats.js import errors as js_errors
from nats.js.object_store import ObjectStore

from runctl.bus.artifact_codec import ArtifactRef, Codec
from runctl.bus.errors import CorruptArtifact, NotFound

__all__ = [
    "BUCKET",
    "DEFAULT_TTL",
    "STREAM",
    "ArtifactInfo",
    "ArtifactStore",
    "Progress",
    "stream_config",
]

BUCKET: Final = "RUNCTL_ARTIFACTS"
#: how long a run's objects are kept (30 days); ``RUNCTL_ARTIFACT_TTL`` (seconds) changes it
#: for a bucket created from then on
DEFAULT_TTL: Final = 30 * 24 * 3600.0
TTL_ENV: Final = "RUNCTL_ARTIFACT_TTL"

#: ``progress(done_bytes, total_bytes)`` after every chunk (total is 0 when unknown)
Progress = Callable[[int, int], None]

log = structlog.get_logger()


@dataclass(frozen=True)
class ArtifactInfo:
    """One stored object, as listed."""

    name: str
    size: int
    digest: str
    mtime: str


class _CountingReader(io.RawIOBase):
    """A file reader that reports progress as the object store pulls chunks from it."""

    def __init__(self, file: io.BufferedReader, total: int, progress: Progress | None) -> None:
        self._file = file
        self._total = total
        self._done = 0
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._file.readinto(buffer)
        self._done += n
        if self._progress is not None and n:
            self._progress(self._done, self._total)
        return n


class _CountingWriter(io.RawIOBase):
    """A file writer that reports progress as chunks arrive."""

    def __init__(self, file: io.BufferedWriter, total: int, progress: Progress | None) -> None:
        self._file = file
        self._total = total
        self._done = 0
        self._progress = progress

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        n = self._file.write(data)
        self._done += n
        if self._progress is not None:
            self._progress(self._done, self._total)
        return n


def _ttl_from_env() -> float:
    text = os.environ.get(TTL_ENV, "").strip()
    if not text:
        return DEFAULT_TTL
    try:
        ttl = float(text)
    except ValueError:
        raise ValueError(f"{TTL_ENV}={text[:20]!r} is not a number of seconds") from None
    if not ttl > 0 or ttl == float("inf"):
        raise ValueError(f"{TTL_ENV} must be a positive number of seconds, not {text[:20]!r}")
    return ttl


STREAM: Final = f"OBJ_{BUCKET}"


def stream_config(*, replicas: int = 1, ttl: float = DEFAULT_TTL) -> api.StreamConfig:
    """The store's stream: what nats-py's ``create_object_store`` makes, except that it
    refuses rollups and message deletes. An object store allows rollups (its metadata
    records carry ``Nats-Rollup: sub``), and then any login that may store an object (every
    agent) could wipe every stored object with one ``Nats-Rollup: all`` header. Objects
    are removed with the purge API (the operator's, when steps are forgotten)."""
    return api.StreamConfig(
        name=STREAM,
        description="runctl step results, attached files and checkpoints",
        subjects=[f"$O.{BUCKET}.C.>", f"$O.{BUCKET}.M.>"],
        max_age=ttl,
        max_bytes=-1,
        max_consumers=0,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        discard=api.DiscardPolicy.NEW,
        allow_rollup_hdrs=False,
        deny_delete=True,
        allow_direct=True,
    )


class _WithoutRollups:
    """The JetStream context nats-py's object store publishes through, minus the
    ``Nats-Rollup`` header of its metadata records (the stream refuses it). Names are
    never reused (every attempt stores under names of its own), so there is no older
    record to roll up; were one rewritten, readers take its last record anyway."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, subject: str, payload: bytes = b"", **kwargs: Any) -> api.PubAck:
        headers = kwargs.pop("headers", None)
        if headers:
            headers = {k: v for k, v in headers.items() if k != api.Header.ROLLUP} or None
        return await self._js.publish(subject, payload, headers=headers, **kwargs)


class ArtifactStore:
    """The ``RUNCTL_ARTIFACTS`` object store. Open with :meth:`open`."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, replicas: int | None = None, create: bool = True
    ) -> ArtifactStore:
        """The bucket, created on first use (file storage, ``replicas`` copies, TTL).

        Raises :class:`NotFound` when it does not exist and ``create`` is false.
        """
        try:
            await js.object_store(BUCKET)
        except js_errors.BucketNotFoundError:
            if not create:
                raise NotFound("", message="no step results or files were stored yet") from None
            await js.add_stream(stream_config(replicas=replicas or 1, ttl=_ttl_from_env()))
        # nats-py's store, publishing through a context that drops the rollup header
        without = cast(JetStreamContext, _WithoutRollups(js))
        return cls(ObjectStore(name=BUCKET, stream=STREAM, js=without))

    async def put_bytes(self, name: str, data: bytes, codec: Codec) -> ArtifactRef:
        """Store ``data`` as ``name``; the reference to keep in the step record."""
        info = await self._store.put(name, data)
        return ArtifactRef(
            name=name, size=int(info.size or 0), digest=str(info.digest), codec=codec
        )

    async def put_file(
        self, name: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> ArtifactRef:
        """Stream the file at ``path`` into the store, chunk by chunk."""
        source = Path(path)
        # opening and stat are microseconds; the reads themselves run in nats-py's executor
        total = source.stat().st_size  # noqa: ASYNC240
        with source.open("rb") as file:  # noqa: ASYNC230
            reader = _CountingReader(file, total, progress)
            info = await self._store.put(name, io.BufferedReader(reader))
        return ArtifactRef(
            name=name, size=int(info.size or 0), digest=str(info.digest), codec="bytes"
        )

    async def _check(self, ref: ArtifactRef) -> None:
        try:
            info = await self._store.get_info(ref.name)
        except js_errors.NotFoundError:
            raise CorruptArtifact(ref.name, "is missing from the object store") from None
        if info.digest != ref.digest or int(info.size or 0) != ref.size:
            raise CorruptArtifact(ref.name, "was replaced after the step completed")

    async def get_bytes(self, ref: ArtifactRef) -> bytes:
        """The object's bytes, verified against the store's and the record's digest."""
        await self._check(ref)
        buffer = io.BytesIO()
        try:
            await self._store.get(ref.name, writeinto=buffer)
        except js_errors.DigestMismatchError:
            raise CorruptArtifact(ref.name, "does not match its digest") from None
        except js_errors.NotFoundError:
            raise CorruptArtifact(ref.name, "is missing from the object store") from None
        data = buffer.getvalue()
        if len(data) != ref.size:
            raise CorruptArtifact(ref.name, f"has {len(data)} bytes, the record says {ref.size}")
        return data

    async def download(
        self,
        ref: ArtifactRef,
        path: str | os.PathLike[str],
        progress: Progress | None = None,
    ) -> Path:
        """Stream the object into ``path`` (via ``<path>.partial``, renamed once verified)."""
        await self._check(ref)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("wb") as file:
                # the object store writes into a buffered writer: flushed here, before the
                # file closes, or the object's last bytes could stay in its buffer
                buffered = io.BufferedWriter(_CountingWriter(file, ref.size, progress))
                await self._store.get(ref.name, writeinto=buffered)
                buffered.flush()
            written = partial.stat().st_size
            if written != ref.size:
                partial.unlink(missing_ok=True)
                raise CorruptArtifact(ref.name, f"{written} bytes came, {ref.size} were stored")
        except js_errors.DigestMismatchError:
            partial.unlink(missing_ok=True)
            raise CorruptArtifact(ref.name, "does not match its digest") from None
        except BaseException:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            raise
        os.replace(partial, target)
        return target

    async def ref(self, name: str) -> ArtifactRef:
        """A reference to the object stored now under ``name`` (to download it by name)."""
        try:
            info = await self._store.get_info(name)
        except js_errors.NotFoundError:
            raise NotFound("", message=f"no stored object {name!r}") from None
        return ArtifactRef(name=name, size=int(info.size or 0), digest=str(info.digest))

    async def list(self, prefix: str = "") -> list[ArtifactInfo]:
        """Stored objects whose name starts with ``prefix``, by name."""
        try:
            infos = await self._store.list(ignore_deletes=True)
        except js_errors.NotFoundError:
            return []
        found = [
            ArtifactInfo(
                name=str(info.name),
                size=int(info.size or 0),
                digest=str(info.digest or ""),
                mtime=str(info.mtime or ""),
            )
            for info in infos
            if info.name and str(info.name).startswith(prefix) and not info.deleted
        ]
        return sorted(found, key=lambda info: info.name)

    async def delete(self, name: str) -> bool:
        """Delete one object; False when there was none."""
        try:
            await self._store.delete(name)
        except js_errors.NotFoundError:
            return False
        return True

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose name starts with ``prefix``; how many were deleted."""
        if not prefix:
            raise ValueError("refusing to delete every object: give a prefix")
        deleted = 0
        for info in await self.list(prefix):
            deleted += await self.delete(info.name)
        return deleted
