"""The plumbing under :class:`runctl.agent.steps.Steps`: identities, records, waiting for
the agent, crossing to its event loop.

Every form of the step API (loop, ``with``, decorator, ``done``), sync or async, runs an
item through the same three calls: :meth:`StepCore._start` (is it done? if not, log the
attempt as started), then :meth:`StepCore._fail` or :meth:`StepCore._finish` /
:meth:`StepCore._afinish`. Every network wait goes through :meth:`StepCore._call` (from the
program's thread) or :meth:`StepCore._acall` (from a coroutine), both bounded by the step
log's PubAck wait.

The API reads the agent through :class:`StepHost` (what an agent is to its steps), so it
does not import the agent that holds it.

Why one module of this size: every form of the step API shares these few calls, and their
sync and async halves must stay side by side so that they keep the same order of waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Coroutine, Iterable
from pathlib import PurePath
from types import TracebackType
from typing import Any, Final, Literal, Protocol, TypeVar

import anyio
import msgspec

from runctl.agent.progress import Progress
from runctl.agent.steps.log import StepLog
from runctl.bus.artifact_codec import INLINE_LIMIT, ArtifactRef, Encoded, decode_value, encode_value
from runctl.bus.canonical import DEFAULT_IGNORE_PREFIX, Hashed, hashed, key_digest
from runctl.bus.errors import Unavailable
from runctl.bus.steps.records import LEFT_EARLY, LEFT_WITH_SKIP, StepRecord, step_id
from runctl.bus.subjects import RUN_SCOPE

__all__ = [
    "RESULT_LIMIT",
    "Scope",
    "Skips",
    "StepCore",
    "StepHost",
    "aiter_any",
    "default_key",
    "encode_result",
]

T = TypeVar("T")
#: files attached to an attempt, by name
Files = dict[str, ArtifactRef] | None
#: ``"rank"``: this rank's own log; ``"run"``: one log for every rank of the run
Scope = Literal["rank", "run"]
#: largest result kept inside its record (encoded JSON); larger ones, and results that are
#: not JSON, go to the object store (:mod:`runctl.bus.artifact_codec`)
RESULT_LIMIT: Final = INLINE_LIMIT
#: no result: nothing to store
_NO_RESULT: Final = Encoded(codec="json", inline=None)
#: no config: the empty object, hashed once
_NO_CONFIG: Final = hashed({})


class StepHost(Protocol):
    """What the step API needs of its agent (:class:`runctl.agent.Agent` is one)."""

    @property
    def run(self) -> str:
        """The run id."""

    @property
    def rank(self) -> str:
        """The rank: the scope of ``scope="rank"`` steps."""

    @property
    def host(self) -> str:
        """The host name, recorded with each attempt."""

    @property
    def pid(self) -> int:
        """The process id, recorded with each attempt."""

    @property
    def url(self) -> str | None:
        """The NATS URL (for error messages)."""

    @property
    def ready(self) -> threading.Event:
        """Set once connected and the step log is loaded (or failed to load)."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The agent's event loop, where the log's coroutines run."""

    @property
    def steplog(self) -> StepLog | None:
        """The loaded log, or None."""

    @property
    def steplog_error(self) -> str:
        """Why the log could not be loaded, if it could not."""

    @property
    def progress(self) -> Progress:
        """Where a started step counts as the program advancing (stall detection)."""


class Leave(Exception):
    """Raised by :meth:`runctl.agent.steps.Step.skip` to leave a ``with`` block; caught
    by that Step."""

    def __init__(self, step: object) -> None:
        super().__init__("step skipped")
        self.step = step


