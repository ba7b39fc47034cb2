"""The decorator form of a step: ``@ctl.cached`` logs a function's result per arguments."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

from runctl.agent.steps.core import Scope, Skips, StepCore, encode_result
from runctl.agent.steps.log import StepLog
from runctl.bus.errors import BadToken, CorruptArtifact
from runctl.bus.steps.records import StepRecord
from runctl.bus.subjects import check_token

__all__ = ["Cached"]

F = TypeVar("F", bound=Callable[..., Any])


class Cached:
    """``@cached`` or ``@cached(name=..., config=..., key=..., scope=..., wait=...)`` of
    one step API (``ctl.cached``, ``agent.steps.cached``)."""

    def __init__(self, steps: StepCore) -> None:
        self._steps = steps

    @overload
    def __call__(self, fn: F, /) -> F: ...

    @overload
    def __call__(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        config: Any = None,
        key: Callable[..., Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
        pickle: bool = False,
    ) -> Callable[[F], F]: ...

    def __call__(
        self,
        fn: F | None = None,
        /,
        *,
        name: str | None = None,
        config: Any = None,
        key: Callable[..., Any] | None = None,
        scope: Scope = "rank",
        wait: bool = True,
        pickle: bool = False,
    ) -> F | Callable[[F], F]:
        """Decorator: run the function once per distinct arguments (and ``config``); later
        calls, in this process or after a restart, return the logged result. A result of
        any size: JSON comes back as JSON (tuples as lists; returned JSON-round-tripped on
        the first call too, so code sees the same thing on a rerun); bytes, numpy arrays
        and torch tensors in their own formats through the object store, fetched when a
        call asks for them; anything else only with ``pickle=True`` (a bus you trust).
        A stored result found damaged runs the function again.
        Arguments named ``self``/``cls`` or starting with the ignore prefix are not part of
        the key; ``key(*args, **kwargs)`` replaces the arguments as the key."""

        steps = self._steps

        def decorate(func: F) -> F:
            step_name: str = name or str(getattr(func, "__name__", ""))
            try:
                check_token(step_name, "step")
            except BadToken as exc:
                raise BadToken("step", step_name, f"{exc.problem}; pass cached(name=...)") from None
            cfg = steps._config(config)
            scope_token = steps._scope(scope)
            signature = inspect.signature(func)

            def ident(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, str]:
                if key is not None:
                    value = key(*args, **kwargs)
                else:
                    bound = signature.bind(*args, **kwargs)
                    bound.apply_defaults()
                    value = {k: v for k, v in bound.arguments.items() if k not in ("self", "cls")}
                try:
                    return steps._key(value)
                except (TypeError, ValueError) as exc:
                    raise TypeError(
                        f"cannot key cached step {step_name!r} by its arguments: {exc}; pass "
                        f"key=... or give the argument a {steps.ignore_prefix!r} prefix"
                    ) from None

            def logged(
                log: StepLog, args: Any, kwargs: Any, redo: bool = False
            ) -> tuple[StepRecord | None, StepRecord | None]:
                """(the done record, None) when done, else (None, the started attempt)."""
                knorm, khash = ident(args, kwargs)
                skips = Skips(log, step_name, scope_token)
                done, rec = steps._start(log, skips, knorm, khash, cfg, redo=redo)
                skips.flush()
                return done, rec

            if inspect.iscoroutinefunction(func):

                @functools.wraps(func)
                async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                    log = await steps._alog()
                    done, rec = logged(log, args, kwargs)
                    if done is not None:
                        try:
                            return await steps._aload(log, done, pickle)
                        except CorruptArtifact as error:
                            steps._damaged(log, done, error)
                            _, rec = logged(log, args, kwargs, redo=True)
                    assert rec is not None
                    with steps._failing(log, rec):
                        result, encoded = encode_result(
                            await func(*args, **kwargs), pickle_ok=pickle
                        )
                    await steps._afinish(log, rec, encoded, wait)
                    return result

                return cast(F, async_wrapper)

            @functools.wraps(func)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                log = steps._log()
                done, rec = logged(log, args, kwargs)
                if done is not None:
                    try:
                        return steps._load(log, done, pickle)
                    except CorruptArtifact as error:
                        steps._damaged(log, done, error)
                        _, rec = logged(log, args, kwargs, redo=True)
                assert rec is not None
                with steps._failing(log, rec):
                    result, encoded = encode_result(func(*args, **kwargs), pickle_ok=pickle)
                steps._finish(log, rec, encoded, wait)
                return result

            return cast(F, wrapper)

        return decorate(fn) if fn is not None else decorate
