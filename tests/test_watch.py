"""``runctl watch`` as a real process against real ranks, with a real HTTP receiver on
127.0.0.1: one webhook per condition (retried while the receiver fails), a --when
condition that fires once until it clears, --then stop, stops nobody acknowledged,
dry runs and usage errors."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import msgspec
import nats
import pytest
from conftest import ROOT
from test_agent_processes import Ranks
from test_stalled import LOOP, STALL_ENV, advancing

from runctl.bus import Client
from runctl.bus import messages as m
from runctl.bus.subjects import state_subject

pytestmark = pytest.mark.anyio


class Receiver:
    """A webhook receiver on 127.0.0.1 (a free port): answers ``fail_first`` POSTs with
    503, then 200; keeps every attempt and every accepted body."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.attempts.append(body)
                    ok = len(receiver.attempts) > receiver.fail_first
                    if ok:
                        receiver.accepted.append(body)
                self.send_response(200 if ok else 503)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook/secret-path"

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [b for b in self.accepted if b["kind"] == kind]

    async def wait(self, kind: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
        with anyio.fail_after(timeout):
            while True:
                found = self.of(kind)
                if len(found) >= count:
                    return found
                await anyio.sleep(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Watch:
    """A ``runctl watch`` process; its stderr is read continuously (it logs at info)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runctl", "watch", *args],
            cwd=str(ROOT),
            env={**_env(), "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        threading.Thread(
            target=self._read, args=(self.proc.stderr, self.lines), daemon=True
        ).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True).start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    async def watching(self, timeout: float = 30) -> None:
        with anyio.fail_after(timeout):
            while True:
                if any("runctl: watching" in line for line in self.lines):
                    return
                if self.proc.poll() is not None:
                    await anyio.sleep(0.2)  # let the reader threads take the rest
                    raise AssertionError(f"watch exited {self.proc.returncode}: {self.log()}")
                await anyio.sleep(0.05)

    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def ranks() -> Iterator[Ranks]:
    handle = Ranks()
    yield handle
    handle.cleanup()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    handle = Receiver()
    yield handle
    handle.close()


@pytest.fixture
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.stop()


async def _after_beats(client: Client, run: str, rank: str, since: float, beats: int) -> None:
    """Wait until the rank's record shows ``beats`` heartbeats after wall time ``since``
    (the watcher has then seen as many state messages: its chance to repeat itself)."""
    with anyio.fail_after(20):
        while True:
            info = await client.rank(run, rank)
            if info.record.heartbeat > since + beats * info.record.heartbeat_interval:
                return
            await anyio.sleep(0.05)


async def test_one_webhook_per_condition_with_retries(
    nats_url: str, run_id: str, ranks: Ranks, watches: list[Watch]
) -> None:
    receiver = Receiver(fail_first=2)  # the first notice needs two retries
    try:
        await _scenario(nats_url, run_id, ranks, watches, receiver)
    except (TimeoutError, AssertionError) as error:
        story = await _story(error, receiver, watches, ranks, nats_url, run_id)
        raise AssertionError(story) from error
    finally:
        receiver.close()


async def _story(
    error: BaseException,
    receiver: Receiver,
    watches: list[Watch],
    ranks: Ranks,
    nats_url: str,
    run_id: str,
) -> str:
    """What a failed scenario saw: the POSTs in order, the watcher's log, each rank's
    record as the registry holds it now and the end of its stderr."""
    attempts = [(a["kind"], a["rank"], a["id"][:8]) for a in receiver.attempts]
    records: list[object] = []
    try:
        with anyio.fail_after(10):
            async with await Client.connect(nats_url) as client:
                records += [(i.liveness, i.record) for i in await client.ranks(run_id)]
    except Exception as reading:  # the story is told with what can be read
        records.append(repr(reading))
    logs = "\n".join(watch.log() for watch in watches)
    outputs = "".join(f"\nrank {r}: {ranks.output(r)}" for r in sorted(ranks.procs))
    return f"{error!r}\nPOSTs: {attempts}\nranks: {records}\nwatch log:\n{logs}{outputs}"


async def _scenario(
    nats_url: str, run_id: str, ranks: Ranks, watches: list[Watch], receiver: Receiver
) -> None:
    for rank in (0, 1):
        ranks.start(run_id, rank, nats_url, code=LOOP, heartbeat=0.2, env=STALL_ENV)
    watch = Watch(
        run_id,
        "--nats",
        nats_url,
        "--webhook",
        receiver.url,
        "--when",
        "loss > 10",
        "--backoff",
        "0.05",
        "--on",
        "stalled,recovered,exited,stopped,condition",
    )
    watches.append(watch)
    await ranks.ready(0, 1)
    await watch.watching()
    async with await Client.connect(nats_url) as client:
        await advancing(client, run_id, 0, 1)
        # a frozen program: one "stalled" notice, delivered on the third attempt
        await client.set(run_id, 0, "hang", True)
        (stalled,) = await receiver.wait("stalled")
        assert (stalled["run"], stalled["rank"]) == (run_id, "0")
        # the floor while steps are fast (more if a loaded machine slowed them down)
        assert stalled["data"]["stall_after_s"] >= 1.0
        assert [a["id"] for a in receiver.attempts[:3]] == [stalled["id"]] * 3
        assert "secret-path" not in watch.log()  # the URL's path is never logged
        await _after_beats(client, run_id, "0", time.time(), beats=5)
        await client.set(run_id, 0, "hang", False)
        (recovered,) = await receiver.wait("recovered")
        assert recovered["rank"] == "0"

        # a condition on a field: once while it holds, again only after it cleared
        await client.set(run_id, 1, "loss", 20.0)
        (fired,) = await receiver.wait("condition")
        assert fired["data"]["values"] == {"loss": 20.0} and fired["rank"] == "1"
        await client.set(run_id, 1, "loss", 30.0)  # still true: nothing new
        await _after_beats(client, run_id, "1", time.time(), beats=5)
        await client.set(run_id, 1, "loss", 1.0)  # clears
        await _after_beats(client, run_id, "1", time.time(), beats=2)
        await client.set(run_id, 1, "loss", 50.0)
        _, again = await receiver.wait("condition", count=2)
        assert again["data"]["values"] == {"loss": 50.0}

        # a program that dies of an exception, then the last rank stops: the run stopped
        await client.set(run_id, 1, "crash", True)
        (exited,) = await receiver.wait("exited")
        assert exited["rank"] == "1"
        assert exited["data"]["error"].startswith("RuntimeError: boom at step")
        assert await ranks.exit_code(1) == 1
        await client.stop(run_id, 0, reason="enough")
        (stopped,) = await receiver.wait("stopped")
        assert stopped["data"]["exited"] == ["0", "1"]
        assert stopped["data"]["errors"] == {"1": exited["data"]["error"]}
        assert await ranks.exit_code(0) == 0
    counts = {k: len(receiver.of(k)) for k in ("stalled", "recovered", "condition", "exited")}
    assert counts == {"stalled": 1, "recovered": 1, "condition": 2, "exited": 1}, watch.log()
    assert len(receiver.accepted) == 6
    assert len({b["id"] for b in receiver.accepted}) == 6


async def test_then_stop_stops_the_run_and_says_so(
    nats_url: str, run_id: str, ranks: Ranks, watches: list[Watch], receiver: Receiver
) -> None:
    for rank in (0, 1):
        ranks.start(run_id, rank, nats_url, code=LOOP, heartbeat=0.2)
    watch = Watch(
        run_id,
        "--nats",
        nats_url,
        "--webhook",
        receiver.url,
        "--when",
        "isnan(loss)",
        "--then",
        "stop",
        "--name",
        "nan-guard",
    )
    watches.append(watch)
    await ranks.ready(0, 1)
    await watch.watching()
    async with await Client.connect(nats_url) as client:
        await client.set(run_id, 0, "diverge", True)  # the program's own loss turns NaN
        (fired,) = await receiver.wait("condition")
        assert fired["rank"] == "0" and fired["data"]["condition"] == "isnan(loss)"
        (action,) = await receiver.wait("action")
        assert action["data"]["complete"] is True, action
        assert action["data"]["acknowledged"] == ["0", "1"]
        assert action["summary"] == (
            f"run {run_id}: stopped after 'isnan(loss)': acknowledged by rank(s) 0, 1"
        )
        for rank in (0, 1):
            assert (await ranks.line(rank, "STOPPED")) == "STOPPED nan-guard: isnan(loss)"
            assert await ranks.exit_code(rank) == 0
        (stopped,) = await receiver.wait("stopped")
        assert stopped["data"]["reasons"] == ["nan-guard: isnan(loss)"]
        # the change journal records the stop as the watcher's
        history = await client.history(run_id)
        stop = next(e for e in history if e.verb == "stop")
        by = stop.by if isinstance(stop.by, dict) else msgspec.to_builtins(stop.by)
        assert by["name"] == "nan-guard"
    assert [b["kind"] for b in receiver.accepted].count("condition") == 1


async def test_a_stop_some_rank_did_not_take_is_reported(
    nats_url: str, run_id: str, ranks: Ranks, watches: list[Watch], receiver: Receiver
) -> None:
    ranks.start(run_id, 0, nats_url, code=LOOP, heartbeat=0.2)
    watch = Watch(
        run_id,
        "--nats",
        nats_url,
        "--webhook",
        receiver.url,
        "--on",
        "unacknowledged",
        "--ack-timeout",
        "1",
    )
    watches.append(watch)
    await ranks.ready(0)
    await watch.watching()
    # rank 7 heartbeats (its state messages arrive) but nothing answers its commands: an
    # agent whose command subscription is gone
    nc = await nats.connect(nats_url)
    stop_beating = anyio.Event()

    async def beat() -> None:
        while not stop_beating.is_set():
            msg = m.StateMsg(
                run=run_id, rank="7", version=0, ts=time.time(), state={}, heartbeat_interval=0.2
            )
            await nc.publish(state_subject(run_id, "7"), m.encode(msg))
            await anyio.sleep(0.2)

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(beat)
            await anyio.sleep(0.5)  # a few heartbeats: the watcher knows rank 7
            async with await Client.connect(nats_url) as client:
                await client.stop(run_id, "all", reason="done")
            (notice,) = await receiver.wait("unacknowledged")
            stop_beating.set()
    finally:
        await nc.close()
    assert notice["data"]["missing"] == ["7"]
    assert notice["data"]["acknowledged"] == ["0"]
    assert "not acknowledged by rank(s) 7" in notice["summary"]
    assert await ranks.exit_code(0) == 0


async def test_dry_run_prints_what_it_would_send(
    nats_url: str, run_id: str, ranks: Ranks, watches: list[Watch]
) -> None:
    ranks.start(run_id, 0, nats_url, code=LOOP, heartbeat=0.2, env=STALL_ENV)
    watch = Watch(
        run_id,
        "--nats",
        nats_url,
        "--slack",
        "https://hooks.slack.invalid/services/T0/B0/XYZ",
        "--dry-run",
        "--count",
        "1",
        "--on",
        "stalled",
    )
    watches.append(watch)
    await ranks.ready(0)
    await watch.watching()
    async with await Client.connect(nats_url) as client:
        await advancing(client, run_id, 0)
        await client.set(run_id, 0, "hang", True)
        with anyio.fail_after(30):
            code = await anyio.to_thread.run_sync(watch.proc.wait)
        await client.stop(run_id, "all")
    assert code == 0, watch.log()
    await anyio.sleep(0.1)  # the reader thread takes the last line
    (line,) = [json.loads(x) for x in watch.out if x.startswith("{")]
    assert line["dry_run"] is True and line["kind"] == "stalled"
    assert line["would_send_to"] == ["slack webhook https://hooks.slack.invalid/..."]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no destination"),
        (["--dry-run", "--when", "loss >> 1"], "invalid condition 'loss >> 1'"),
        (["--dry-run", "--then", "stop"], "--then acts when a --when condition fires"),
        (["--dry-run", "--when", "x", "--then", "explode"], "--then must be 'stop' or 'set"),
        (["--dry-run", "--on", "stalled,nonsense"], "unknown notice kind(s) nonsense"),
        (["--webhook", "file:///etc/passwd"], "must be an http:// or https:// URL"),
        (["bad.run", "--dry-run"], "invalid run"),
    ],
)
def test_usage_errors_exit_2_before_connecting(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runctl", "watch", "--nats", "nats://127.0.0.1:1", *args],
        cwd=str(ROOT),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


EPOCHS = """
    import os, time
    from pydantic import BaseModel
    from runctl import control

    class S(BaseModel):
        fail: bool = False
        skip: bool = False

    state = S()
    ctl = control(state, heartbeat=float(os.environ["HEARTBEAT"]))
    ctl.wait_ready()
    say("READY", ctl.run, ctl.rank)
    step, epoch, stopping = 0, 0, False
    # ends after an epoch cut short by the stop: a stop that arrives between two epochs
    # cuts the next one short at its first step, so every stop ends with SKIPPED
    while not stopping:
        try:
            with ctl.once("epoch", key=epoch, wait=False) as done:
                for _ in range(5):
                    ctl.sync(step)
                    if ctl.stop_requested:
                        break
                    step += 1
                    time.sleep(0.01)
                if state.fail:
                    state.fail = False
                    raise ValueError(f"bad epoch {epoch}")
                stopping = ctl.stop_requested
                if state.skip or stopping:
                    state.skip = False
                    say("SKIPPED", epoch)
                    done.skip()  # as runctl demo does: an epoch cut short is not done
        except ValueError:
            pass
        epoch += 1
    say("STOPPED", ctl.stop_reason)
    ctl.close()
"""


async def test_a_step_left_with_skip_is_no_failure(
    nats_url: str, run_id: str, ranks: Ranks, watches: list[Watch]
) -> None:
    """Only a step that failed is a ``step_failed`` notice: one the program left with
    ``skip()`` (an epoch cut short by a stop, as in ``runctl demo``) is not."""
    ranks.start(run_id, 0, nats_url, code=EPOCHS, heartbeat=0.2)
    # a dry run prints each notice as it is decided, in order: the rank's events arrive in
    # the order it sent them, so its last step event comes before the run's "stopped"
    watch = Watch(run_id, "--nats", nats_url, "--dry-run", "--on", "step_failed,stopped")
    watches.append(watch)
    await ranks.ready(0)
    await watch.watching()

    def printed(kind: str) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in list(watch.out) if x.startswith("{")]
        return [line for line in lines if line["kind"] == kind]

    async def wait(kind: str) -> dict[str, Any]:
        with anyio.fail_after(30):
            while True:
                if found := printed(kind):
                    return found[0]
                await anyio.sleep(0.05)

    async with await Client.connect(nats_url) as client:
        await client.set(run_id, 0, "fail", True)
        failed = await wait("step_failed")
        assert failed["data"]["error"].startswith("ValueError: bad epoch"), failed
        await client.set(run_id, 0, "skip", True)
        await ranks.line(0, "SKIPPED")
        await client.stop(run_id, "all", reason="enough")
        await ranks.line(0, "SKIPPED")
        assert await ranks.exit_code(0) == 0
    await wait("stopped")
    assert [n["summary"] for n in printed("step_failed")] == [failed["summary"]], watch.log()