class StepCore:
    """What :class:`runctl.agent.steps.Steps` is built on."""

    def __init__(self, agent: StepHost) -> None:
        self._agent = agent
        #: config keys (and cached-function arguments) starting with this are not hashed
        self.ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX
        #: how long the first call waits for the agent to connect and load the log
        self.ready_timeout = 30.0

    # --- identities ----------------------------------------------------------------------

    def _scope(self, scope: str) -> str:
        if scope == "rank":
            return self._agent.rank
        if scope == "run":
            return RUN_SCOPE
        raise ValueError(f"scope must be 'rank' or 'run', not {scope!r}")

    def _config(self, config: Any) -> Hashed:
        if config is None:
            return _NO_CONFIG
        return hashed(config, ignore_prefix=self.ignore_prefix)

    def _key(self, key: Any) -> tuple[Any, str]:
        """(normalised key, key hash)."""
        return key_digest(key, ignore_prefix=self.ignore_prefix)

    def _sid(self, name: str, key: Any, config: Any) -> str:
        return step_id(name, self._key(key)[1], self._config(config).hash)

    # --- the log ---------------------------------------------------------------------------

    def _log(self) -> StepLog:
        """The open log, waiting (at most ``ready_timeout``) for the agent to load it."""
        log = self._agent.steplog
        if log is not None and not log.closed:
            return log
        agent = self._agent
        if not agent.ready.is_set():
            running = _running_loop()
            if running is not None and running is agent.loop:
                # blocking here would hold up the very loop the agent needs to get ready
                raise RuntimeError(
                    "the agent is not ready yet: in async code use the async "
                    "forms (aiter / async with / adone), which wait for it"
                )
            agent.ready.wait(self.ready_timeout)
        return self._opened()

    async def _alog(self) -> StepLog:
        agent = self._agent
        if agent.steplog is None and not agent.ready.is_set():
            with anyio.move_on_after(self.ready_timeout):
                while not agent.ready.is_set():  # noqa: ASYNC110 - a threading.Event
                    await anyio.sleep(0.01)
        return self._opened()

    def _opened(self) -> StepLog:
        agent = self._agent
        if agent.steplog is not None:
            if agent.steplog.closed:
                raise Unavailable("the runctl agent is closed: no more steps can be logged")
            return agent.steplog
        if not agent.ready.is_set():
            raise Unavailable(
                f"runctl agent not connected after {self.ready_timeout:g}s "
                f"(url {agent.url}): the step log is not loaded"
            )
        raise Unavailable(f"the step log is unavailable: {agent.steplog_error or 'not open'}")

    def _call(self, log: StepLog, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        """Run ``coro`` on the agent's loop from the program's thread."""
        assert log.loop is not None
        if _running_loop() is log.loop:
            coro.close()
            raise RuntimeError(
                "called from the agent's event loop: use the async form "
                "(aiter / async with / adone / aforget / aflush)"
            )
        return asyncio.run_coroutine_threadsafe(coro, log.loop).result(timeout)

    async def _acall(self, log: StepLog, coro: Coroutine[Any, Any, T]) -> T:
        assert log.loop is not None
        if asyncio.get_running_loop() is log.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, log.loop))

    # --- one item: start, then fail or finish ---------------------------------------------

    def _start(
        self,
        log: StepLog,
        skips: Skips,
        knorm: Any,
        khash: str,
        cfg: Hashed,
        *,
        redo: bool = False,
    ) -> tuple[StepRecord | None, StepRecord | None]:
        """(the logged record, None) when the item is done: counted as skipped; else
        (None, the attempt now logged as started). ``redo``: start a new attempt even
        though the step is done (its stored result was found damaged)."""
        name, scope = skips.name, skips.scope
        prev = log.lookup(scope, step_id(name, khash, cfg.hash))
        if prev is not None and prev[1].status == "done" and not redo:
            skips.add(knorm)
            return prev[1], None
        skips.flush()  # the skip events come before this step's start
        self._agent.progress.tick()  # a step started: the program advances
        rec = self._record(scope, name, knorm, khash, cfg, prev)
        log.note(rec)
        log.event(
            "step_started",
            name=name,
            key=knorm,
            scope=scope,
            attempt=rec.attempt,
            previous=prev[1].status if prev is not None else None,
        )
        return None, rec

    def _record(
        self,
        scope: str,
        name: str,
        knorm: Any,
        khash: str,
        cfg: Hashed,
        prev: tuple[int, StepRecord] | None,
        result: Any = None,
    ) -> StepRecord:
        """A new attempt at a step, started now."""
        agent = self._agent
        return StepRecord(
            run=agent.run,
            scope=scope,
            name=name,
            key_hash=khash,
            config_hash=cfg.hash,
            status="started",
            started=time.time(),
            key=knorm,
            config=cfg.value,
            result=result,
            attempt=prev[1].attempt + 1 if prev is not None else 1,
            rank=agent.rank,
            host=agent.host,
            pid=agent.pid,
        )

    def _fail(self, log: StepLog, rec: StepRecord, exc: BaseException | str) -> None:
        if isinstance(exc, GeneratorExit):
            error = LEFT_EARLY
        elif isinstance(exc, Leave):
            error = LEFT_WITH_SKIP
        elif isinstance(exc, BaseException):
            error = f"{type(exc).__name__}: {exc}"[:500]
        else:
            error = exc
        ended = time.time()
        failed = msgspec.structs.replace(
            rec, status="failed", ended=ended, duration=ended - rec.started, error=error
        )
        try:
            log.note(failed)
            log.event("step_failed", name=rec.name, key=rec.key, scope=rec.scope, error=error)
        except RuntimeError:  # the agent's loop is gone (interpreter exit): nothing to tell
            pass

    def _failing(self, log: StepLog, rec: StepRecord) -> _Failing:
        """``with self._failing(log, rec):`` marks ``rec`` failed if the block raises
        (a ``break`` out of a step loop included: GeneratorExit), and re-raises."""
        return _Failing(self, log, rec)

    def _ended(self, rec: StepRecord, result: Any) -> StepRecord:
        ended = time.time()
        return msgspec.structs.replace(
            rec, status="done", ended=ended, duration=ended - rec.started, result=result
        )

    def _completed(
        self, rec: StepRecord, encoded: Encoded, ref: ArtifactRef | None, files: Files
    ) -> StepRecord:
        done = self._ended(rec, encoded.inline if ref is None else None)
        if ref is None and not files:
            return done
        return msgspec.structs.replace(done, artifact=ref, files=dict(files or {}))

    def _finish(
        self,
        log: StepLog,
        rec: StepRecord,
        encoded: Encoded | None,
        wait: bool,
        files: Files = None,
    ) -> bool:
        """Log ``rec`` as done; with ``wait``, True once the server acknowledged it.

        A result that does not fit in the record is stored first (the program waits for
        that, whatever ``wait`` says: the record must never point at a missing object)."""
        encoded = encoded or _NO_RESULT
        ref = None
        if not encoded.is_inline:
            ref = self._call(log, log.put_result(rec, encoded), None)
        done = self._completed(rec, encoded, ref, files)
        if not wait:
            log.submit(done)
            return False
        try:
            return self._call(log, log.complete(done), log.ack_timeout + 5.0)
        except concurrent.futures.TimeoutError:
            return False

    async def _afinish(
        self,
        log: StepLog,
        rec: StepRecord,
        encoded: Encoded | None,
        wait: bool,
        files: Files = None,
    ) -> bool:
        """As :meth:`_finish`, from a coroutine."""
        encoded = encoded or _NO_RESULT
        ref = None
        if not encoded.is_inline:
            ref = await self._acall(log, log.put_result(rec, encoded))
        done = self._completed(rec, encoded, ref, files)
        if not wait:
            log.submit(done)
            return False
        return await self._acall(log, log.complete(done))

    # --- results kept in the object store -------------------------------------------------

    def _load(self, log: StepLog, rec: StepRecord, pickle_ok: bool) -> Any:
        """A done step's result, fetched (and verified) when it lives in the object store.
        Raises :class:`~runctl.bus.errors.CorruptArtifact` for a missing or damaged one."""
        if rec.artifact is None:
            return rec.result
        data = self._call(log, log.get_artifact(rec.artifact), None)
        return decode_value(rec.artifact.codec, data, pickle_ok=pickle_ok)

    async def _aload(self, log: StepLog, rec: StepRecord, pickle_ok: bool) -> Any:
        """As :meth:`_load`, from a coroutine."""
        if rec.artifact is None:
            return rec.result
        data = await self._acall(log, log.get_artifact(rec.artifact))
        return decode_value(rec.artifact.codec, data, pickle_ok=pickle_ok)

    def _damaged(self, log: StepLog, rec: StepRecord, error: Exception) -> None:
        """Say that a done step's stored result is unusable, so it runs again."""
        log.log.warning("stored step result unusable, running the step again", error=str(error))
        log.event(
            "step_result_damaged", name=rec.name, key=rec.key, scope=rec.scope, error=str(error)
        )


