"""Zero setup: ``control(state)`` with nothing configured shares one nats-server and one
HTTP gateway per machine with every other such program (started by the first, gone after
the last), prints where the state can be read and changed, and the root routes act on
the only live run.

Every test moves the embedded ports to free ones (RUNCTL_NATS_PORT, RUNCTL_GATEWAY_PORT):
other programs on this machine may hold 4222 and 4444. One test exercises the defaults
themselves and skips, saying why, only when they are busy.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import ROOT, free_port, listening, process_env, wait_for

from runctl.bus import Client, Result

TIMEOUT = 45.0

PROGRAM = """
import os, sys, time
from pydantic import BaseModel
from runctl import control

class State(BaseModel):
    foo: str = "bar"
    n: int = 0

state = State()
ctl = control(state{args})
ctl.wait_ready(40)
print(f"READY {ctl.run} {os.getpid()}", flush=True)  # one write: the agent thread logs too
while not ctl.stop_requested:
    time.sleep(0.02)
print(f"STOPPED {state.foo} {state.n}", flush=True)
ctl.close()
"""


class Program:
    """A user's program in its own process; stdout and stderr collected on a thread."""

    def __init__(
        self, code: str, env: dict[str, str], cwd: Path, argv: list[str] | None = None
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_")}
        full_env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **env})
        self.proc = subprocess.Popen(
            [sys.executable, *(argv or ["-c", textwrap.dedent(code)])],
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def line(self, start: str, timeout: float = TIMEOUT) -> str:
        """The first output line that contains ``start``, from there on (the program's
        stdout and stderr share the pipe: a log line may precede it on the same line)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if start in line:
                    return line[line.index(start) :]
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line {start!r} (exit {self.proc.poll()}):\n{self.output}")

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output}") from None
        self._close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self.reader.join(5)
        if self.proc.stdout is not None and not self.reader.is_alive():
            self.proc.stdout.close()


def processes(match: Callable[[list[bytes]], bool]) -> list[int]:
    """PIDs of the processes whose argv ``match`` accepts (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argv and match(argv):
            pids.append(int(entry.name))
    return pids


def nats_servers_on(port: int) -> list[int]:
    """PIDs of nats-server processes started with ``-p port``."""
    arg = str(port).encode()
    return processes(
        lambda argv: (
            argv[0].endswith(b"nats-server") and argv[argv.index(b"-p") + 1] == arg
            if b"-p" in argv
            else False
        )
    )


def hosts_on(port: int) -> list[int]:
    """PIDs of embedded hosts for nats port ``port``."""
    arg = str(port).encode()
    return processes(lambda argv: arg in argv and any(a.endswith(b"_host.py") for a in argv))


class Ports:
    def __init__(self, nats: int, gateway: int) -> None:
        self.nats, self.gateway = nats, gateway
        self.env = {"RUNCTL_NATS_PORT": str(nats), "RUNCTL_GATEWAY_PORT": str(gateway)}
        self.nats_url = f"nats://127.0.0.1:{nats}"
        self.http = f"http://127.0.0.1:{gateway}"

    def all_gone(self) -> bool:
        return not (
            listening(self.nats)
            or listening(self.gateway)
            or nats_servers_on(self.nats)
            or hosts_on(self.nats)
        )


@pytest.fixture
def ports() -> Iterator[Ports]:
    p = Ports(free_port(), free_port())
    yield p
    for pid in hosts_on(p.nats):  # a failed test must not leave a host behind
        os.kill(pid, signal.SIGTERM)


@pytest.fixture
def programs(tmp_path: Path) -> Iterator[list[Program]]:
    started: list[Program] = []
    yield started
    for program in started:
        program.kill()


def start(programs: list[Program], cwd: Path, env: dict[str, str], args: str = "") -> Program:
    program = Program(PROGRAM.replace("{args}", args), env, cwd)
    programs.append(program)
    return program


async def stop(ports: Ports, run: str) -> None:
    async with await Client.connect(ports.nats_url) as client:
        await client.stop(run, "all", "test")


def test_programs_share_one_server_and_gateway_that_outlive_the_first(
    ports: Ports, programs: list[Program], tmp_path: Path
) -> None:
    a = start(programs, tmp_path, {**ports.env, "RUNCTL_RUN": "first"})
    a.line("READY")
    # alone on the bus: Freak's routes at the root are where its state is
    alone = a.line("runctl: run 'first'")
    assert f"{ports.http}/get," in alone and f"'{ports.http}/set/FIELD?value=V'" in alone
    b = start(programs, tmp_path, {**ports.env, "RUNCTL_RUN": "second"})
    b.line("READY")
    # one server, one host; each program says honestly who started it
    servers = nats_servers_on(ports.nats)
    assert len(servers) == 1 and len(hosts_on(ports.nats)) == 1
    # the server runs Go on one core, as every server runctl starts (bus/server.py)
    assert process_env(servers[0]).get("GOMAXPROCS") == os.environ.get("GOMAXPROCS", "1")
    assert "started the embedded nats-server" in a.output
    assert "using the embedded nats-server another program started" in b.output
    assert f"started_by_pid={a.proc.pid}" in b.output
    # each prints one line saying where its state is
    # ... the second shares the bus with a live run: the root routes need the run, so the
    # line names the run's own routes, each answering as printed
    access = b.line("runctl: run 'second'")
    read = f"{ports.http}/runs/second/ranks/0/get"
    write = f"{ports.http}/runs/second/ranks/all/set/FIELD?value=V"
    assert f"state at {read} (1 other run(s) live here" in access, access
    assert f"curl -X PUT '{write}'" in access and f"{ports.http}/runs/second/docs" in access
    assert f"{ports.http}/console/second" in access
    with httpx.Client(base_url=ports.http, timeout=20) as http:
        assert http.get(read).json() == {"foo": "bar", "n": 0}
        assert http.put(write.replace("FIELD?value=V", "n?value=1")).status_code == 200
        # two live runs: the root routes cannot pick one and say which there are
        r = http.get("/get")
        assert r.status_code == 409 and set(r.json()["runs"]) == {"first", "second"}
        anyio.run(stop, ports, "first")
        assert a.wait() == 0
        # the first program is gone: the server and gateway stay for the second
        assert http.put("/set/n", params={"value": "3"}).json() == "success"
        assert http.get("/get").json() == {"foo": "bar", "n": 3}
    anyio.run(stop, ports, "second")
    assert b.wait() == 0 and b.line("STOPPED") == "STOPPED bar 3"
    for out in (a.output, b.output):
        assert "nats disconnected" not in out and "nats error" not in out, out
    wait_for(ports.all_gone, timeout=20)


def test_a_killed_last_user_still_stops_the_server_and_gateway(
    ports: Ports, programs: list[Program], tmp_path: Path
) -> None:
    a = start(programs, tmp_path, {**ports.env, "RUNCTL_RUN": "killed"})
    a.line("runctl: run 'killed'")  # the gateway is up
    assert listening(ports.gateway) and nats_servers_on(ports.nats)
    a.proc.send_signal(signal.SIGKILL)
    assert a.wait() == -signal.SIGKILL
    wait_for(ports.all_gone, timeout=20)


def test_the_root_routes_act_on_the_only_live_run(
    ports: Ports, programs: list[Program], tmp_path: Path
) -> None:
    a = start(programs, tmp_path, ports.env)  # no run anywhere: a generated id
    run = a.line("READY").split()[1]
    with httpx.Client(base_url=ports.http, timeout=20) as http:
        wait_for(lambda: listening(ports.gateway), timeout=TIMEOUT)
        assert http.get("/get").json() == {"foo": "bar", "n": 0}
        assert http.put("/set/foo", params={"value": "baz"}).json() == "success"
        assert http.get("/get/foo").json() == "baz"
        assert http.get(f"/runs/{run}/ranks/0/get/foo").json() == "baz"
        anyio.run(stop, ports, run)
        assert a.wait() == 0 and a.line("STOPPED") == "STOPPED baz 0"


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_the_gateway_can_be_turned_off(
    ports: Ports, programs: list[Program], tmp_path: Path, how: str
) -> None:
    if how == "argument":
        a = start(programs, tmp_path, ports.env, args=", gateway=False")
    else:
        a = start(programs, tmp_path, {**ports.env, "RUNCTL_GATEWAY": "0"})
    run = a.line("READY").split()[1]
    line = a.line(f"runctl: run {run!r}")
    assert "no HTTP gateway: turned off" in line and ports.nats_url in line
    assert not listening(ports.gateway)
    anyio.run(stop, ports, run)
    assert a.wait() == 0
    wait_for(ports.all_gone, timeout=20)


def test_a_busy_gateway_port_is_reported_and_the_bus_still_works(
    ports: Ports, programs: list[Program], tmp_path: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports.gateway))
        squatter.listen()
        a = start(programs, tmp_path, ports.env)
        run = a.line("READY").split()[1]
        line = a.line(f"runctl: run {run!r}")
        assert f"port {ports.gateway} is in use" in line and "runctl gateway --port" in line

        async def change() -> None:
            async with await Client.connect(ports.nats_url) as client:
                assert isinstance(await client.set(run, 0, "n", 2), Result)
                await client.stop(run, "all")

        anyio.run(change)
        assert a.wait() == 0 and a.line("STOPPED") == "STOPPED bar 2"
    wait_for(ports.all_gone, timeout=20)


TORCHRUN_WORKER = """
import os, time
from pydantic import BaseModel
from runctl import control

class State(BaseModel):
    x: int = 0

state = State()
ctl = control(state)  # nothing configured: run and rank from torchrun
ctl.wait_ready(40)
print(f"READY {ctl.run} {ctl.rank}", flush=True)
while not ctl.stop_requested:
    time.sleep(0.02)
print(f"STOPPED {ctl.rank} {state.x}", flush=True)
ctl.close()
"""


def test_torchrun_ranks_share_one_embedded_server_that_outlives_rank_0(
    ports: Ports, tmp_path: Path
) -> None:
    pytest.importorskip("torch")  # the `distributed` extra; CI installs it
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    job = Program("", {**ports.env, "RUNCTL_GATEWAY": "0"}, tmp_path, argv=argv)
    try:
        job.line("READY")
        wait_for(lambda: job.output.count("READY ") == 2, timeout=TIMEOUT)
        run = job.line("READY").split()[1]
        assert len(nats_servers_on(ports.nats)) == 1
        # one honest line each: one rank started the server, the other uses it
        assert job.output.count("started the embedded nats-server") == 1, job.output
        assert job.output.count("using the embedded nats-server another program") == 1

        starter = re.search(r"started the embedded nats-server.* rank=(\d)", job.output)
        assert starter is not None, job.output
        first, other = starter.group(1), "1" if starter.group(1) == "0" else "0"

        async def starter_leaves_first() -> None:
            async with await Client.connect(ports.nats_url) as client:
                await client.stop(run, first, "the rank that started the server leaves")
                with anyio.fail_after(TIMEOUT):
                    while (await client.rank(run, first)).liveness != "exited":  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                    pid = (await client.rank(run, first)).record.pid
                    while Path(f"/proc/{pid}").exists():  # noqa: ASYNC110, ASYNC240
                        await anyio.sleep(0.05)
                # the server outlives the rank that started it
                assert isinstance(await client.set(run, other, "x", 7), Result)
                await client.stop(run, other)

        anyio.run(starter_leaves_first)
        assert job.wait() == 0, job.output
        assert f"STOPPED {other} 7" in job.output
        assert "nats disconnected" not in job.output and "nats error" not in job.output
        wait_for(ports.all_gone, timeout=20)
    finally:
        job.kill()


# --- Freak's README, verbatim apart from the import ------------------------------------------

FREAK_FIRST = """\
from runctl import control
from pydantic import BaseModel

class State(BaseModel):
    foo: str = "bar"

state = State()
control(state)
"""
FREAK_FIRST_CURL = """curl -X PUT localhost:4444/set/foo?value=baz"""

FREAK_NESTED = """\
from pydantic import BaseModel

class Bar(BaseModel):
    foo: str = "bar"
    baz: int = 0

class State(BaseModel):
    bar: Bar = Bar()
"""
# the README shows the model; the one line is the same as above
FREAK_NESTED_CONTROL = "from runctl import control\nstate = State()\ncontrol(state)\n"
FREAK_PATCH = """curl -X 'PATCH' \\
  'http://localhost:4444/set/bar' \\
  -H 'accept: application/json' \\
  -H 'Content-Type: application/json' \\
  -d '{"foo": "baz"}'"""
FREAK_BAD_PATCH = FREAK_PATCH.replace('{"foo": "baz"}', '{"baz": "lol"}')
#: the program goes on after the snippet, as a user's program would (here: until Ctrl-C)
GOES_ON = "\nimport threading\nprint('RUNNING', flush=True)\nthreading.Event().wait()\n"


def curl(line: str, gateway_port: int) -> str:
    line = line.replace("localhost:4444", f"localhost:{gateway_port}")
    out = subprocess.run(
        ["bash", "-c", line], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, (line, out.stderr)
    return out.stdout


def interrupted(program: Program) -> bool:
    """Ctrl-C: the program says goodbye on its way out (control()'s exit hook) and ends
    as Python ends on an uncaught KeyboardInterrupt."""
    program.proc.send_signal(signal.SIGINT)
    return program.wait() == -signal.SIGINT


@pytest.fixture(params=["default ports", "free ports"])
def freak_ports(request: pytest.FixtureRequest) -> Ports:
    if request.param == "free ports":
        return Ports(free_port(), free_port())
    busy = [p for p in (4222, 4444) if listening(p)]
    if busy:
        pytest.skip(
            f"this run exercises the default ports 4222/4444 and {busy} is in use on this "
            "machine (the free-ports run covers the same flow; CI has them free)"
        )
    return Ports(4222, 4444)


@pytest.mark.timeout(150)
def test_freaks_readme_flow_verbatim(
    freak_ports: Ports, programs: list[Program], tmp_path: Path
) -> None:
    default = freak_ports.nats == 4222
    env = {} if default else freak_ports.env  # the defaults: nothing at all configured
    first = Program(FREAK_FIRST + GOES_ON, env, tmp_path)
    programs.append(first)
    first.line("RUNNING")
    first.line(f"{freak_ports.http}/get")  # the line control() prints says where
    assert curl(FREAK_FIRST_CURL, freak_ports.gateway) == '"success"'
    assert curl("curl -s localhost:4444/get", freak_ports.gateway) == '{"foo":"baz"}'
    assert interrupted(first)

    nested = Program(FREAK_NESTED + FREAK_NESTED_CONTROL + GOES_ON, env, tmp_path)
    programs.append(nested)
    nested.line(f"{freak_ports.http}/get")
    assert curl(FREAK_PATCH, freak_ports.gateway) == '"success"'
    refused = json.loads(curl(FREAK_BAD_PATCH, freak_ports.gateway))
    assert [e["loc"] for e in refused["detail"]] == [["body", "baz"]]  # as Freak's README
    assert json.loads(curl("curl -s localhost:4444/get", freak_ports.gateway)) == {
        "bar": {"foo": "baz", "baz": 0}
    }
    assert interrupted(nested)
    wait_for(freak_ports.all_gone, timeout=20)
