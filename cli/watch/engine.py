"""``runctl watch``'s process: subscribe, track, notify, act.

It subscribes to the runs' state messages and events (and to the stop and write commands
others send, to check that every rank took them), feeds them to a :class:`Tracker`, sends
each notice to every destination (in the background: a slow receiver never holds up the
watch), and, for a ``--when`` condition with ``--then``, acts: a stop or a change on every
rank of the run, sent under the watcher's own identity (the change journal records it as
by ``runctl-watch@host``) and reported as a notice of its own, with the ranks that
acknowledged it.

It holds no state worth keeping: stop it, restart it, run several.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.msg import Msg

from runctl.bus import assign
from runctl.bus import messages as m
from runctl.bus.client import Client, Gathered, Result
from runctl.bus.conditions import Condition
from runctl.bus.errors import BadRequest, RunctlError
from runctl.bus.subjects import PREFIX, check_token
from runctl.cli.watch.notices import KINDS, Notice, NoticeKind
from runctl.cli.watch.notify import Delivery, Destination, Retry, deliver
from runctl.cli.watch.tracker import DEFAULT_ACK_TIMEOUT, Tracker

__all__ = ["Action", "WatchOptions", "Watcher", "parse_action", "watch_subjects"]

log = structlog.get_logger()

#: how often time alone is checked (stale, stalled, overdue acknowledgements)
TICK: Final = 0.25
#: deliveries in flight at once (a burst of notices never opens hundreds of connections)
MAX_IN_FLIGHT: Final = 16
#: messages waiting to be handled; beyond that the oldest heartbeats are what is lost
QUEUE: Final = 10_000


@dataclass(frozen=True, slots=True)
class Action:
    """What ``--then`` does on every rank of the run where a condition became true."""

    kind: Literal["stop", "set"]
    assignments: tuple[assign.Assignment, ...] = ()

    def describe(self) -> str:
        """The action in words, for notices and logs (``stop``, ``set lr=0.001``)."""
        if self.kind == "stop":
            return "stop"
        return "set " + " ".join(f"{a.path}={a.text}" for a in self.assignments)


def parse_action(text: str) -> Action:
    """``stop`` or ``set PATH=VALUE [PATH=VALUE ...]`` (values as in ``runctl set``)."""
    words = text.split()
    if words == ["stop"]:
        return Action("stop")
    if len(words) >= 2 and words[0] == "set":
        assignments = tuple(assign.parse_assignment(w) for w in words[1:])
        if len(assignments) > 1:
            assign.assignments_patch(list(assignments))  # conflicting paths: a usage error
        return Action("set", assignments)
    raise BadRequest(
        f"--then must be 'stop' or 'set PATH=VALUE [PATH=VALUE ...]', not {text[:60]!r}"
    )


@dataclass(slots=True)
class WatchOptions:
    """What to watch and how (``runctl watch``'s options)."""

    run: str | None = None
    conditions: Sequence[Condition] = ()
    action: Action | None = None
    kinds: frozenset[NoticeKind] = frozenset(KINDS)
    ack_timeout: float = DEFAULT_ACK_TIMEOUT
    retry: Retry = field(default_factory=Retry)
    #: who the watcher is, in notices and in the change journal
    name: str = field(default_factory=lambda: f"runctl-watch@{socket.gethostname()}")
    #: also check that stops and synchronised changes reach every rank (subscribes to
    #: command subjects: see watch_subjects)
    commands: bool = True


def watch_subjects(run: str | None, *, commands: bool) -> list[str]:
    """What the watcher subscribes to. Commands only where it checks them (stops to any
    target; changes and cancellations sent to ``all``, where synchronised changes go): a
    subscriber to a command subject is, to NATS, someone who may answer, so a command to a
    rank that does not exist then fails after the client's registry check, not at once."""
    part = check_token(run, "run") if run is not None else "*"
    subjects = [f"{PREFIX}.{part}.*.state", f"{PREFIX}.{part}.*.evt.*"]
    if commands:
        subjects.append(f"{PREFIX}.{part}.*.cmd.stop")
        subjects += [f"{PREFIX}.{part}.all.cmd.{verb}" for verb in ("set", "patch", "reset")]
        subjects.append(f"{PREFIX}.{part}.all.cmd.cancel")
    return subjects


class Watcher:
    """Runs until cancelled. ``client`` must be connected (as the operator when there is
    an action, else the observer role is enough)."""

    def __init__(
        self,
        client: Client,
        options: WatchOptions,
        destinations: Sequence[Destination],
        *,
        clock: Callable[[], float] = time.monotonic,
        stop_after: int | None = None,
    ) -> None:
        self.client = client
        self.options = options
        self.destinations = list(destinations)
        self.tracker = Tracker(options.conditions, ack_timeout=options.ack_timeout)
        self.clock = clock
        #: every delivery's outcome, newest last (bounded: tests and `--count` read it)
        self.deliveries: list[Delivery] = []
        self.notices = 0
        #: set once ``stop_after`` notices were delivered (``runctl watch --count``)
        self.done = anyio.Event()
        self._stop_after = stop_after
        self._delivered = 0
        self._tasks: TaskGroup | None = None
        self._in_flight = anyio.Semaphore(MAX_IN_FLIGHT)
        self._acting: set[tuple[int, str]] = set()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and watch until cancelled; ``task_status.started()`` once subscribed."""
        nc = self.client.nc
        send, receive = anyio.create_memory_object_stream[tuple[float, Msg]](QUEUE)

        async def forward(msg: Msg) -> None:
            try:
                send.send_nowait((self.clock(), msg))
            except anyio.WouldBlock:
                log.warning("watcher falling behind: a message was dropped", subject=msg.subject)

        subjects = watch_subjects(self.options.run, commands=self.options.commands)
        subs = [await nc.subscribe(s, cb=forward) for s in subjects]
        await nc.flush(timeout=5)
        log.info(
            "watching",
            subjects=subjects,
            destinations=[d.name for d in self.destinations],
            conditions=[str(c) for c in self.options.conditions],
            action=self.options.action.describe() if self.options.action else None,
        )
        try:
            async with receive, anyio.create_task_group() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._ticker)
                task_status.started()
                async for received, msg in receive:
                    self._handle(received, msg)
        finally:
            with anyio.CancelScope(shield=True):
                for sub in subs:
                    with anyio.move_on_after(1):
                        await sub.unsubscribe()
            send.close()  # after the subscriptions: no callback sends any more

    async def _ticker(self) -> None:
        while True:
            await anyio.sleep(TICK)
            self._dispatch(self.tracker.tick(self.clock()))

    def _handle(self, received: float, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) < 4 or parts[0] != PREFIX:
            return
        run, rank, kind = parts[1], parts[2], parts[3]
        try:
            if kind == "state":
                notices = self.tracker.on_state(m.decode_state(msg.data), received)
            elif kind == "evt":
                notices = self.tracker.on_event(m.decode_event(msg.data), received)
            elif kind == "cmd" and len(parts) == 5:
                notices = self.tracker.on_command(
                    run, rank, m.decode_command(parts[4], msg.data), received
                )
            else:
                return
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            log.debug("not a runctl message", subject=msg.subject, error=str(exc))
            return
        self._dispatch(notices)

    def _dispatch(self, notices: list[Notice]) -> None:
        for notice in notices:
            if notice.kind == "condition" and self.options.action is not None:
                self._act(notice)
            if notice.kind not in self.options.kinds:
                continue
            self.notices += 1
            for destination in self.destinations:
                self._start(self._deliver, destination, notice)

    async def _deliver(self, destination: Destination, notice: Notice) -> None:
        async with self._in_flight:
            outcome = await deliver(destination, notice, self.options.name, self.options.retry)
        self.deliveries.append(outcome)
        del self.deliveries[:-1000]
        if outcome.ok:
            self._delivered += 1
            if self._stop_after is not None and self._delivered >= self._stop_after:
                self.done.set()

    # --- --then ----------------------------------------------------------------------

    def _act(self, notice: Notice) -> None:
        key = (int(notice.data.get("index", 0)), notice.run)
        if key in self._acting:  # one action at a time per condition and run
            return
        self._acting.add(key)
        self._start(self._run_action, notice, key)

    def _start(self, job: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        assert self._tasks is not None, "the watcher is not running"
        self._tasks.start_soon(job, *args)

    async def _run_action(self, notice: Notice, key: tuple[int, str]) -> None:
        action = self.options.action
        assert action is not None
        run = notice.run
        condition = notice.data.get("condition", "")
        reason = f"{self.options.name}: {condition}"
        try:
            result = await self._send_action(action, run, reason)
        except RunctlError as exc:
            summary = f"run {run}: {action.describe()} after {condition!r} failed: {exc.describe()}"
            data: dict[str, Any] = {"action": action.describe(), "error": exc.describe()}
        else:
            summary, data = _action_report(run, action, str(condition), result)
        finally:
            self._acting.discard(key)
        log.info("action done", run=run, action=action.describe(), summary=summary)
        self._dispatch([Notice("action", run, None, summary, {"condition": condition, **data})])

    async def _send_action(self, action: Action, run: str, reason: str) -> Result | Gathered:
        client = self.client
        if action.kind == "stop":
            return await client.stop(run, "all", reason=reason)
        if len(action.assignments) == 1:
            a = action.assignments[0]
            return await assign.set_text(client, run, "all", a.path, a.text)
        return await assign.patch_assignments(client, run, "all", list(action.assignments))


def _action_report(
    run: str, action: Action, condition: str, result: Result | Gathered
) -> tuple[str, dict[str, Any]]:
    if isinstance(result, Result):
        acked, missing, rejected = [result.rank], [], {}
    else:
        acked = [r for r in result.acknowledged if r in result.results]
        missing = list(result.missing)
        rejected = {r: e.describe() for r, e in result.errors.items()}
    done = "stopped" if action.kind == "stop" else f"applied {action.describe()}"
    parts = [f"acknowledged by rank(s) {', '.join(acked)}" if acked else "no rank acknowledged"]
    if missing:
        parts.append(f"no answer from rank(s) {', '.join(missing)}")
    if rejected:
        parts.append(f"rejected by rank(s) {', '.join(rejected)}")
    summary = f"run {run}: {done} after {condition!r}: {'; '.join(parts)}"
    return summary, {
        "action": action.describe(),
        "acknowledged": acked,
        "missing": missing,
        "rejected": rejected,
        "complete": bool(acked) and not missing and not rejected,
    }
