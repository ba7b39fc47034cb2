"""``ctl.steps(...)`` & co.: the step methods of the sync handle, :class:`runctl.agent.Control`.
Each delegates to ``ctl.agent.steps`` (:class:`runctl.agent.steps.Steps`)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from runctl.agent.step_core import Scope, Step
from runctl.bus.stepstore import ForgetReport

if TYPE_CHECKING:
    from runctl.agent.steps import Steps

__all__ = ["StepsMixin"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class StepsMixin:
    """The step methods of :class:`runctl.agent.control.Control` (the sync handle); each
    delegates to ``self.agent.steps`` (:class:`Steps`), which also has the async forms and
    ``explain``, ``flush`` and ``result``."""

    def _steps_api(self) -> Steps:
        # not annotated as an attribute: Control types its own ``agent`` as Agent[M]
        api: Steps = cast(Any, self).agent.steps
        return api

    def steps(
        self,
        name: str,
        items: Iterable[T],
        *,
        config: Any = None,
        key: Callable[[T], Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> Iterator[T]:
        """``for epoch in ctl.steps("epoch", range(100), config=cfg):`` yields only the items
        not yet done; see :meth:`Steps.iter`."""
        return self._steps_api().iter(name, items, config=config, key=key, scope=scope, wait=wait)

    def asteps(
        self,
        name: str,
        items: Iterable[T] | AsyncIterable[T],
        *,
        config: Any = None,
        key: Callable[[T], Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> AsyncIterator[T]:
        return self._steps_api().aiter(name, items, config=config, key=key, scope=scope, wait=wait)

    def once(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> Step:
        """``with ctl.once("merge-shards", config=cfg) as s: if not s.done: ...`` -- the
        explicit form (:meth:`Steps.step`; ``ctl.step`` is the :meth:`sync` step number)."""
        return self._steps_api().step(name, key, config=config, scope=scope, wait=wait)

    @overload
    def cached(self, fn: F, /) -> F: ...

    @overload
    def cached(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        config: Any = None,
        key: Callable[..., Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> Callable[[F], F]: ...

    def cached(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        config: Any = None,
        key: Callable[..., Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
    ) -> F | Callable[[F], F]:
        """``@ctl.cached()``: the function's result is logged; see :meth:`Steps.cached`."""
        api = self._steps_api()
        if fn is not None:
            return api.cached(fn)
        return api.cached(name=name, config=config, key=key, scope=scope, wait=wait)

    def is_done(
        self, name: str, key: Any = None, *, config: Any = None, scope: Scope = "rank"
    ) -> bool:
        return self._steps_api().is_done(name, key, config=config, scope=scope)

    def done(
        self,
        name: str,
        key: Any = None,
        *,
        config: Any = None,
        scope: Scope = "rank",
        result: Any = None,
        wait: bool = True,
    ) -> bool:
        return self._steps_api().done(
            name, key, config=config, scope=scope, result=result, wait=wait
        )

    def forget(
        self, step: str | None = None, *, rank: str | int | None = None, everything: bool = False
    ) -> ForgetReport:
        return self._steps_api().forget(step, rank=rank, everything=everything)