# --- helpers ---------------------------------------------------------------------------


class _Failing:
    __slots__ = ("core", "log", "rec")

    def __init__(self, core: StepCore, log: StepLog, rec: StepRecord) -> None:
        self.core, self.log, self.rec = core, log, rec

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self.core._fail(self.log, self.rec, exc)


class Skips:
    """Batches ``step_skipped`` events of one step: one per run of consecutive skipped
    items."""

    __slots__ = ("count", "keys", "log", "name", "scope")

    def __init__(self, log: StepLog, name: str, scope: str) -> None:
        self.log, self.name, self.scope = log, name, scope
        self.count = 0
        self.keys: list[Any] = []

    def add(self, key: Any) -> None:
        """Count one skipped item (the first ten keys are listed)."""
        self.count += 1
        if len(self.keys) < 10:
            self.keys.append(key)

    def flush(self) -> None:
        """Publish the event for the items counted so far, if any."""
        if self.count:
            self.log.event(
                "step_skipped",
                name=self.name,
                scope=self.scope,
                count=self.count,
                keys=self.keys,
                reason="done",
            )
            self.count = 0
            self.keys = []


def default_key(item: Any, position: int) -> Any:
    """A loop item's key: the item itself if it is a str/int/bool/None, a finite float or
    a path, else its position."""
    if item is None or isinstance(item, str | int | bool):
        return item
    if isinstance(item, float) and math.isfinite(item):
        return item
    if isinstance(item, PurePath):
        return str(item)
    return position


def encode_result(result: Any, *, pickle_ok: bool = False) -> tuple[Any, Encoded]:
    """(what the program gets back now, the result encoded for the log).

    What it gets back is what a rerun gets: small JSON as its JSON round trip (tuples
    become lists), a large JSON value likewise, bytes, arrays and tensors as themselves.
    Raises :class:`TypeError` for a value with no safe codec (see
    :func:`runctl.bus.artifact_codec.encode_value`)."""
    if result is None:
        return None, _NO_RESULT
    encoded = encode_value(result, pickle_ok=pickle_ok)
    if encoded.is_inline:
        return encoded.inline, encoded
    if encoded.codec == "json":
        assert encoded.data is not None
        return msgspec.json.decode(encoded.data), encoded
    return result, encoded


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def aiter_any(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    """Iterate ``items`` asynchronously, whether it is an iterable or an async iterable."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
