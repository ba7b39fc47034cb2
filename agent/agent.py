"""The agent: runs inside each rank, owns the live state, answers commands over NATS.

Async programs use it directly::

    async with Agent(state, run="exp1") as agent:
        ...

Sync programs call :func:`runctl.agent.control`, which runs this same class on a background
event-loop thread.

This module wires the parts together: the command core (:mod:`runctl.agent.commands`,
pure), publishing (:mod:`~runctl.agent.publish`), the lifecycle steps
(:mod:`~runctl.agent.lifecycle`), stop escalation (:mod:`~runctl.agent.escalation`), the
change journal (:mod:`~runctl.agent.journaling`) and the step log (:mod:`runctl.agent.steps`).

Why one module of this size: the agent's lifetime (connect, serve, close) and its command
entry points share one task group and one set of subscriptions; each part it wires is in
the modules above, and what stays here is the order in which they start and stop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel

import runctl.agent.checkpoint as checkpoint
import runctl.agent.commands as commands
import runctl.agent.lifecycle as lifecycle
from runctl.agent.announce import recorded_stop_line
from runctl.agent.commands import Effect, Outcome, RankState
from runctl.agent.embedded import announce_access, take_lease
from runctl.agent.embedded_lease import Lease, embedded_config
from runctl.agent.env import detect_rank, detect_run, detect_world_size
from runctl.agent.escalation import escalate, recorded_stop
from runctl.agent.journaling import Journaler, target_of
from runctl.agent.pending import PendingChanges, StepClock
from runctl.agent.progress import ExitErrors, Progress, ProgressMonitor
from runctl.agent.publish import Ack, AckTo, Publisher
from runctl.agent.replay import ReplayReport, replay_enabled, start_journal
from runctl.agent.state import LiveState
from runctl.agent.steps import StepLog, Steps
from runctl.agent.switching import switching
from runctl.bus import messages as m
from runctl.bus.acks import ack_to_of
from runctl.bus.connection import DEFAULT_URL, env_url
from runctl.bus.credentials import redact_url
from runctl.bus.defaults import MAX_PAYLOAD
from runctl.bus.direct import run_now, written_at_once
from runctl.bus.progress import StallPolicy
from runctl.bus.registry import Registry
from runctl.bus.sizelimit import SizeLimit
from runctl.bus.subjects import check_rank, check_token, state_subject

__all__ = ["Agent"]

M = TypeVar("M", bound=BaseModel)

log = structlog.get_logger()


class Agent(Generic[M]):
    """One rank's agent: owns the live state ``state`` and answers commands for it on
    ``runctl.<run>.<rank>.cmd.*`` and ``runctl.<run>.all.cmd.*``.

    ``run``/``rank`` default to the launcher's environment (:mod:`runctl.agent.env`);
    ``url`` to ``RUNCTL_NATS_URL``, else (``embedded``) the machine's shared local server
    (:mod:`runctl.agent.embedded`), with an HTTP gateway unless ``gateway=False``.
    ``lock`` is held while a change is applied; ``on_stop(reason)`` runs
    when a stop arrives; ``heartbeat`` is the seconds between state publishes; ``stall``
    when the program counts as stalled (default: ``RUNCTL_STALL_*``, else 10 x its recent
    step interval, at least 60 s; see :mod:`runctl.bus.progress`). ``connection``: an open
    NATS connection (nats-py, logged in with the agent role) to use instead of connecting;
    the agent leaves it open when it ends. Agents of one process on one event loop may
    share one: the server then hands a broadcast to all of them in one socket write, and
    their replies leave in one (bench_fanout's packed layout). Only where the login may
    publish to reply inboxes freely (a server without logins, or your own accounts):
    runctl's own ``runctl-agent`` user answers only through ``allow_responses``, and the
    server refuses the replies to a broadcast of agents that share its connection; there
    each agent needs its own connection. A shared connection also keeps the JetStream
    reply inboxes of agents that ended.
    """

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
        gateway: bool | None = None,
        data_dir: str | os.PathLike[str] = ".runctl",
        max_payload: int = MAX_PAYLOAD,
        replay: bool | None = None,
        stall: StallPolicy | None = None,
        connection: NATS | None = None,
    ) -> None:
        self.live = LiveState(state, lock)
        #: the caller's open connection, used instead of connecting and left open at the end
        self.connection = connection
        self.run = check_token(run if run is not None else detect_run(), "run")
        self.rank = check_rank(rank if rank is not None else detect_rank(), allow_all=False)
        self.world_size = detect_world_size()
        self.url = url or env_url(default=None)
        if connection is not None and connection.connected_url is not None:
            self.url = connection.connected_url.geturl()
        # Zero-setup: with no URL configured, share (or start) the machine's local server.
        if embedded is None:
            embedded = self.url is None and connection is None
        self.embedded = embedded
        #: the embedded bus: ports, and whether to bring up the gateway (checked now)
        self.embedded_config = embedded_config(gateway)
        self.lease: Lease | None = None
        self.heartbeat_interval = heartbeat
        self.data_dir = Path(data_dir)
        self.max_payload = max_payload
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = time.time()
        self.pending = PendingChanges()
        self.clock = StepClock()
        #: what commands read and change (see :mod:`runctl.agent.commands`)
        self.core = RankState(
            run=self.run,
            rank=self.rank,
            live=self.live,
            host=self.host,
            pid=self.pid,
            started=self.started,
            world_size=self.world_size,
            pending=self.pending,
            clock=self.clock,
            max_payload=max_payload,
        )
        # is the program advancing (see agent/progress.py), and did it end with an error
        self.progress = Progress()
        self.monitor = ProgressMonitor(self.progress, stall or StallPolicy.from_env())
        self.exit = ExitErrors()
        self.publisher = Publisher(
            self.core,
            heartbeat_interval=heartbeat,
            soon=self._soon,
            monitor=self.monitor,
            exit=self.exit,
        )
        self._stop_callbacks: list[Callable[[str], object]] = [on_stop] if on_stop else []
        self._checkpoint_callbacks: list[checkpoint.CheckpointFn] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the next sample of the program's threads between heartbeats, if one is due
        self._quick_sample: asyncio.TimerHandle | None = None
        self._tasks: TaskGroup | None = None
        #: tasks started while the agent closes, kept until they end
        self._stragglers: set[asyncio.Task[Any]] = set()
        self.ready = threading.Event()
        self.closed = threading.Event()
        self.nc: NATS | None = None
        self.registry: Registry | None = None
        #: why the last attempt to reach the bus failed, while it is not reached yet
        self.connect_error = ""
        self._subs: list[Subscription] = []
        self._closing: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self.log = log.bind(run=self.run, rank=self.rank)
        # resumable steps: the API, and the log it reads (set once loaded)
        self.steps = Steps(self)
        self.steplog: StepLog | None = None
        self.steplog_error = ""
        # the change journal: what this rank does is recorded; replayed when it starts
        self.journal = Journaler(self.core)
        self.replay = replay_enabled(replay)
        self.replay_report = ReplayReport()
        #: the GIL switch interval while runctl needs the GIL (RUNCTL_SWITCH_INTERVAL read now)
        self.gil = switching()

    # --- public -----------------------------------------------------------------------

    @property
    def state(self) -> M:
        """The live model (changed in place by commands)."""
        return self.live.model

    @property
    def version(self) -> int:
        """Bumped by every applied change (and by the program's own, at heartbeat)."""
        return self.live.version

    @property
    def step(self) -> int | None:
        """The last step passed to :meth:`sync` (None before the first)."""
        return self.clock.step

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The agent's event loop, once :meth:`serve` runs."""
        return self._loop

    @property
    def stop_requested(self) -> bool:
        """True once a stop arrived (or a run-wide stop recorded before this rank started)."""
        return self.core.stop_requested

    @property
    def stop_reason(self) -> str:
        """The reason given with the latest stop."""
        return self.core.stop_reason

    def on_stop(self, callback: Callable[[str], object]) -> Callable[[str], object]:
        """Register ``callback(reason)``; it runs on the agent's thread when a stop arrives
        (on the program's thread for a stop deferred to a step)."""
        self._stop_callbacks.append(callback)
        return callback

    def on_checkpoint(self, callback: checkpoint.CheckpointFn) -> checkpoint.CheckpointFn:
        """Register ``callback(step)`` for ``runctl stop RUN --checkpoint``: it runs on the
        program's thread at the stop's step and returns a path to store (or a value, or
        None); the stop is acknowledged once it is stored. See :mod:`runctl.agent.checkpoint`."""
        self._checkpoint_callbacks.append(callback)
        return callback

    def latest_checkpoint(self) -> checkpoint.Checkpoint | None:
        """The newest checkpoint this rank stored (in this run), or None."""
        return checkpoint.latest(self.steps, self.rank)

    def sync(self, step: int) -> int:
        """A step boundary: apply the deferred changes due at ``step``; return how many.

        Call it from the program's loop with the same step numbers on every rank (the
        global step). When nothing is due it stores the step and when it came (no lock,
        no network): under a microsecond with warm caches, about ten in a program that
        slept since its last step. Publishing a result is handed to the agent's thread. A
        new step counts as progress (see :meth:`tick`).
        """
        # Inline, not calls: in a program that slept between steps each call and object
        # touched costs microseconds (see StepClock); a step usually changes three fields.
        clock = self.clock
        if step != clock.step:
            self.progress.count += 1  # what Progress.tick does
            if clock.first is None:
                clock.observe(step)
            else:
                clock.step = step
                clock.at = time.monotonic()
        if step < self.pending.next_due:
            return 0
        due = self.pending.pop_due(step)
        if not due:
            return 0
        for item in due:
            if isinstance(item.command, m.Stop) and item.command.checkpoint:
                self._checkpoint(step, item.change_id)
            outcome = commands.apply(self.core, item.command, defer=False)
            self._carry_out(outcome.effects)
            self._soon(partial(self.publisher.after_deferred, outcome, step))
            self._soon(partial(self.journal.deferred, outcome, step))
        return len(due)

    def tick(self) -> None:
        """Mark progress without a step number: a loop that calls it is reported
        ``stalled`` when it stops calling it for longer than its threshold. One integer
        increment: no lock, no clock, no network, nothing for the agent's thread to do."""
        self.progress.tick()

    def _checkpoint(self, step: int, change_id: str) -> None:
        report = checkpoint.take(self.steps, self._checkpoint_callbacks, step)
        if self.steplog is not None and not self.steplog.closed:
            self.steplog.event(checkpoint.CHECKPOINT_STEP, change_id=change_id, **report)

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
        self.exit.record(exc_type, exc)
        await self.aclose()
        assert self._tg is not None
        await self._tg.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Ask :meth:`serve` to say goodbye and end (it returns once it has)."""
        if self._closing is not None:
            self._closing.set()
        if not self.ready.is_set() and self._tasks is not None:
            # still trying to reach the bus (which may never answer): give up now rather
            # than hold up the program's exit
            self._tasks.cancel_scope.cancel()

    async def serve(self, *, task_status: TaskStatus[Self] = anyio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve commands and heartbeat until :meth:`aclose`; then say goodbye."""
        self._closing = anyio.Event()
        self._loop = asyncio.get_running_loop()
        gil = self.gil
        gil.attach()
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                if self.embedded and self.url is None:
                    self.lease = await take_lease(self.embedded_config, self.data_dir, self.log)
                    self.url = self.lease.nats_url
                self.nc, self.registry = await lifecycle.connect_agent(
                    self.url or DEFAULT_URL,
                    self.run,
                    self.rank,
                    self.log,
                    self._connect_failed,
                    connection=self.connection,
                )
                self.connect_error = ""
                # the largest state a message carries: changes beyond it are refused
                self.live.size_limit = SizeLimit(self.nc.max_payload or self.max_payload)
                self.publisher.attach(self.nc, self.registry)
                self.replay_report = await start_journal(
                    self.nc, self.journal, self.publisher, replay=self.replay
                )
                self._subs = await lifecycle.subscribe_commands(
                    self.nc, self.run, self.rank, self._on_command_now
                )
                await self._apply_recorded_stop()
                await lifecycle.announce(self.publisher, self.core)
                opened = await lifecycle.open_steplog(self.nc, self.core, self.log)
                if isinstance(opened, StepLog):
                    self.steplog = opened
                else:
                    self.steplog_error = opened
                self.ready.set()
                task_status.started(self)
                if self.lease is not None:
                    self._soon(
                        partial(announce_access, self.lease, self.run, self.rank, self.registry)
                    )
                self.log.info(
                    "agent ready",
                    url=redact_url(self.url or ""),
                    subject=state_subject(self.run, self.rank),
                )
                while not self._closing.is_set():
                    gil.sample()
                    self._sample_soon()
                    with anyio.move_on_after(self.heartbeat_interval):
                        await self._closing.wait()
                    if not self._closing.is_set():
                        if self.steplog is not None:
                            self.steplog.check()  # a reconnect: its writer sleeps otherwise
                        await self.publisher.beat()
                tasks.cancel_scope.cancel()  # pending escalation timers end with the agent
        finally:
            self._stop_sampling()
            with anyio.CancelScope(shield=True):
                await self.journal.aclose()
                await lifecycle.shutdown(
                    self.nc,
                    publisher=self.publisher,
                    steplog=self.steplog,
                    subs=self._subs,
                    lease=self.lease,
                    owned=self.connection is None,
                )
                gil.detach()
                self.closed.set()

    # --- the switch interval between heartbeats -------------------------------------------

    def _sample_soon(self) -> None:
        """Sample the program's threads again before the next heartbeat if the switch
        interval asks for it (agent/switching.py). A plain timer on the loop, not a task: a
        wake-up of an idle process costs its cold caches, so it does as little as it can."""
        if self._quick_sample is not None or self._loop is None:
            return
        delay = self.gil.resample_in(self)
        if delay is not None:
            self._quick_sample = self._loop.call_later(delay, self._sample_between_beats)

    def _sample_between_beats(self) -> None:
        self._quick_sample = None
        if self._closing is not None and not self._closing.is_set():
            self.gil.sample()
            self._sample_soon()

    def _stop_sampling(self) -> None:
        if self._quick_sample is not None:
            self._quick_sample.cancel()
            self._quick_sample = None
        self.gil.release_sampling(self)

    def _connect_failed(self, why: str) -> None:
        self.connect_error = why

    # --- commands ---------------------------------------------------------------------

    def _on_command_now(self, msg: Msg) -> None:
        """A command, handled as nats-py reads it, up to its reply with no turn of the event
        loop in between (bus/direct.py): each turn is a GIL hand-off in a program whose
        threads hold the GIL, and CPU when 64 rank processes wake for one broadcast."""
        run_now(self._on_command(msg), self._later)

    async def _on_command(self, msg: Msg) -> None:
        nc = self.nc
        if nc is not None and self.connection is None:
            # A low switch interval while the command is handled; everything it sends is
            # written at once after (not on the flusher's next turn, with no wake-up of the
            # flusher per publish), once the program's interval is back: whoever reads the
            # answer finds it in place. A connection shared by many agents is left to the
            # flusher, which sends all their replies to a broadcast in one write.
            with written_at_once(nc), self.gil.command():
                acks = await self._handle(msg)
        else:
            with self.gil.command():
                acks = await self._handle(msg)
        if acks:  # the registry's acks, awaited off the command's way: none holds up the next
            self._later(partial(self.publisher.wait, acks))

    async def _handle(self, msg: Msg) -> list[Ack]:
        """Execute a command and send everything it makes (state, record, event, journal
        record, reply) to the connection's buffer without waiting: returns the registry
        acks still to be awaited. It enters no cancel scope: it may start in nats-py's
        reader task and, should a write have to wait for the socket, continue in another
        (bus/direct.py)."""
        verb = msg.subject.rsplit(".", 1)[-1]
        outcome = commands.execute(self.core, verb, msg.data)
        self._carry_out(outcome.effects)
        record = self.journal.prepare(outcome, target_of(msg.subject))
        # State, record, event and reply go out in one write; the record's ack is awaited
        # only after replying. Every wait on the network costs a GIL hand-off (~5 ms when
        # the program's loop holds the GIL), so none is on the caller's path. Read-your-
        # writes is kept by the caller instead: bus.Client waits (in its own process) until
        # the registry shows the version this reply reports. The acks are this call's own:
        # a command on the rank subject and one on the ``all`` subject run concurrently.
        # The journal record goes out with them (a stop's just after the reply); the writer
        # waits until it is stored before telling its caller (agent/journaling.py).
        # The writer may ask for the stores' acknowledgements on its own inbox (bus/acks.py):
        # then it waits for them instead of reading the registry and the journal.
        reply = outcome.reply
        subject = ack_to_of(msg) if isinstance(reply, m.Ok) and msg.reply else ""
        ack_to = AckTo(subject) if subject else None
        acks = await self.publisher.after(verb, outcome, ack_to)
        acks += await self.journal.send(record, replied=False, ack_to=ack_to)
        if ack_to is not None and isinstance(reply, m.Ok):
            reply.acks = ack_to.sent + self.journal.after_reply(record)
        await self._reply(msg, outcome)
        acks += await self.journal.send(record, replied=True, ack_to=ack_to)
        return acks

    async def _reply(self, msg: Msg, outcome: Outcome) -> None:
        if not msg.reply:
            return
        payload = m.encode(outcome.reply)
        limit = self.live.size_limit
        if limit is not None and len(payload) > limit.max_payload:  # never a silent 504
            where = f"rank {self.rank} of run {self.run}"
            error = limit.unreadable(len(payload), where)
            payload = m.encode(commands.error_reply(self.core, error))
        try:
            await msg.respond(payload)
        except Exception as exc:  # the asker is gone or the bus is down: nothing to do
            self.log.debug("reply failed", error=str(exc))

    async def _apply_recorded_stop(self) -> None:
        """A run-wide stop issued before this rank started applies to it too."""
        record = await recorded_stop(self.registry, self.run, self.rank)
        if record is None:
            return
        print(recorded_stop_line(record, self.rank), file=sys.stderr, flush=True)
        reason = record.reason or "run stopped before this rank started"
        first = commands.request_stop(self.core, reason)
        self._carry_out((commands.StopEffect(reason, record.mode, record.grace, first),))

    def _carry_out(self, effects: tuple[Effect, ...]) -> None:
        """Run a command's effects on the calling thread (a stop's callbacks); hand the
        rest (escalation) to the agent's loop."""
        for effect in effects:
            if effect.first:
                self.log.info("stop requested", reason=effect.reason)
                for callback in self._stop_callbacks:
                    try:
                        callback(effect.reason)
                    except Exception:
                        self.log.exception("stop callback failed")
            if effect.mode == "terminate":
                self._soon(partial(escalate, effect.grace, pid=self.pid, publisher=self.publisher))

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

    def _later(self, job: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``job`` in a task on the agent's loop (called on that loop): in the agent's
        task group, or on its own while the agent closes (a command's rest is not lost)."""
        if self._tasks is not None:
            try:
                self._tasks.start_soon(job)
                return
            except RuntimeError:  # the task group has ended
                pass
        task = asyncio.ensure_future(job())
        self._stragglers.add(task)
        task.add_done_callback(self._stragglers.discard)
