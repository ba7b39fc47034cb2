"""The ``with`` form of a step: ``with steps.step("merge", config=cfg) as s:`` (or
``async with``)."""

from __future__ import annotations

from types import TracebackType
from typing import Any, NoReturn

from runctl.agent.steps.core import Leave, Skips, StepCore, jsonable
from runctl.agent.steps.log import StepLog
from runctl.bus.canonical import Hashed
from runctl.bus.steps.records import StepRecord, step_label

__all__ = ["Step"]


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
        raise Leave(self)

    def _enter(self, log: StepLog) -> Step:
        self._log = log
        knorm, khash = self._steps._key(self.key)
        skips = Skips(log, self.name, self.scope)
        logged, self._running = self._steps._start(log, skips, knorm, khash, self._cfg)
        if logged is not None:
            self.done = self.was_done = True
            self.record = logged
            self.result = logged.result
            skips.flush()
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
