"""The ``with`` form of a step: ``with steps.step("merge", config=cfg) as s:`` (or
``async with``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

from runctl.agent.steps.core import Leave, Skips, StepCore, encode_result
from runctl.agent.steps.log import StepLog
from runctl.bus.artifact_codec import ArtifactRef, Encoded
from runctl.bus.artifact_store import Progress
from runctl.bus.canonical import Hashed
from runctl.bus.errors import CorruptArtifact
from runctl.bus.steps.records import StepRecord, step_label

__all__ = ["Step", "StoredFile"]


class StoredFile:
    """A file attached to a step, kept in the object store: ``download`` it anywhere.

    ``name``, ``size`` (bytes) and ``digest`` (SHA-256) describe it without fetching it.
    """

    def __init__(self, steps: StepCore, log: StepLog, ref: ArtifactRef, name: str) -> None:
        self._steps, self._log, self.ref, self.name = steps, log, ref, name

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self.ref.size

    @property
    def digest(self) -> str:
        """The file's SHA-256, as stored (checked when it is read back)."""
        return self.ref.digest

    def download(self, path: str | os.PathLike[str], progress: Progress | None = None) -> Path:
        """Stream the file to ``path`` (chunk by chunk, never whole in memory), verified
        against its digest before it gets that name; returns the path.
        ``progress(done_bytes, total_bytes)`` is called after every chunk."""
        return self._steps._call(
            self._log, self._log.download(self.ref, Path(path), progress), None
        )

    async def adownload(
        self, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> Path:
        """``await``-able :meth:`download`."""
        return await self._steps._acall(
            self._log, self._log.download(self.ref, Path(path), progress)
        )

    def __repr__(self) -> str:
        return f"<StoredFile {self.name} {self.size} bytes>"


class Step:
    """``with steps.step(name, key, config=...) as s:``

    ``s.done`` is True when the step was already done (``s.result`` then holds its logged
    result): the body still runs, so check it, or call ``s.skip()`` to leave the block.
    Otherwise the step is marked done when the block ends without an exception, with
    ``s.result`` (set it in the body) as its result; ``s.done`` then says whether the server
    acknowledged it. An exception marks the attempt failed and propagates.
    """

    def __init__(
        self,
        steps: StepCore,
        name: str,
        key: Any,
        cfg: Hashed,
        scope: str,
        wait: bool,
        pickle: bool = False,
    ) -> None:
        self._steps = steps
        self.name = name
        self.key = key
        self.scope = scope
        self._cfg = cfg
        self._wait = wait
        self.done = False
        self.was_done = False
        self.result: Any = None
        self.record: StepRecord | None = None
        self._running: StepRecord | None = None
        self._log: StepLog | None = None
        self._pickle = pickle
        self._attached: dict[str, ArtifactRef] = {}
        self._encoded: Encoded | None = None

    def skip(self) -> NoReturn:
        """Leave the ``with`` block now. A step that was not done stays not done."""
        raise Leave(self)

    @property
    def files(self) -> Mapping[str, StoredFile]:
        """The files of this step: those a done step stored, or those attached so far."""
        refs = self.record.files if self.was_done and self.record is not None else self._attached
        if self._log is None:
            return {}
        return {name: StoredFile(self._steps, self._log, ref, name) for name, ref in refs.items()}

    def attach(
        self,
        path: str | os.PathLike[str],
        name: str | None = None,
        progress: Progress | None = None,
    ) -> StoredFile:
        """Store the file at ``path`` with this step (streamed, chunk by chunk), under
        ``name`` (default: the file's own name). A later run, on any host, gets it back
        from ``s.files[name].download(...)``. Only while the step runs."""
        if self._running is None or self._log is None:
            raise RuntimeError("attach() stores files of a step that is running: this one is not")
        source = Path(path)
        file_name = name or source.name
        ref = self._steps._call(
            self._log, self._log.put_file(self._running, file_name, source, progress), None
        )
        self._attached[file_name] = ref
        return StoredFile(self._steps, self._log, ref, file_name)

    def _enter(self, log: StepLog) -> tuple[StepRecord | None, Skips]:
        self._log = log
        knorm, khash = self._steps._key(self.key)
        skips = Skips(log, self.name, self.scope)
        logged, self._running = self._steps._start(log, skips, knorm, khash, self._cfg)
        return logged, skips

    def _entered(self, logged: StepRecord, result: Any, skips: Skips) -> Step:
        self.done = self.was_done = True
        self.record = logged
        self.result = result
        skips.flush()
        return self

    def _redo(self, logged: StepRecord, skips: Skips, error: Exception) -> Step:
        assert self._log is not None
        self._steps._damaged(self._log, logged, error)
        skips.count, skips.keys = 0, []
        knorm, khash = self._steps._key(self.key)
        _, self._running = self._steps._start(self._log, skips, knorm, khash, self._cfg, redo=True)
        return self

    def _exit(self, exc: BaseException | None) -> tuple[bool, StepRecord | None]:
        """(suppress the exception?, record to complete)."""
        leaving = isinstance(exc, Leave) and exc.step is self
        if self.was_done or self._running is None:
            return leaving, None
        assert self._log is not None
        if exc is not None:
            self._steps._fail(self._log, self._running, exc)
            return leaving, None
        try:
            self.result, self._encoded = encode_result(self.result, pickle_ok=self._pickle)
        except (TypeError, ValueError) as error:
            self._steps._fail(self._log, self._running, error)
            raise
        return False, self._running

    def __enter__(self) -> Step:
        logged, skips = self._enter(self._steps._log())
        if logged is None:
            return self
        assert self._log is not None
        try:
            result = self._steps._load(self._log, logged, self._pickle)
        except CorruptArtifact as error:
            return self._redo(logged, skips, error)
        return self._entered(logged, result, skips)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        suppress, rec = self._exit(exc)
        if rec is not None:
            assert self._log is not None
            self.done = self._steps._finish(
                self._log, rec, self._encoded, self._wait, self._attached
            )
            self.record = rec
        return suppress

    async def __aenter__(self) -> Step:
        logged, skips = self._enter(await self._steps._alog())
        if logged is None:
            return self
        assert self._log is not None
        try:
            result = await self._steps._aload(self._log, logged, self._pickle)
        except CorruptArtifact as error:
            return self._redo(logged, skips, error)
        return self._entered(logged, result, skips)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        suppress, rec = self._exit(exc)
        if rec is not None:
            assert self._log is not None
            self.done = await self._steps._afinish(
                self._log, rec, self._encoded, self._wait, self._attached
            )
            self.record = rec
        return suppress

    def __repr__(self) -> str:
        return f"<Step {step_label(self.name, self.key)} scope={self.scope} done={self.done}>"
