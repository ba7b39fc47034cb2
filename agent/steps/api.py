"""Resumable steps: redo only the unfinished work after a crash or a restart.

    ctl = control(state)
    for epoch in ctl.steps("epoch", range(100), config=cfg):     # only epochs not yet done
        train_one_epoch(epoch)                                  # done once the body completes

    @ctl.cached()                                               # result logged, returned on rerun
    def tokenize(shard: str) -> dict: ...

    with ctl.once("merge-shards", config=cfg) as s:             # explicit form
        if not s.done:
            s.result = merge()

An item is marked done only when its body completed and the server acknowledged the record
(see :mod:`runctl.agent.steps.log`); an exception or a ``break`` leaves it not done. Identity is the
step name, the key (the loop item, or the function's arguments) and the hash of the config's
canonical JSON (:mod:`runctl.bus.canonical`); keys with the ignore prefix (``"_"``) are left out.

Scopes: ``scope="rank"`` (default) logs per rank; ``scope="run"`` counts a step any one rank
completed as done for every rank of the run.

Threading: the lookups ("is it done?") are dict reads on the program's thread. The only
network wait is the bounded PubAck wait of a completion (``wait=False`` skips it: the
record is then acknowledged in the background and enters the done set when it is). The first
call waits (at most ``ready_timeout``, default 30 s) for the agent to connect and load the
log, and raises :class:`~runctl.bus.errors.Unavailable` if it cannot.

Async programs use the same object: ``agent.steps`` (or the ``a*`` methods on ``ctl``):
``async for`` over :meth:`Steps.aiter`, ``async with`` :meth:`Steps.step`, ``@cached`` on an
``async def``, ``await adone(...)``, ``await aforget(...)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import Any, TypeVar

from runctl.agent.steps.cached import Cached
from runctl.agent.steps.core import Scope, Skips, StepCore, aiter_any, default_key, encode_result
from runctl.agent.steps.log import StepLog
from runctl.agent.steps.step import Step
from runctl.bus.canonical import Hashed
from runctl.bus.steps.explain import Explained, explain
from runctl.bus.steps.records import StepRecord, step_id, step_label
from runctl.bus.steps.store import ForgetReport
from runctl.bus.subjects import check_token

__all__ = ["Steps"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_MISSING: Any = object()


class Steps(StepCore):
    """The step API of one agent. Reached as ``agent.steps``; ``ctl.steps(...)`` & co.
    delegate here."""

    # --- iterator form -------------------------------------------------------------------

    def iter(
        self,
        name: str,
        items: Iterable[T],
        *,
        config: Any = None,
        key: Callable[[T], Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> Iterator[T]:
        """Yield the items of ``items`` not yet done; an item is marked done when the loop
        comes back for the next one (its body completed). ``key(item)`` names an item;
        default: the item itself if it is a str/int/float/bool/None/path, else its position."""
        log = self._log()
        cfg = self._config(config)
        return self._iterate(
            log, check_token(name, "step"), items, cfg, key, self._scope(scope), wait
        )

    def _iterate(
        self,
        log: StepLog,
        name: str,
        items: Iterable[T],
        cfg: Hashed,
        key: Callable[[T], Any] | None,
        scope: str,
        wait: bool,
    ) -> Iterator[T]:
        skips = Skips(log, name, scope)
        for position, item in enumerate(items):
            knorm, khash = self._key(key(item) if key else default_key(item, position))
            _, rec = self._start(log, skips, knorm, khash, cfg)
            if rec is None:
                continue
            with self._failing(log, rec):  # GeneratorExit: a break, or the body raised
                yield item
            self._finish(log, rec, None, wait)
        skips.flush()

    def aiter(
        self,
        name: str,
        items: Iterable[T] | AsyncIterable[T],
        *,
        config: Any = None,
        key: Callable[[T], Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> AsyncIterator[T]:
        """``async for`` form of :meth:`iter` (``items`` may be an async iterable)."""
        cfg = self._config(config)
        return self._aiterate(check_token(name, "step"), items, cfg, key, self._scope(scope), wait)

    async def _aiterate(
        self,
        name: str,
        items: Iterable[T] | AsyncIterable[T],
        cfg: Hashed,
        key: Callable[[T], Any] | None,
        scope: str,
        wait: bool,
    ) -> AsyncIterator[T]:
        log = await self._alog()
        skips = Skips(log, name, scope)
        position = -1
        async for item in aiter_any(items):
            position += 1
            knorm, khash = self._key(key(item) if key else default_key(item, position))
            _, rec = self._start(log, skips, knorm, khash, cfg)
            if rec is None:
                continue
            with self._failing(log, rec):
                yield item
            await self._afinish(log, rec, None, wait)
        skips.flush()

    # --- explicit form -------------------------------------------------------------------

    def step(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        wait: bool = True,
        pickle: bool = False,
    ) -> Step:
        """``with steps.step("merge", config=cfg) as s:`` (or ``async with``); see :class:`Step`.

        ``pickle=True`` lets a result with no safe format be stored (and read back) with
        pickle: only on a bus you trust, a pickle from the bus can run code."""
        return Step(
            self,
            check_token(name, "step"),
            key,
            self._config(config),
            self._scope(scope),
            wait,
            pickle,
        )

    def is_done(
        self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank"
    ) -> bool:
        """In-memory lookup: no network. Pass a :func:`runctl.bus.canonical.hashed` config in hot
        loops to hash it once."""
        log = self._agent.steplog or self._log()
        scope_token = self._agent.rank if scope == "rank" else self._scope(scope)
        entry = log.index[scope_token].get(self._sid(name, key, config))  # the hot path
        return entry is not None and entry[1].status == "done"

    def result(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        default: Any = _MISSING,
        pickle: bool = False,
    ) -> Any:
        """The logged result of a done step; ``default`` (or KeyError) if it is not done.
        A result kept in the object store is fetched now (and verified: a damaged one
        raises :class:`~runctl.bus.errors.CorruptArtifact`)."""
        log = self._log()
        entry = log.index[self._scope(scope)].get(self._sid(name, key, config))
        if entry is not None and entry[1].status == "done":
            return self._load(log, entry[1], pickle)
        if default is _MISSING:
            raise KeyError(f"step {step_label(name, key)!r} is not done")
        return default

    async def aresult(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        default: Any = _MISSING,
        pickle: bool = False,
    ) -> Any:
        """``await``-able :meth:`result`."""
        log = await self._alog()
        entry = log.index[self._scope(scope)].get(self._sid(name, key, config))
        if entry is not None and entry[1].status == "done":
            return await self._aload(log, entry[1], pickle)
        if default is _MISSING:
            raise KeyError(f"step {step_label(name, key)!r} is not done")
        return default

    def done(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        result: Any = None,
        wait: bool = True,
        pickle: bool = False,
    ) -> bool:
        """Mark a step done, with a ``result`` of any size (small JSON stays in the record;
        anything else goes to the object store first). True once acknowledged."""
        log = self._log()
        _, encoded = encode_result(result, pickle_ok=pickle)
        rec = self._mark(log, name, key, config, scope)
        return self._finish(log, rec, encoded, wait)

    def _mark(self, log: StepLog, name: str, key: Any, config: Any, scope: str) -> StepRecord:
        """The attempt that :meth:`done` logs as done, without a ``started`` record."""
        scope_token = self._scope(scope)
        knorm, khash = self._key(key)
        cfg = self._config(config)
        prev = log.lookup(scope_token, step_id(check_token(name, "step"), khash, cfg.hash))
        return self._record(scope_token, name, knorm, khash, cfg, prev)

    async def adone(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        result: Any = None,
        wait: bool = True,
        pickle: bool = False,
    ) -> bool:
        """``await``-able :meth:`done`."""
        log = await self._alog()
        _, encoded = encode_result(result, pickle_ok=pickle)
        rec = self._mark(log, name, key, config, scope)
        return await self._afinish(log, rec, encoded, wait)

    # --- decorator form ------------------------------------------------------------------

    @property
    def cached(self) -> Cached:
        """``@steps.cached`` or ``@steps.cached(name=..., config=..., key=...)``: run the
        function once per distinct arguments; see :class:`~runctl.agent.steps.cached.Cached`."""
        return Cached(self)

    # --- forget, flush, explain ----------------------------------------------------------

    def forget(
        self, step: str | None = None, *, rank: str | int | None = None, everything: bool = False
    ) -> ForgetReport:
        """Forget ``step`` (``name``, ``name:key``, with ``+`` also every step started after
        it) in every scope of this run, or only ``rank``'s (``"run"``: the run-wide log);
        ``everything=True`` forgets the whole run. This agent's done set follows at once,
        other live agents when they receive the forget marker."""
        log = self._log()
        selector = _selector(step, everything)
        who = None if rank is None else str(rank)
        return self._call(log, log.forget(selector, rank=who), 60.0)

    async def aforget(
        self, step: str | None = None, *, rank: str | int | None = None, everything: bool = False
    ) -> ForgetReport:
        """``await``-able :meth:`forget`."""
        log = await self._alog()
        selector = _selector(step, everything)
        who = None if rank is None else str(rank)
        return await self._acall(log, log.forget(selector, rank=who))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every completion is acknowledged; True if none is left."""
        log = self._log()
        return self._call(log, log.flush(timeout), timeout + 5.0)

    async def aflush(self, timeout: float = 10.0) -> bool:
        """``await``-able :meth:`flush`."""
        log = await self._alog()
        return await self._acall(log, log.flush(timeout))

    @property
    def pending(self) -> int:
        """Completions waiting for the server's acknowledgement."""
        log = self._agent.steplog
        return 0 if log is None else log.pending

    def explain(self, configs: dict[str, Any] | None = None) -> list[Explained]:
        """What a restart of this rank would skip and run, from what this agent holds.
        ``configs`` maps step names to the configs a restart would use."""
        log = self._log()
        hashes = {
            n: (h.value, h.hash)
            for n, h in ((n, self._config(c)) for n, c in (configs or {}).items())
        }
        return explain(
            log.records(), rank=self._agent.rank, configs=hashes, alive={(log.host, log.pid)}
        )


def _selector(step: str | None, everything: bool) -> str | None:
    if step is None:
        if not everything:
            raise ValueError("name the step to forget, or pass everything=True for the run")
        return None
    if everything:
        raise ValueError("pass either a step or everything=True, not both")
    return step
