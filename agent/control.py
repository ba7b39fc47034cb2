"""``control()``: the one line a sync program adds.

    ctl = control(state, run="exp1")          # returns at once
    for epoch in range(100):
        if ctl.stop_requested:
            break
        with ctl.lock:                        # several fields, consistently
            lr, momentum = state.optimizer.lr, state.optimizer.momentum
        ...
    ctl.close()                               # or: with control(state) as ctl: ...

The agent runs on its own daemon thread with its own event loop, reached through an anyio
BlockingPortal. The program's thread never waits on the network: commands are applied by
the agent thread under ``ctl.lock``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import queue
import threading
import time
import types
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, Self, TypeVar, cast, overload

import anyio
from anyio.from_thread import BlockingPortal
from pydantic import BaseModel

from runctl.agent.agent import Agent
from runctl.agent.checkpoint import Checkpoint, CheckpointFn
from runctl.agent.eventloop import agent_loop
from runctl.agent.replay import ReplayedChange
from runctl.agent.steps import Steps
from runctl.agent.steps.cached import Cached
from runctl.bus.credentials import redact_url
from runctl.bus.errors import BadRequest, Unavailable
from runctl.bus.journal import Skipped
from runctl.bus.logs import keep_lines_whole

__all__ = ["Control", "control"]

M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")
R = TypeVar("R")


class _StepMethod(Generic[P, R]):
    """``ctl.<name>(...)`` calls ``ctl.agent.steps.<method>(...)``: the step API on the
    sync handle, typed and documented as the method it calls."""

    def __init__(self, method: Callable[Concatenate[Steps, P], R]) -> None:
        self._method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, obj: Control[Any], owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, obj: Control[Any] | None, owner: type[Any]) -> Self | Callable[P, R]:
        if obj is None:
            return self
        return cast(Callable[P, R], types.MethodType(self._method, obj.agent.steps))


class Control(Generic[M]):
    """Handle returned by :func:`control`. Also a context manager.

    The step API (:class:`runctl.agent.steps.Steps`) is here too: ``ctl.steps(...)``
    (:meth:`Steps.iter`), ``ctl.asteps`` (:meth:`Steps.aiter`), ``ctl.once``
    (:meth:`Steps.step`; ``ctl.step`` is the :meth:`sync` step number), ``ctl.cached``,
    ``ctl.is_done``, ``ctl.done`` and ``ctl.forget``; the rest on ``ctl.agent.steps``.
    """

    steps = _StepMethod(Steps.iter)
    asteps = _StepMethod(Steps.aiter)
    once = _StepMethod(Steps.step)
    is_done = _StepMethod(Steps.is_done)
    done = _StepMethod(Steps.done)
    forget = _StepMethod(Steps.forget)

    def __init__(self, agent: Agent[M]) -> None:
        self.agent = agent
        self._portal, self._thread = _start_loop_thread(f"runctl-agent-{agent.rank}")
        self._future: Future[None] = self._portal.start_task_soon(agent.serve)
        self._closed = False
        agent.exit.install()  # an uncaught exception is reported in the rank's exit
        atexit.register(self.close)

    # --- what the program reads ----------------------------------------------------------

    @property
    def state(self) -> M:
        """The live model: read it freely; commands change it in place."""
        return self.agent.state

    @property
    def lock(self) -> threading.RLock:
        """Hold it to read several fields consistently; changes are applied under it."""
        return self.agent.live.lock

    @property
    def version(self) -> int:
        """Bumped by every applied change (and by changes the program makes, at heartbeat)."""
        return self.agent.live.version

    @property
    def stop_requested(self) -> bool:
        """True once a stop arrived: finish the current step and leave the loop."""
        return self.agent.stop_requested

    @property
    def stop_reason(self) -> str:
        """The reason given with the latest stop."""
        return self.agent.stop_reason

    @property
    def run(self) -> str:
        """This process's run id."""
        return self.agent.run

    @property
    def rank(self) -> str:
        """This process's rank."""
        return self.agent.rank

    @property
    def url(self) -> str | None:
        """The NATS URL the agent uses (None until known, with an embedded server)."""
        return self.agent.url

    @property
    def replayed(self) -> list[ReplayedChange]:
        """The journaled changes this rank applied when it started (oldest first); empty
        for a fresh run, with ``replay=False``, or before ``wait_ready()``."""
        return list(self.agent.replay_report.replayed)

    @property
    def replay_skipped(self) -> list[Skipped]:
        """Journaled changes the replay could not apply any more, with the reason."""
        return list(self.agent.replay_report.skipped)

    @property
    def step(self) -> int | None:
        """The last step passed to :meth:`sync`."""
        return self.agent.step

    def on_stop(self, callback: Callable[[str], object]) -> Callable[[str], object]:
        """``callback(reason)`` runs on the agent thread when a stop command arrives."""
        return self.agent.on_stop(callback)

    def on_checkpoint(self, callback: CheckpointFn) -> CheckpointFn:
        """``callback(step)`` saves a checkpoint for ``runctl stop RUN --checkpoint``.

        It runs on this thread at the stop's step (every rank at the same step) and returns
        the path of what it saved (stored in the object store, streamed), a value to store,
        or None. The stop is acknowledged once the checkpoint is stored::

            @ctl.on_checkpoint
            def save(step: int) -> str:
                torch.save(model.state_dict(), f"ckpt-{step}.pt")
                return f"ckpt-{step}.pt"
        """
        return self.agent.on_checkpoint(callback)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint this rank stored in this run, or None: ``.step``,
        ``.files[name].download(path)``, ``.download(directory)``, ``.result()``."""
        return self.agent.latest_checkpoint()

    def sync(self, step: int) -> int:
        """Call at every step boundary with the global step (the same on every rank).

        Applies the synchronised changes due at ``step`` (including a synchronised stop) on
        this thread, before returning; returns how many. Reports the step, so operators
        can see progress and the client can pick a step every rank has not reached yet.
        Never waits on the network.
        """
        return self.agent.sync(step)

    def tick(self) -> None:
        """Mark progress (a batch, an item, a request served) in a loop that does not call
        :meth:`sync`: the rank is reported ``stalled`` when the program stops advancing
        for longer than its threshold (docs/distributed.md, "Liveness"). One integer
        increment: no lock, no clock, no network, no hand-off to the agent's thread."""
        self.agent.progress.tick()

    def wait_ready(self, timeout: float = 10.0) -> Self:
        """Block until the agent is connected and registered (tests, scripts). An agent
        that failed to start raises at once, not after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.agent.ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._future.done():
                exc = None if self._future.cancelled() else self._future.exception()
                raise Unavailable(f"runctl agent failed to start: {exc or 'it ended'}") from exc
            if time.monotonic() >= deadline:
                break
        if not self.agent.ready.is_set():
            why = self.agent.connect_error  # e.g. a refused login, and where logins come from
            raise Unavailable(
                f"runctl agent not connected after {timeout:g}s (url {redact_url(self.url or '')})"
                + (f": {why}" if why else "")
            )
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Publish ``exited``, drain the connection, stop the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._portal.call(self.agent.aclose)
            self._future.result(timeout)
        except Exception as exc:  # a failed agent must not fail the program's exit
            self.agent.log.debug("agent close failed", error=str(exc))
        finally:
            # the loop may already be gone (interpreter shutdown): nothing left to stop
            with contextlib.suppress(Exception):
                self._portal.call(self._portal.stop, True)
            self._thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.agent.exit.record(exc_type, exc)
        self.close()

    def __repr__(self) -> str:
        return f"<Control run={self.run!r} rank={self.rank!r} version={self.version}>"

    @property
    def cached(self) -> Cached:
        """``@ctl.cached()``: the function's result is logged; see :class:`Cached`."""
        return self.agent.steps.cached


