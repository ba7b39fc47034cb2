"""The agent: runs inside each rank, owns the live state, answers commands over NATS.

Async programs use it directly::

    async with Agent(state, run="exp1") as agent:
        ...

Sync programs call :func:`runctl.agent.control`, which runs this same class on a background
event-loop thread.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Generic, Self, TypeVar

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

from runctl.agent.env import detect_rank, detect_run, detect_world_size
from runctl.agent.pending import PendingChanges, StepClock
from runctl.agent.state import LiveState
from runctl.agent.steps import Steps
from runctl.bus import messages as m
from runctl.bus.client import DEFAULT_MAX_PAYLOAD
from runctl.bus.connection import DEFAULT_URL, close_quietly, connect, env_url
from runctl.bus.credentials import redact_url
from runctl.bus.errors import (
    BadRequest,
    PayloadTooLarge,
    RunctlError,
    ServerStartError,
    TooLate,
)
from runctl.bus.registry import Registry, liveness
from runctl.bus.server import NatsServer
from runctl.bus.steplog import StepLog
from runctl.bus.subjects import (
    check_rank,
    check_token,
    command_wildcards,
    event_subject,
    state_subject,
)

__all__ = ["Agent"]

M = TypeVar("M", bound=BaseModel)
#: bound on every wait for the server while serving: the program never waits on a dead bus
PUBLISH_TIMEOUT: Final = 1.0
EMBEDDED_PORT: Final = 4222
#: a recorded run-wide stop applies to a rank starting this long after it was issued,
#: or at any time while another rank of the run is still alive
STOP_RECORD_WINDOW: Final = 60.0
#: a stop is written to the registry this long after the reply, off a broadcast's path
STOP_RECORD_DELAY: Final = 0.1
#: a rejection lists at most this many of pydantic's errors
MAX_ERRORS: Final = 50

log = structlog.get_logger()


class Agent(Generic[M]):
    def __init__(
        self,
        state: M,
        *,
        run: str | None = None,
        rank: str | int | None = None,
        url: str | None = None,
        heartbeat: float = 1.0,
        lock: threading.RLock | None = None,
        on_stop: Callable[[str], object] | None = None,
        embedded: bool | None = None,
        data_dir: str | os.PathLike[str] = ".runctl",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.live = LiveState(state, lock)
        self.run = check_token(run if run is not None else detect_run(), "run")
        self.rank = check_rank(rank if rank is not None else detect_rank(), allow_all=False)
        self.world_size = detect_world_size()
        self.url = url or env_url(default=None)
        # Zero-setup: with no URL configured, start a server if nothing listens on 4222.
        self.embedded = self.url is None if embedded is None else embedded
        self.heartbeat_interval = heartbeat
        self.data_dir = Path(data_dir)
        self.max_payload = max_payload
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self.stop_requested = False
        self.stop_reason = ""
        self._stop_callbacks: list[Callable[[str], object]] = [on_stop] if on_stop else []
        self.pending = PendingChanges()
        self.clock = StepClock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: TaskGroup | None = None
        self.ready = threading.Event()
        self.closed = threading.Event()
        self.nc: NATS | None = None
        self.registry: Registry | None = None
        self.server: NatsServer | None = None
        self._subs: list[Subscription] = []
        self._closing: anyio.Event | None = None
        self._record_lock: anyio.Lock | None = None
        #: registry acks of the command being answered (see _on_command)
        self._acks: list[asyncio.Future[Any]] | None = None
        self._tg: TaskGroup | None = None
        self._exited = False
        self._stop_recorded = False
        self.log = log.bind(run=self.run, rank=self.rank)
        # resumable steps: the API, and the log it reads (set once loaded)
        self.steps = Steps(self)
        self.steplog: StepLog | None = None
        self.steplog_error = ""

    # --- public -----------------------------------------------------------------------

    @property
    def state(self) -> M:
        return self.live.model

    @property
    def version(self) -> int:
        return self.live.version

    @property
    def step(self) -> int | None:
        return self.clock.step

    def on_stop(self, callback: Callable[[str], object]) -> Callable[[str], object]:
        """Register ``callback(reason)``; it runs on the agent's thread when a stop arrives
        (on the program's thread for a stop deferred to a step)."""
        self._stop_callbacks.append(callback)
        return callback

    def sync(self, step: int) -> int:
        """A step boundary: apply the deferred changes due at ``step``; return how many.

        Call it from the program's loop with the same step numbers on every rank (the
        global step). Costs a few hundred nanoseconds when nothing is due; never waits on
        the network (publishing the result is handed to the agent's thread).
        """
        self.clock.observe(step)
        due = self.pending.pop_due(step)
        if not due:
            return 0
        for item in due:
            reply, new_state = self._run(item.command, defer=False)
            self._soon(partial(self._after_deferred, item.command, reply, new_state, step))
        return len(due)

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        await self._tg.start(self.serve)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
        assert self._tg is not None
        await self._tg.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if not self.ready.is_set() and self._tasks is not None:
            # still trying to reach the bus (which may never answer): give up now rather
            # than hold up the program's exit
            self._tasks.cancel_scope.cancel()

    async def serve(self, *, task_status: TaskStatus[Self] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve commands and heartbeat until :meth:`aclose`; then say goodbye."""
        self._closing = anyio.Event()
        self._record_lock = anyio.Lock()
        self._loop = asyncio.get_running_loop()
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                await self._connect()
                await self._subscribe()
                await self._load_run_record()
                await self._announce()
                await self._open_steplog()
                self.ready.set()
                task_status.started(self)
                self.log.info(
                    "agent ready",
                    url=redact_url(self.url or ""),
                    subject=state_subject(self.run, self.rank),
                )
                while not self._closing.is_set():
                    with anyio.move_on_after(self.heartbeat_interval):
                        await self._closing.wait()
                    if not self._closing.is_set():
                        await self._beat()
                tasks.cancel_scope.cancel()  # pending escalation timers end with the agent
        finally:
            with anyio.CancelScope(shield=True):
                await self._shutdown()

    # --- connection -------------------------------------------------------------------

    async def _connect(self) -> None:
        if self.embedded and self.url is None:
            self.url = self._ensure_embedded_server()
        self.nc = await connect(
            self.url or DEFAULT_URL,
            name=f"runctl-agent:{self.run}:{self.rank}",
            retry_initial=True,
            role="agent",
        )
        try:
            with anyio.fail_after(5):
                self.registry = await Registry.open(self.nc.jetstream())
        except Exception as exc:
            # Control still works without JetStream; only discovery and reads from KV don't.
            self.log.warning("rank registry unavailable", error=str(exc) or type(exc).__name__)

    def _ensure_embedded_server(self) -> str:
        url = f"nats://127.0.0.1:{EMBEDDED_PORT}"
        if _listening("127.0.0.1", EMBEDDED_PORT):
            return url
        server = NatsServer(
            port=EMBEDDED_PORT, store_dir=self.data_dir / "nats", die_with_parent=True
        )
        try:
            # Started from this (the agent's) thread: it dies with the thread, no orphan.
            self.server = server.start()
            self.log.info("started embedded nats-server", url=url, store=str(server.store_dir))
        except ServerStartError as exc:
            if "address already in use" not in exc.log_line:
                raise
            # another rank won the race to start it: use theirs
        return url

    async def _subscribe(self) -> None:
        assert self.nc is not None
        for subject in command_wildcards(self.run, self.rank):
            self._subs.append(await self.nc.subscribe(subject, cb=self._on_command))
        await self.nc.flush(timeout=5)

    async def _load_run_record(self) -> None:
        """A run-wide stop issued before this rank started applies to it too."""
        if self.registry is None:
            return
        try:
            with anyio.fail_after(PUBLISH_TIMEOUT):
                record = await self.registry.get_run(self.run)
                if record is None or not record.stop_requested:
                    return
                recent = time.time() - record.ts < STOP_RECORD_WINDOW
                others = not recent and any(
                    r.rank != self.rank and liveness(r) == "alive"
                    for r in await self.registry.records(self.run)
                )
        except Exception as exc:
            self.log.debug("run record unavailable", error=str(exc) or type(exc).__name__)
            return
        if recent or others:
            self._request_stop(record.reason or "run stopped before this rank started")
            if record.mode == "terminate":
                self._soon(partial(self._escalate, record.grace))

    async def _announce(self) -> None:
        if self.registry is not None:
            schema = msgspec.json.encode(self.live.schema())
            await self._bounded(self.registry.put_schema(self.run, self.rank, schema))
        await self._publish_state(self.live.dump_json(), cause="started")
        await self._event(
            "started",
            host=self.host,
            pid=self.pid,
            model=type(self.state).__name__,
            world_size=self.world_size,
        )

    async def _open_steplog(self) -> None:
        """Load this rank's and the run's completed steps before ``ready``, so a
        program's first ``is_done()`` after ``wait_ready()`` is right. Without JetStream the
        agent still serves; the step API then raises Unavailable naming the cause."""
        assert self.nc is not None
        try:
            self.steplog = await StepLog.open(
                self.nc, run=self.run, rank=self.rank, host=self.host, pid=self.pid
            )
        except Exception as exc:
            self.steplog_error = str(exc) or type(exc).__name__
            self.log.warning("step log unavailable", error=self.steplog_error)

    async def _shutdown(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            if self.steplog is not None:  # flush queued step completions (bounded)
                await self.steplog.aclose()
            self._exited = True
            if self.nc.is_connected:
                await self._put_record(self.live.dump_json())
                await self._event("exited", reason=self.stop_reason)
            for sub in self._subs:
                with anyio.move_on_after(PUBLISH_TIMEOUT):
                    await sub.unsubscribe()
            with anyio.move_on_after(2):
                await self.nc.drain()
            await close_quietly(self.nc)
        if self.server is not None:
            await anyio.to_thread.run_sync(self.server.stop)
        self.closed.set()

    # --- commands ---------------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        command, reply, new_state = self._execute(verb, msg.data)
        # State, record, event and reply go out in one write; the record's ack is awaited
        # only after replying. Every wait on the network costs a GIL hand-off (~5 ms when
        # the program's loop holds the GIL), so none is on the caller's path. Read-your-
        # writes is kept by the caller instead: bus.Client waits (in its own process) until
        # the registry shows the version this reply reports.
        self._acks = []
        try:
            await self._after(verb, command, reply, new_state)
        finally:
            acks, self._acks = self._acks, None
        if msg.reply:
            try:
                await msg.respond(m.encode(reply))
            except Exception as exc:  # the asker is gone or the bus is down: nothing to do
                self.log.debug("reply failed", error=str(exc))
        for ack in acks:
            await self._bounded(ack)

    async def _after(
        self,
        verb: str,
        command: m.Command | None,
        reply: m.Reply,
        new_state: bytes | None,
        **data: Any,
    ) -> None:
        """Tell the world what a command did: state, record, event."""
        if new_state is not None:
            await self._publish_state(new_state, cause=verb)
            await self._event(verb, **data)
        elif isinstance(command, m.Stop) and isinstance(reply, m.Ok) and command.at_step is None:
            # No registry write on the reply path: a broadcast stop to 64 ranks would be 64
            # JetStream writes competing with the replies (bench/bench_fanout.py: 54 -> 21 ms
            # p50). The record follows shortly after; a run-wide stop is recorded by the client.
            await self._event("stop_requested", reason=self.stop_reason, mode=command.mode, **data)
            if not self._stop_recorded:  # a repeated stop changes nothing in the record
                self._stop_recorded = True
                self._soon(self._record_after_stop)
        elif isinstance(reply, m.Err) and reply.code == "validation":
            await self._event("rejected", verb=verb, errors=len(reply.detail), **data)
        elif (
            isinstance(reply, m.Ok)
            and isinstance(reply.value, dict)
            and (reply.value.get("pending"))
        ):
            await self._event("deferred", verb=verb, **reply.value)  # heartbeat: pending count

    async def _after_deferred(
        self, command: m.Command, reply: m.Reply, new_state: bytes | None, step: int
    ) -> None:
        verb = next(v for v, cls in m.COMMAND_TYPES.items() if type(command) is cls)
        change_id = getattr(command, "change_id", "")
        await self._after(verb, command, reply, new_state, at_step=step, change_id=change_id)
        if isinstance(command, m.Stop):
            await self._put_record(self.live.dump_json())
            await self._event(
                "stop_requested",
                reason=self.stop_reason,
                mode=command.mode,
                at_step=step,
                change_id=change_id,
            )

    def _execute(self, verb: str, data: bytes) -> tuple[m.Command | None, m.Reply, bytes | None]:
        """Decode and run one command. Never raises: errors become replies."""
        try:
            if len(data) > self.max_payload:
                raise PayloadTooLarge(len(data), self.max_payload)
            if verb not in m.COMMAND_TYPES:
                raise BadRequest(f"unknown verb {verb!r}")
            try:
                cmd = m.decode_command(verb, data)
            except (
                msgspec.DecodeError,
                msgspec.ValidationError,
                ValueError,
                TypeError,
                RecursionError,
            ) as exc:  # RecursionError: 100k-deep nesting
                raise BadRequest(f"malformed {verb} command: {exc}") from None
        except RunctlError as exc:
            return None, self._err(exc), None
        return (cmd, *self._run(cmd, defer=True))

    def _err(self, exc: RunctlError) -> m.Err:
        detail = list(getattr(exc, "errors", []))
        if len(detail) > MAX_ERRORS:  # 60k bad keys must not make a reply over max_payload
            more = len(detail) - MAX_ERRORS
            detail = [
                *detail[:MAX_ERRORS],
                {"type": "too_many_errors", "loc": [], "msg": f"and {more} more errors"},
            ]
        return m.Err(
            run=self.run,
            rank=self.rank,
            code=exc.code,
            message=str(exc),
            detail=detail,
            version=self.live.version,
        )

    def _run(self, cmd: m.Command, *, defer: bool) -> tuple[m.Reply, bytes | None]:
        """Run a decoded command now, or park it until its step. Never raises."""
        live = self.live
        new_state: bytes | None = None
        value: Any = None
        changed = False
        try:
            if defer and isinstance(cmd, m.DEFERRABLE) and cmd.at_step is not None:
                return self._defer(cmd), None
            match cmd:
                case m.Get(path=path):
                    value = msgspec.Raw(live.get(path))
                case m.Set(path=path, value=new):
                    changed = live.set(path, new)
                case m.Patch(value=new, path=path):
                    changed = live.patch(new, path)
                case m.Reset():
                    changed = live.reset()
                case m.Stop(reason=reason, mode=mode, grace=grace):
                    self._request_stop(reason)
                    if mode == "terminate":
                        self._soon(partial(self._escalate, grace))
                    value = {"stop_requested": True, "mode": mode}
                case m.Schema():
                    value = live.schema()
                case m.Ping():
                    value = {
                        "host": self.host,
                        "pid": self.pid,
                        "uptime": round(time.time() - self.started, 3),
                        "step": self.clock.step,
                        "step_rate": round(self.clock.rate, 3),
                        "pending": self.pending.snapshot(),
                    }
                case m.Cancel(change_id=change_id):
                    value = {"cancelled": self.pending.cancel(change_id)}
            if isinstance(cmd, m.Set | m.Patch | m.Reset):
                new_state = live.dump_json()
                value = msgspec.Raw(new_state)
                if not changed:
                    new_state = None
            return m.Ok(
                run=self.run, rank=self.rank, version=live.version, value=value, changed=changed
            ), new_state
        except RunctlError as exc:
            return self._err(exc), None
        except Exception as exc:  # a user validator's bug must not crash the program
            self.log.exception("command failed", command=type(cmd).__name__)
            return m.Err(
                run=self.run,
                rank=self.rank,
                code="internal",
                message=f"{type(exc).__name__}: {exc}",
                version=live.version,
            ), None

    def _defer(self, cmd: m.Set | m.Patch | m.Reset | m.Stop) -> m.Reply:
        """Validate now (every rank refuses a bad change before any applies), apply later."""
        assert cmd.at_step is not None
        # Validity first: an invalid change is refused as such on every rank, however late.
        match cmd:
            case m.Set(path=path, value=new):
                self.live.set(path, new, dry_run=True)
            case m.Patch(value=new, path=path):
                self.live.patch(new, path, dry_run=True)
            case m.Reset():
                self.live.reset(dry_run=True)
        current = self.clock.step
        if current is not None and current >= cmd.at_step:
            raise TooLate(f"rank {self.rank} is at step {current}, past at_step {cmd.at_step}")
        change_id = cmd.change_id or uuid.uuid4().hex
        self.pending.add(cmd.at_step, change_id, cmd)
        return m.Ok(
            run=self.run,
            rank=self.rank,
            version=self.live.version,
            value={
                "pending": True,
                "at_step": cmd.at_step,
                "change_id": change_id,
                "step": current,
            },
        )

    async def _record_after_stop(self) -> None:
        await anyio.sleep(STOP_RECORD_DELAY)
        await self._put_record(self.live.dump_json())

    def _soon(self, job: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``job`` on the agent's loop; callable from any thread, never blocks."""
        loop, tasks = self._loop, self._tasks
        if loop is None or tasks is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            tasks.start_soon(job)
        else:
            loop.call_soon_threadsafe(tasks.start_soon, job)

    async def _escalate(self, grace: float) -> None:
        """The operator asked for it: SIGTERM after ``grace``, SIGKILL after twice that.
        Cancelled when the agent closes, i.e. when the program stopped by itself."""
        await anyio.sleep(grace)
        self.log.warning("rank did not stop in time: SIGTERM", grace=grace)
        await self._event("escalated", signal="SIGTERM", grace=grace)
        await self._flush()
        os.kill(self.pid, signal.SIGTERM)
        await anyio.sleep(grace)
        self.log.warning("rank ignored SIGTERM: SIGKILL", grace=grace)
        await self._event("escalated", signal="SIGKILL", grace=grace)
        await self._flush()
        os.kill(self.pid, signal.SIGKILL)

    async def _flush(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            await self._bounded(self.nc.flush(timeout=1))

    def _request_stop(self, reason: str) -> None:
        first = not self.stop_requested
        self.stop_requested = True
        self.stop_reason = reason
        if not first:
            return
        self.log.info("stop requested", reason=reason)
        for callback in self._stop_callbacks:
            try:
                callback(reason)
            except Exception:
                self.log.exception("stop callback failed")

    # --- publishing -------------------------------------------------------------------

    async def _beat(self) -> None:
        changed = self.live.poll_changed()
        if changed is not None:
            await self._publish_state(changed, cause="changed")
            await self._event("changed", version=self.live.version)
        else:
            await self._publish_state(self.live.dump_json(), cause="heartbeat")

    async def _publish_state(self, state: bytes, *, cause: str) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        msg = m.StateMsg(
            run=self.run,
            rank=self.rank,
            version=self.live.version,
            ts=time.time(),
            state=msgspec.Raw(state),
            cause=cause,
        )
        try:
            await self.nc.publish(state_subject(self.run, self.rank), m.encode(msg))
        except Exception as exc:
            self.log.debug("state publish failed", error=str(exc))
        await self._put_record(state)

    async def _put_record(self, state: bytes) -> None:
        if self.registry is None or self._record_lock is None:
            return
        async with self._record_lock:  # records are sent in version order
            record = m.RankRecord(
                run=self.run,
                rank=self.rank,
                host=self.host,
                pid=self.pid,
                started=self.started,
                heartbeat=time.time(),
                heartbeat_interval=self.heartbeat_interval,
                version=self.live.version,
                state=msgspec.Raw(state),
                status="exited" if self._exited else "running",
                stop_requested=self.stop_requested,
                world_size=self.world_size,
                model=type(self.state).__name__,
                step=self.clock.step,
                step_rate=round(self.clock.rate, 3),
                pending=len(self.pending),
            )
            try:
                ack = await self.registry.put_nowait(record)
            except Exception as exc:
                self.log.debug("registry write failed", error=str(exc) or type(exc).__name__)
                return
        if self._acks is not None:  # a command is being answered: it waits for them all
            self._acks.append(ack)
        else:
            await self._bounded(ack)

    async def _event(self, kind: str, **data: Any) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        event = m.Event(
            run=self.run,
            rank=self.rank,
            kind=kind,
            ts=time.time(),
            version=self.live.version,
            data=data,
        )
        try:
            await self.nc.publish(event_subject(self.run, self.rank, kind), m.encode(event))
        except Exception as exc:
            self.log.debug("event publish failed", error=str(exc))

    async def _bounded(self, awaitable: Any) -> None:
        """A JetStream write that may not hold up the agent longer than PUBLISH_TIMEOUT."""
        try:
            with anyio.fail_after(PUBLISH_TIMEOUT):
                await awaitable
        except Exception as exc:
            self.log.debug("registry write failed", error=str(exc) or type(exc).__name__)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
