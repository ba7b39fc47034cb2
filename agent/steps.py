"""Resumable steps: redo only the unfinished work after a crash or a restart.

    ctl = control(state)
    for epoch in ctl.steps("epoch", range(100), config=cfg):     # only epochs not yet done
        train_one_epoch(epoch)                                  # done once the body completes

    @ctl.cached()                                               # result logged, returned on rerun
    def tokenize(shard: str) -> dict: ...

    with ctl.step("merge-shards", config=cfg) as s:             # explicit form
        if not s.done:
            s.result = merge()

An item is marked done only when its body completed and the server acknowledged the record
(see :mod:`bus.steplog`); an exception or a ``break`` leaves it not done. Identity is the
step name, the key (the loop item, or the function's arguments) and the hash of the config's
canonical JSON (:mod:`bus.canonical`); keys with the ignore prefix (``"_"``) are left out.

Scopes: ``scope="rank"`` (default) logs per rank; ``scope="run"`` counts a step any one rank
completed as done for every rank of the run.

Threading: the lookups ("is it done?") are dict reads on the program's thread. The only
network wait is the bounded PubAck wait of a completion (``wait=False`` skips it: the
record is then acknowledged in the background and enters the done set when it is). The first
call waits (at most ``ready_timeout``, default 30 s) for the agent to connect and load the
log, and raises :class:`~bus.errors.Unavailable` if it cannot.

Async programs use the same object: ``agent.steps`` (or the ``a*`` methods on ``ctl``):
``async for`` over :meth:`Steps.aiter`, ``async with`` :meth:`Steps.step`, ``@cached`` on an
``async def``, ``await adone(...)``, ``await aforget(...)``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from pathlib import PurePath
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeVar, cast, overload

import anyio
import msgspec

from bus.canonical import DEFAULT_IGNORE_PREFIX, Hashed, hashed, key_digest
from bus.errors import BadToken, Unavailable
from bus.steplog import StepLog
from bus.steprecords import Explained, StepRecord, explain, step_label
from bus.stepstore import ForgetReport
from bus.subjects import RUN_SCOPE, check_token

if TYPE_CHECKING:
    from agent.agent import Agent

__all__ = ["RESULT_LIMIT", "Scope", "Step", "Steps", "StepsMixin"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
Scope = Literal["rank", "run"]
#: largest logged result (encoded); store big outputs in files and return their path
RESULT_LIMIT: Final = 256 * 1024
_MISSING: Any = object()
#: no config: the empty object, hashed once
_NO_CONFIG: Final = hashed({})


class _Leave(Exception):
    """Raised by :meth:`Step.skip` to leave a ``with`` block; caught by that Step."""

    def __init__(self, step: Step) -> None:
        super().__init__("step skipped")
        self.step = step


class Steps:
    """The step API of one agent. Reached as ``agent.steps``; ``ctl.steps(...)`` & co.
    delegate here."""

    def __init__(self, agent: Agent[Any]) -> None:
        self._agent = agent
        #: config keys (and cached-function arguments) starting with this are not hashed
        self.ignore_prefix: str | None = DEFAULT_IGNORE_PREFIX
        #: how long the first call waits for the agent to connect and load the log
        self.ready_timeout = 30.0

    # --- iterator form -------------------------------------------------------------------

    def iter(
        self, name: str, items: Iterable[T], *, config: Any = None,
        key: Callable[[T], Any] | None = None, scope: Scope = "rank", wait: bool = True,
    ) -> Iterator[T]:
        """Yield the items of ``items`` not yet done; an item is marked done when the loop
        comes back for the next one (its body completed). ``key(item)`` names an item;
        default: the item itself if it is a str/int/float/bool/None/path, else its position."""
        log = self._log()
        cfg = self._config(config)
        return self._iterate(log, check_token(name, "step"), items, cfg, key,
                             self._scope(scope), wait)

    def _iterate(
        self, log: StepLog, name: str, items: Iterable[T], cfg: Hashed,
        key: Callable[[T], Any] | None, scope: str, wait: bool,
    ) -> Iterator[T]:
        skips = _Skips(log, name, scope)
        tail = f"-{cfg.hash}"
        ignore = self.ignore_prefix
        for position, item in enumerate(items):
            knorm, khash = key_digest(key(item) if key else _default_key(item, position),
                                      ignore_prefix=ignore)
            prev = log.index[scope].get(f"{name}.{khash}{tail}")
            if prev is not None and prev[1].status == "done":
                skips.add(knorm)
                continue
            skips.flush()
            rec = self._begin(log, scope, name, knorm, khash, cfg, prev)
            try:
                yield item
            except BaseException as exc:  # GeneratorExit: a break, or the body raised
                self._fail(log, rec, exc)
                raise
            self._finish(log, rec, None, wait)
        skips.flush()

    def aiter(
        self, name: str, items: Iterable[T] | AsyncIterable[T], *, config: Any = None,
        key: Callable[[T], Any] | None = None, scope: Scope = "rank", wait: bool = True,
    ) -> AsyncIterator[T]:
        """``async for`` form of :meth:`iter` (``items`` may be an async iterable)."""
        cfg = self._config(config)
        return self._aiterate(check_token(name, "step"), items, cfg, key, self._scope(scope),
                              wait)

    async def _aiterate(
        self, name: str, items: Iterable[T] | AsyncIterable[T], cfg: Hashed,
        key: Callable[[T], Any] | None, scope: str, wait: bool,
    ) -> AsyncIterator[T]:
        log = await self._alog()
        skips = _Skips(log, name, scope)
        position = -1
        async for item in _aiter(items):
            position += 1
            knorm, khash = key_digest(key(item) if key else _default_key(item, position),
                                      ignore_prefix=self.ignore_prefix)
            prev = log.index[scope].get(f"{name}.{khash}-{cfg.hash}")
            if prev is not None and prev[1].status == "done":
                skips.add(knorm)
                continue
            skips.flush()
            rec = self._begin(log, scope, name, knorm, khash, cfg, prev)
            try:
                yield item
            except BaseException as exc:
                self._fail(log, rec, exc)
                raise
            await self._afinish(log, rec, None, wait)
        skips.flush()

    # --- explicit form -------------------------------------------------------------------

    def step(
        self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank",
        wait: bool = True,
    ) -> Step:
        """``with steps.step("merge", config=cfg) as s:`` (or ``async with``); see :class:`Step`."""
        return Step(self, check_token(name, "step"), key, self._config(config),
                    self._scope(scope), wait)

    def is_done(self, name: str, key: Any = None, *, config: Any = None,
                scope: Scope = "rank") -> bool:
        """In-memory lookup: no network. Pass a :func:`bus.canonical.hashed` config in hot
        loops to hash it once."""
        log = self._agent.steplog or self._log()
        scope_token = self._agent.rank if scope == "rank" else self._scope(scope)
        entry = log.index[scope_token].get(self._sid(name, key, config))
        return entry is not None and entry[1].status == "done"

    def result(self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank",
               default: Any = _MISSING) -> Any:
        """The logged result of a done step; ``default`` (or KeyError) if it is not done."""
        log = self._log()
        entry = log.index[self._scope(scope)].get(self._sid(name, key, config))
        if entry is not None and entry[1].status == "done":
            return entry[1].result
        if default is _MISSING:
            raise KeyError(f"step {step_label(name, key)!r} is not done")
        return default

    def done(self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank",
             result: Any = None, wait: bool = True) -> bool:
        """Mark a step done (with a small JSON ``result``). True once acknowledged."""
        log = self._log()
        rec = self._mark(log, name, key, config, scope, result)
        return self._finish(log, rec, rec.result, wait)

    async def adone(self, name: str, key: Any = None, *, config: Any = None,
                    scope: Scope = "rank", result: Any = None, wait: bool = True) -> bool:
        log = await self._alog()
        rec = self._mark(log, name, key, config, scope, result)
        return await self._afinish(log, rec, rec.result, wait)

    # --- decorator form ------------------------------------------------------------------

    @overload
    def cached(self, fn: F, /) -> F: ...

    @overload
    def cached(
        self, fn: None = None, /, *, name: str | None = None, config: Any = None,
        key: Callable[..., Any] | None = None, scope: Scope = "rank", wait: bool = True,
    ) -> Callable[[F], F]: ...

    def cached(
        self, fn: F | None = None, /, *, name: str | None = None, config: Any = None,
        key: Callable[..., Any] | None = None, scope: Scope = "rank", wait: bool = True,
    ) -> F | Callable[[F], F]:
        """Decorator: run the function once per distinct arguments (and ``config``); later
        calls, in this process or after a restart, return the logged result. The result
        must be small JSON (it comes back as JSON: tuples as lists) and is returned
        JSON-round-tripped on the first call too, so code sees the same thing on a rerun.
        Arguments named ``self``/``cls`` or starting with the ignore prefix are not part of
        the key; ``key(*args, **kwargs)`` replaces the arguments as the key."""

        def decorate(func: F) -> F:
            step_name: str = name or str(getattr(func, "__name__", ""))
            try:
                check_token(step_name, "step")
            except BadToken as exc:
                raise BadToken("step", step_name, f"{exc.problem}; pass cached(name=...)") from None
            cfg = self._config(config)
            scope_token = self._scope(scope)
            signature = inspect.signature(func)

            def ident(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str]:
                if key is not None:
                    value = key(*args, **kwargs)
                else:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    value = {k: v for k, v in bound.arguments.items() if k not in ("self", "cls")}
                try:
                    return key_digest(value, ignore_prefix=self.ignore_prefix)
                except (TypeError, ValueError) as exc:
                    raise TypeError(
                        f"cannot key cached step {step_name!r} by its arguments: {exc}; pass "
                        f"key=... or give the argument a {self.ignore_prefix!r} prefix"
                    ) from None

            if inspect.iscoroutinefunction(func):
                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    log = await self._alog()
                    knorm, khash = ident(args, kwargs)
                    prev = log.index[scope_token].get(f"{step_name}.{khash}-{cfg.hash}")
                    if prev is not None and prev[1].status == "done":
                        _Skips(log, step_name, scope_token).one(knorm)
                        return prev[1].result
                    rec = self._begin(log, scope_token, step_name, knorm, khash, cfg, prev)
                    try:
                        result = _jsonable(await func(*args, **kwargs))
                    except BaseException as exc:
                        self._fail(log, rec, exc)
                        raise
                    await self._afinish(log, rec, result, wait)
                    return result

                return cast(F, async_wrapper)

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                log = self._log()
                knorm, khash = ident(args, kwargs)
                prev = log.index[scope_token].get(f"{step_name}.{khash}-{cfg.hash}")
                if prev is not None and prev[1].status == "done":
                    _Skips(log, step_name, scope_token).one(knorm)
                    return prev[1].result
                rec = self._begin(log, scope_token, step_name, knorm, khash, cfg, prev)
                try:
                    result = _jsonable(func(*args, **kwargs))
                except BaseException as exc:
                    self._fail(log, rec, exc)
                    raise
                self._finish(log, rec, result, wait)
                return result

            return cast(F, wrapper)

        return decorate(fn) if fn is not None else decorate

    # --- forget, flush, explain ----------------------------------------------------------

    def forget(self, step: str | None = None, *, rank: str | int | None = None,
               everything: bool = False) -> ForgetReport:
        """Forget ``step`` (``name``, ``name:key``, with ``+`` also every step started after
        it) in every scope of this run, or only ``rank``'s (``"run"``: the run-wide log);
        ``everything=True`` forgets the whole run. This agent's done set follows at once,
        other live agents when they receive the forget marker."""
        log = self._log()
        report: ForgetReport = self._call(
            log, log.forget(_selector(step, everything), rank=None if rank is None else str(rank)),
            60.0)
        return report

    async def aforget(self, step: str | None = None, *, rank: str | int | None = None,
                      everything: bool = False) -> ForgetReport:
        log = await self._alog()
        report: ForgetReport = await self._acall(
            log, log.forget(_selector(step, everything), rank=None if rank is None else str(rank)))
        return report

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every completion is acknowledged; True if none is left."""
        log = self._log()
        return bool(self._call(log, log.flush(timeout), timeout + 5.0))

    async def aflush(self, timeout: float = 10.0) -> bool:
        log = await self._alog()
        return bool(await self._acall(log, log.flush(timeout)))

    @property
    def pending(self) -> int:
        """Completions waiting for the server's acknowledgement."""
        log = self._agent.steplog
        return 0 if log is None else log.pending

    def explain(self, configs: dict[str, Any] | None = None) -> list[Explained]:
        """What a restart of this rank would skip and run, from what this agent holds.
        ``configs`` maps step names to the configs a restart would use."""
        log = self._log()
        hashes = {n: (h.value, h.hash) for n, h in
                  ((n, self._config(c)) for n, c in (configs or {}).items())}
        return explain(log.records(), rank=self._agent.rank, configs=hashes,
                       alive={(log.host, log.pid)})

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
                raise RuntimeError("the agent is not ready yet: in async code use the async "
                                   "forms (aiter / async with / adone), which wait for it")
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
            raise Unavailable(f"runctl agent not connected after {self.ready_timeout:g}s "
                              f"(url {agent.url}): the step log is not loaded")
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
            raise RuntimeError("called from the agent's event loop: use the async form "
                               "(aiter / async with / adone / aforget / aflush)")
        return asyncio.run_coroutine_threadsafe(coro, log.loop).result(timeout)

    async def _acall(self, log: StepLog, coro: Any) -> Any:
        assert log.loop is not None
        if asyncio.get_running_loop() is log.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, log.loop))

    def _begin(self, log: StepLog, scope: str, name: str, key: Any, khash: str, cfg: Hashed,
               prev: tuple[int, StepRecord] | None) -> StepRecord:
        agent = self._agent
        rec = StepRecord(
            run=agent.run, scope=scope, name=name, key_hash=khash, config_hash=cfg.hash,
            status="started", started=time.time(), key=key, config=cfg.value,
            attempt=prev[1].attempt + 1 if prev is not None else 1,
            rank=agent.rank, host=agent.host, pid=agent.pid,
        )
        log.note(rec)
        log.event("step_started", name=name, key=key, scope=scope, attempt=rec.attempt,
                  previous=prev[1].status if prev is not None else None)
        return rec

    def _mark(self, log: StepLog, name: str, key: Any, config: Any, scope: str,
              result: Any) -> StepRecord:
        scope_token = self._scope(scope)
        knorm, khash = key_digest(key, ignore_prefix=self.ignore_prefix)
        cfg = self._config(config)
        prev = log.index[scope_token].get(f"{check_token(name, 'step')}.{khash}-{cfg.hash}")
        now = time.time()
        agent = self._agent
        return StepRecord(
            run=agent.run, scope=scope_token, name=name, key_hash=khash, config_hash=cfg.hash,
            status="started", started=now, key=knorm, config=cfg.value,
            result=_jsonable(result), attempt=prev[1].attempt + 1 if prev is not None else 1,
            rank=agent.rank, host=agent.host, pid=agent.pid,
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
        failed = msgspec.structs.replace(rec, status="failed", ended=ended,
                                         duration=ended - rec.started, error=error)
        try:
            log.note(failed)
            log.event("step_failed", name=rec.name, key=rec.key, scope=rec.scope, error=error)
        except RuntimeError:  # the agent's loop is gone (interpreter exit): nothing to tell
            pass

    def _ended(self, rec: StepRecord, result: Any) -> StepRecord:
        ended = time.time()
        return msgspec.structs.replace(rec, status="done", ended=ended,
                                       duration=ended - rec.started, result=result)

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

    def __init__(self, steps: Steps, name: str, key: Any, cfg: Hashed, scope: str,
                 wait: bool) -> None:
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
            _Skips(log, self.name, self.scope).one(knorm)
        else:
            self._running = self._steps._begin(log, self.scope, self.name, knorm, khash,
                                               self._cfg, prev)
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
            self.result = _jsonable(self.result)
        except (TypeError, ValueError) as error:
            self._steps._fail(self._log, self._running, error)
            raise
        return False, self._running

    def __enter__(self) -> Step:
        return self._enter(self._steps._log())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        suppress, rec = self._exit(exc)
        if rec is not None:
            assert self._log is not None
            self.done = self._steps._finish(self._log, rec, self.result, self._wait)
            self.record = rec
        return suppress

    async def __aenter__(self) -> Step:
        return self._enter(await self._steps._alog())

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool:
        suppress, rec = self._exit(exc)
        if rec is not None:
            assert self._log is not None
            self.done = await self._steps._afinish(self._log, rec, self.result, self._wait)
            self.record = rec
        return suppress

    def __repr__(self) -> str:
        return f"<Step {step_label(self.name, self.key)} scope={self.scope} done={self.done}>"


class StepsMixin:
    """The step methods of :class:`agent.control.Control` (the sync handle); each delegates to
    ``self.agent.steps`` (:class:`Steps`), which also has the async forms and ``explain``,
    ``flush`` and ``result``."""

    def _steps_api(self) -> Steps:
        # not annotated as an attribute: Control types its own ``agent`` as Agent[M]
        api: Steps = cast(Any, self).agent.steps
        return api

    def steps(self, name: str, items: Iterable[T], *, config: Any = None,
              key: Callable[[T], Any] | None = None, scope: Scope = "rank",
              wait: bool = True) -> Iterator[T]:
        """``for epoch in ctl.steps("epoch", range(100), config=cfg):`` yields only the items
        not yet done; see :meth:`Steps.iter`."""
        return self._steps_api().iter(name, items, config=config, key=key, scope=scope,
                                     wait=wait)

    def asteps(self, name: str, items: Iterable[T] | AsyncIterable[T], *, config: Any = None,
               key: Callable[[T], Any] | None = None, scope: Scope = "rank",
               wait: bool = True) -> AsyncIterator[T]:
        return self._steps_api().aiter(name, items, config=config, key=key, scope=scope,
                                      wait=wait)

    def once(self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank",
             wait: bool = True) -> Step:
        """``with ctl.once("merge-shards", config=cfg) as s: if not s.done: ...`` -- the
        explicit form (:meth:`Steps.step`; ``ctl.step`` is the :meth:`sync` step number)."""
        return self._steps_api().step(name, key, config=config, scope=scope, wait=wait)

    @overload
    def cached(self, fn: F, /) -> F: ...

    @overload
    def cached(
        self, fn: None = None, /, *, name: str | None = None, config: Any = None,
        key: Callable[..., Any] | None = None, scope: Scope = "rank", wait: bool = True,
    ) -> Callable[[F], F]: ...

    def cached(
        self, fn: F | None = None, /, *, name: str | None = None, config: Any = None,
        key: Callable[..., Any] | None = None, scope: Scope = "rank", wait: bool = True,
    ) -> F | Callable[[F], F]:
        """``@ctl.cached()``: the function's result is logged; see :meth:`Steps.cached`."""
        api = self._steps_api()
        if fn is not None:
            return api.cached(fn)
        return api.cached(name=name, config=config, key=key, scope=scope, wait=wait)

    def is_done(self, name: str, key: Any = None, *, config: Any = None,
                scope: Scope = "rank") -> bool:
        return self._steps_api().is_done(name, key, config=config, scope=scope)

    def done(self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank",
             result: Any = None, wait: bool = True) -> bool:
        return self._steps_api().done(name, key, config=config, scope=scope, result=result,
                                     wait=wait)

    def forget(self, step: str | None = None, *, rank: str | int | None = None,
               everything: bool = False) -> ForgetReport:
        return self._steps_api().forget(step, rank=rank, everything=everything)


# --- helpers ---------------------------------------------------------------------------


class _Skips:
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
            self.log.event("step_skipped", name=self.name, scope=self.scope, count=self.count,
                           keys=self.keys, reason="done")
            self.count = 0
            self.keys = []


def _default_key(item: Any, position: int) -> Any:
    if item is None or isinstance(item, str | int | bool):
        return item
    if isinstance(item, float) and math.isfinite(item):
        return item
    if isinstance(item, PurePath):
        return str(item)
    return position


def _jsonable(result: Any) -> Any:
    """``result`` as it will come back from the log (JSON round trip), or a clear error."""
    if result is None:
        return None
    try:
        data = msgspec.json.encode(result)
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"a step result must be JSON (small, plain data): {exc}") from None
    if len(data) > RESULT_LIMIT:
        raise ValueError(f"step result of {len(data)} bytes is over the {RESULT_LIMIT}-byte "
                         "limit: write it to a file and return the path")
    return msgspec.json.decode(data)


def _selector(step: str | None, everything: bool) -> str | None:
    if step is None:
        if not everything:
            raise ValueError("name the step to forget, or pass everything=True for the run")
        return None
    if everything:
        raise ValueError("pass either a step or everything=True, not both")
    return step


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item