def control(
    state: M,
    run: str | None = None,
    rank: str | int | None = None,
    *,
    url: str | None = None,
    heartbeat: float = 1.0,
    on_stop: Callable[[str], object] | None = None,
    **options: Any,
) -> Control[M]:
    """Make ``state`` controllable from outside. Returns at once; see the module docs.

    ``run`` defaults to ``RUNCTL_RUN`` (or the launcher's job id, or a generated id);
    ``rank`` to ``RUNCTL_RANK``, ``RANK``, ``SLURM_PROCID``, else 0. ``url`` defaults to
    ``RUNCTL_NATS_URL``; with neither, a nats-server is started if none listens on 4222.
    """
    keep_lines_whole()  # the agent's thread logs while the program prints
    agent = Agent(
        state, run=run, rank=rank, url=url, heartbeat=heartbeat, on_stop=on_stop, **options
    )
    return Control(agent)


def _loop_options(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The agent loop's backend options: the standard asyncio loop (polling less often:
    :mod:`runctl.agent.eventloop`) unless ``RUNCTL_LOOP=uvloop``. uvloop cuts what a
    broadcast to many rank processes on one machine costs the ranks (~15 % CPU at 64), but
    doubles how long a change takes to reach a program that holds the GIL
    (docs/performance.md): hence opt-in."""
    choice = (os.environ if env is None else env).get("RUNCTL_LOOP", "").strip().lower()
    if choice in ("", "asyncio"):
        return {"loop_factory": agent_loop}
    if choice != "uvloop":
        raise BadRequest(f"RUNCTL_LOOP must be 'uvloop' or 'asyncio', not {choice[:20]!r}")
    if importlib.util.find_spec("uvloop") is None:
        raise BadRequest("RUNCTL_LOOP=uvloop, but uvloop is not installed")
    return {"use_uvloop": True}


def _start_loop_thread(name: str) -> tuple[BlockingPortal, threading.Thread]:
    """An event loop on a *daemon* thread (anyio's start_blocking_portal uses a non-daemon
    pool thread, which would hang interpreter exit if the program never calls close())."""
    handoff: queue.Queue[BlockingPortal | BaseException] = queue.Queue()

    async def main() -> None:
        async with BlockingPortal() as portal:
            handoff.put(portal)
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(main, backend="asyncio", backend_options=_loop_options())
        except BaseException as exc:  # surfaced to the caller below
            handoff.put(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    got = handoff.get()
    if isinstance(got, BaseException):
        raise got
    return got, thread
