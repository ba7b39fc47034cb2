"""What the fault, cluster, bad-input and soak tests share: a rank program that logs steps and
says which completions the API acknowledged, the gateway as a real process, HTTP traffic
in the background, reading the step log back, and the figures docs/reliability.md quotes.

Figures: every test calls :func:`figures`; with ``RUNCTL_FIGURES=path`` set they are
appended to that file as JSON lines (how docs/reliability.md's tables were made).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import nats
from conftest import ROOT, spawn_python

from runctl.bus.steps.records import RunLog, StepRecord
from runctl.bus.steps.store import read_log

__all__ = [
    "RANK_PROGRAM",
    "GatewayProcess",
    "Rank",
    "Traffic",
    "figures",
    "free_port",
    "log_of",
    "rss_kib",
]

#: One rank: logs ``N`` steps "item" (``ctl.once``), one every ``PACE`` seconds, and prints a
#: JSON line per step: ``started``, then ``acked`` (the API said done: the server stored it)
#: or ``queued`` (not acknowledged within the wait: re-sent in the background); ``skipped``
#: when a restart finds it done. ``HANG_AT=i`` hangs inside step i (to be killed there).
#: At the end it flushes and prints what it holds done; with ``LINGER=1`` it then serves
#: until a stop command arrives.
RANK_PROGRAM = """
import json, os, sys, time
from pydantic import BaseModel
from runctl.agent import control

def say(**kv):
    os.write(1, (json.dumps(kv) + "\\n").encode())  # one write: the agent logs to stdout too

class S(BaseModel):
    lr: float = 0.1
    step: int = 0

state = S()
ctl = control(state, run=os.environ["RUN"], rank=os.environ.get("RANK_", "0"),
              url=os.environ["URL"], heartbeat=float(os.environ.get("HB", "0.2")))
ctl.wait_ready(60)
say(ready=os.getpid(), interrupted=[r.key for r in ctl.agent.steplog.interrupted])
n, pace = int(os.environ["N"]), float(os.environ.get("PACE", "0.05"))
hang = int(os.environ.get("HANG_AT", "-1"))
for i in range(n):
    with ctl.once("item", i) as s:
        if s.done:
            say(skipped=i)
            s.skip()
        with ctl.lock:
            state.step = i
        say(started=i, pending=ctl.agent.steps.pending)
        if i == hang:
            time.sleep(600)
        time.sleep(pace)
    if not s.was_done:
        say(**({"acked": i} if s.done else {"queued": i}))
flushed = ctl.agent.steps.flush(float(os.environ.get("FLUSH", "60")))
say(flushed=flushed, pending=ctl.agent.steps.pending,
    done=[i for i in range(n) if ctl.is_done("item", i)])
if os.environ.get("LINGER"):  # keep serving until stopped (POST .../stop)
    while not ctl.stop_requested:
        time.sleep(0.02)
say(exit_lr=state.lr, version=ctl.version)
ctl.close()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def figures(test: str, **values: Any) -> None:
    """Record a test's figures (see the module doc)."""
    line = json.dumps({"test": test, **values}, sort_keys=True)
    print(f"FIGURES {line}")
    if path := os.environ.get("RUNCTL_FIGURES"):
        with Path(path).open("a") as out:
            out.write(line + "\n")


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for pid {pid}")


def log_of(url: str, run: str) -> RunLog:
    """The run's step log, read back from the stream (any node of a cluster will do)."""

    async def go() -> RunLog:
        nc = await nats.connect(url.split(","), connect_timeout=5)
        try:
            with anyio.fail_after(30):
                return await read_log(nc, run)
        finally:
            await nc.close()

    return anyio.run(go)


def done_records(runlog: RunLog, scope: str) -> dict[Any, list[StepRecord]]:
    """Step key -> every record of that step in ``scope`` (one, if nothing doubled)."""
    found: dict[Any, list[StepRecord]] = collections.defaultdict(list)
    for _, rec in runlog.records.values():
        if rec.scope == scope:
            found[rec.key].append(rec)
    return found


