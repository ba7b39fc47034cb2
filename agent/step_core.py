"""The plumbing under :mod:`runctl.agent.steps`: identities, records, waiting for the agent,
crossing to its event loop, and the ``with`` form (:class:`Step`).

Every network wait goes through :meth:`StepCore._call` (from the program's thread) or
:meth:`StepCore._acall` (from a coroutine), both bounded by the step log's PubAck wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import PurePath
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeVar

import anyio
import msgspec

from runctl.bus.canonical import DEFAULT_IGNORE_PREFIX, Hashed, hashed, key_digest
from runctl.bus.errors import Unavailable
from runctl.bus.steplog import StepLog
from runctl.bus.steprecords import StepRecord, step_label
from runctl.bus.subjects import RUN_SCOPE, check_token

if TYPE_CHECKING:
    from runctl.agent.agent import Agent

__all__ = [
    "RESULT_LIMIT",
    "Scope",
    "Skips",
    "Step",
    "StepCore",
    "aiter_any",
    "default_key",
    "jsonable",
]

T = TypeVar("T")
Scope = Literal["rank", "run"]
#: largest logged result (encoded); store big outputs in files and return their path
RESULT_LIMIT: Final = 256 * 1024
#: no config: the empty object, hashed once
_NO_CONFIG: Final = hashed({})


class _Leave(Exception):
    """Raised by :meth:`Step.skip` to leave a ``with`` block; caught by that Step."""

    def __init__(self, step: Step) -> None:
        super().__init__("step skipped")
        self.step = step


class StepCore:
    """What :class:`runctl.agent.steps.Steps` is built on."""

    def __init__(self, agent: Agent[Any]) -> None:
        self._agent = agent
        #: config keys (and cached-function arguments) starting with this are not hashed
        self.ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX
        #: how long the first call waits for the agent to connect and load the log
        self.ready_timeout = 30.0

    # --- plumbing ------------------------------------------------------------------------

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

    def _sid(self, name: str, key: Any, config: Any) -> str:
        _, khash = key_digest(key, ignore_prefix=self.ignore_prefix)
        chash = config.hash if type(config) is Hashed else self._config(config).hash
        return f"{name}.{khash}-{chash}"

    def _log(self) -> StepLog:
        log = self._agent.steplog
        if log is not None and not log.closed:
            return log
        agent = self._agent
        if not agent.ready.is_set():
            running = _running_loop()
            if running is not None and running is getattr(agent, "_loop", None):
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

    def _call(self, log: StepLog, coro: Any, timeout: float) -> Any:
        """Run ``coro`` on the agent's loop from the program's thread."""
        assert log.loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is log.loop:
            coro.close()
            raise RuntimeError(
                "called from the agent's event loop: use the async form "
                "(aiter / async with / adone / aforget / aflush)"
            )
        return asyncio.run_coroutine_threadsafe(coro, log.loop).result(timeout)

    async def _acall(self, log: StepLog, coro: Any) -> Any:
        assert log.loop is not None
        if asyncio.get_running_loop() is log.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, log.loop))

    def _begin(
        self,
        log: StepLog,
        scope: str,
        name: str,
        key: Any,
        khash: str,
        cfg: Hashed,
        prev: tuple[int, StepRecord] | None,
    ) -> StepRecord:
        agent = self._agent
        agent.progress.tick()  # a step started: the program advances
        rec = StepRecord(
            run=agent.run,
            scope=scope,
            name=name,
            key_hash=khash,
            config_hash=cfg.hash,
            status="started",
            started=time.time(),
            key=key,
            config=cfg.value,
            attempt=prev[1].attempt + 1 if prev is not None else 1,
            rank=agent.rank,
            host=agent.host,
            pid=agent.pid,
        )
        log.note(rec)
        log.event(
            "step_started",
            name=name,
            key=key,
            scope=scope,
            attempt=rec.attempt,
            previous=prev[1].status if prev is not None else None,
        )
        return rec

    def _mark(
        self, log: StepLog, name: str, key: Any, config: Any, scope: str, result: Any
    ) -> StepRecord:
        scope_token = self._scope(scope)
        knorm, khash = key_digest(key, ignore_prefix=self.ignore_prefix)
        cfg = self._config(config)
        prev = log.index[scope_token].get(f"{check_token(name, 'step')}.{khash}-{cfg.hash}")
        now = time.time()
        agent = self._agent
        return StepRecord(
            run=agent.run,
            scope=scope_token,
            name=name,
            key_hash=khash,
            config_hash=cfg.hash,
            status="started",
            started=now,
            key=knorm,
            config=cfg.value,
            result=jsonable(result),
            attempt=prev[1].attempt + 1 if prev is not None else 1,
            rank=agent.rank,
            host=agent.host,
            pid=agent.pid,
        )

    def _fail(self, log: StepLog, rec: StepRecord, exc: BaseException | str) -> None:
        if isinstance(exc, GeneratorExit):
            error = "the loop body did not complete (break or exception)"
        elif isinstance(exc, _Leave):
            error = "left with skip()"
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

    def _ended(self, rec: StepRecord, result: Any) -> StepRecord:
        ended = time.time()
        return msgspec.structs.replace(
            rec, status="done", ended=ended, duration=ended - rec.started, result=result
        )

    def _finish(self, log: StepLog, rec: StepRecord, result: Any, wait: bool) -> bool:
        done = self._ended(rec, result)
        if not wait:
            log.submit(done)
            return False
        try:
            return bool(self._call(log, log.complete(done), log.ack_timeout + 5.0))
        except concurrent.futures.TimeoutError:
            return False

    async def _afinish(self, log: StepLog, rec: StepRecord, result: Any, wait: bool) -> bool:
        done = self._ended(rec, result)
        if not wait:
            log.submit(done)
            return False
        return bool(await self._acall(log, log.complete(done)))


class Step:
    """``with steps.step(name, key, config=...) as s:``

    ``s.done`` is True when the step was already done (``s.result`` then holds its logged
    result): the body still runs, so check it, or call ``s.skip()`` to leave the block.
    Otherwise the step is marked done when the block ends without an exception, with
    ``s.result`` (set it in the body) as its result; ``s.done`` then says whether the server
    acknowledged it. An exception marks the attempt failed and propagates.
    """

    def __init__(
        self, steps: StepCore, name: str, key: Any, cfg: Hashed, scope: str, wait: bool
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

    def skip(self) -> NoReturn:
        """Leave the ``with`` block now. A step that was not done stays not done."""
        raise _Leave(self)

    def _enter(self, log: StepLog) -> Step:
        self._log = log
        knorm, khash = key_digest(self.key, ignore_prefix=self._steps.ignore_prefix)
        prev = log.index[self.scope].get(f"{self.name}.{khash}-{self._cfg.hash}")
        if prev is not None and prev[1].status == "done":
            self.done = self.was_done = True
            self.record = prev[1]
            self.result = prev[1].result
            Skips(log, self.name, self.scope).one(knorm)
        else:
            self._running = self._steps._begin(
                log, self.scope, self.name, knorm, khash, self._cfg, prev
            )
        return self

    def _exit(self, exc: BaseException | None) -> tuple[bool, StepRecord | None]:
        """(suppress the exception?, record to complete)."""
        leaving = isinstance(exc, _Leave) and exc.step is self
        if self.was_done or self._running is None:
            return leaving, None
        assert self._log is not None
        if exc is not None:
            self._steps._fail(self._log, self._running, exc)
            return leaving, None
        try:
            self.result = jsonable(self.result)
        except (TypeError, ValueError) as error:
            self._steps._fail(self._log, self._running, error)
            raise
        return False, self._running

    def __enter__(self) -> Step:
        return self._enter(self._steps._log())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        suppress, rec = self._exit(exc)
        if rec is not None:
            assert self._log is not None
            self.done = self._steps._finish(self._log, rec, self.result, self._wait)
            self.record = rec
        return suppress

    async def __aenter__(self) -> Step:
        return self._enter(await self._steps._alog())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        suppress, rec = self._exit(exc)
        if rec is not None:
            assert self._log is not None
            self.done = await self._steps._afinish(self._log, rec, self.result, self._wait)
            self.record = rec
        return suppress

    def __repr__(self) -> str:
        return f"<Step {step_label(self.name, self.key)} scope={self.scope} done={self.done}>"


# --- helpers ---------------------------------------------------------------------------


class Skips:
    """Batches ``step_skipped`` events: one per run of consecutive skipped items."""

    __slots__ = ("count", "keys", "log", "name", "scope")

    def __init__(self, log: StepLog, name: str, scope: str) -> None:
        self.log, self.name, self.scope = log, name, scope
        self.count = 0
        self.keys: list[Any] = []

    def add(self, key: Any) -> None:
        self.count += 1
        if len(self.keys) < 10:
            self.keys.append(key)

    def one(self, key: Any) -> None:
        self.add(key)
        self.flush()

    def flush(self) -> None:
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
    if item is None or isinstance(item, str | int | bool):
        return item
    if isinstance(item, float) and math.isfinite(item):
        return item
    if isinstance(item, PurePath):
        return str(item)
    return position


def jsonable(result: Any) -> Any:
    """``result`` as it will come back from the log (JSON round trip), or a clear error."""
    if result is None:
        return None
    try:
        data = msgspec.json.encode(result)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"a step result must be JSON (small, plain data): {exc}") from None
    if len(data) > RESULT_LIMIT:
        raise ValueError(
            f"step result of {len(data)} bytes is over the {RESULT_LIMIT}-byte "
            "limit: write it to a file and return the path"
        )
    return msgspec.json.decode(data)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def aiter_any(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