@dataclass
class Rank:
    """A rank process running :data:`RANK_PROGRAM`; its stdout is read on a thread."""

    run: str
    rank: str
    url: str
    n: int
    pace: float = 0.05
    env: dict[str, str] = field(default_factory=dict)
    lines: list[dict[str, Any]] = field(default_factory=list)
    #: a command the rank runs under (``ip netns exec NS``: a rank on another host)
    prefix: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        env = {
            "RUN": self.run,
            "RANK_": self.rank,
            "URL": self.url,
            "N": str(self.n),
            "PACE": str(self.pace),
            **self.env,
        }
        self.proc = spawn_python(RANK_PROGRAM, env=env, prefix=self.prefix)
        self._err: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # stderr read too, so a chatty rank never blocks on a full pipe
        self._err_reader = threading.Thread(
            target=lambda: self._err.extend(self.proc.stderr or ()), daemon=True
        )
        self._err_reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            start = line.find('{"')
            if start >= 0:
                try:
                    self.lines.append(json.JSONDecoder().raw_decode(line[start:])[0])
                except ValueError:
                    continue

    def keys(self, kind: str) -> list[int]:
        return [int(o[kind]) for o in list(self.lines) if kind in o]

    @property
    def final(self) -> dict[str, Any] | None:
        return next((o for o in reversed(self.lines) if "flushed" in o), None)

    def wait_until(self, predicate: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(f"rank {self.rank} exited early: {self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"rank {self.rank}: condition not met in {timeout}s; "
                    f"last lines {self.lines[-5:]}"
                )
            time.sleep(0.02)

    def wait_final(self, timeout: float = 90.0) -> dict[str, Any]:
        """Until the rank printed its final line (it may linger afterwards)."""
        self.wait_until(lambda: self.final is not None, timeout)
        assert self.final is not None
        return self.final

    def finish(self, timeout: float = 90.0) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._close()
        assert self.proc.returncode == 0, self.stderr()[-3000:]
        final = self.final
        assert final is not None, self.lines[-5:]
        return final

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        """After the process ended: read what is left, close the pipes."""
        self._reader.join(5)
        self._err_reader.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def stderr(self) -> str:
        return "".join(self._err)


class GatewayProcess:
    """``runctl gateway`` as its own process, on a fixed port (so a restart takes it over)."""

    def __init__(self, nats_url: str, port: int | None = None, *, log: Path) -> None:
        self.nats_url = nats_url
        self.port = port or free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        argv = [
            sys.executable,
            "-m",
            "runctl",
            "gateway",
            "--nats",
            self.nats_url,
            "--port",
            str(self.port),
            "--timeout",
            "2",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/runs", timeout=2).status_code in (200, 503):
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"gateway not serving after {timeout}s")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Traffic(threading.Thread):
    """Mixed HTTP traffic on one rank, in a loop: read (registry), set ``lr``, read fresh.

    Every answer's status is counted; ``sets`` keeps (value, status) in order, so a test
    can check that an acknowledged set is never lost."""

    def __init__(self, base_url: str, run: str, rank: str = "0") -> None:
        super().__init__(daemon=True)
        self.base_url, self.run_id, self.rank = base_url, run, rank
        self.statuses: collections.Counter[str] = collections.Counter()
        self.sets: list[tuple[float, str]] = []
        self.stopping = threading.Event()
        self.requests = 0

    def run(self) -> None:
        base = f"/runs/{self.run_id}/ranks/{self.rank}"
        value = 0.1
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            while not self.stopping.is_set():
                value = round(value + 0.001, 6)
                for method, url, params in (
                    ("GET", f"{base}/get", {}),
                    ("PUT", f"{base}/set/lr", {"value": str(value)}),
                    ("GET", f"{base}/get/lr", {"fresh": "true"}),
                ):
                    try:
                        status = str(http.request(method, url, params=params).status_code)
                    except httpx.TransportError as exc:
                        status = type(exc).__name__  # the gateway is down: refused, reset
                        time.sleep(0.05)
                    self.statuses[status] += 1
                    self.requests += 1
                    if method == "PUT":
                        self.sets.append((value, status))

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def last_possible_values(self) -> set[float]:
        """Values the rank may hold now: the last acknowledged set, or any set after it
        whose answer was lost (504, refused: it may have been applied)."""
        acked = [i for i, (_, status) in enumerate(self.sets) if status == "200"]
        start = acked[-1] if acked else 0
        return {value for value, _ in self.sets[start:]}
