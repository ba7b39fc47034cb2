"""A new user's first steps work as printed: the README's quickstart, links and CLI lines,
the lines the demo prints, ``just`` from the venv, options only where they work, ``tail``
that shows what happened, ``forget`` of nothing, and a re-run after ``runctl stop`` that
says why it stops at once and how to start fresh.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import ROOT, free_port, wait_for

from runctl.agent.announce import access_line
from runctl.agent.embedded_lease import Lease
from runctl.bus import Client
from runctl.bus.server import NatsServer
from runctl.bus.shell import runctl_command
from runctl.cli.tail import format_message

README = ROOT / "README.md"


def code_blocks(text: str, lang: str = "sh") -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


# --- the README ------------------------------------------------------------------------


def test_every_relative_link_in_the_readme_resolves() -> None:
    broken = []
    for doc in [README]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_shows_the_line_control_prints() -> None:
    """ "Zero setup" quotes the line ``control()`` prints: the same words (``runctl`` as the
    README spells it)."""
    run = "run-20250101-120000-ab12"
    with socket.socket() as sock:
        lease = Lease(sock, "nats://127.0.0.1:4222", True, True, 1, 1, None, 1, True)
        printed = access_line(run, lease, "http://127.0.0.1:4444", "")
    (shown,) = [ln for ln in README.read_text().splitlines() if ln.startswith("runctl: run ")]
    assert shown == printed.replace(runctl_command(), "runctl")


def test_the_quickstart_shows_progress_and_ci_runs_its_test_command() -> None:
    (quickstart,) = [b for b in code_blocks(README.read_text()) if "pip install" in b]
    commands = [line for line in quickstart.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert all(" -q" not in c and "--quiet" not in c for c in commands)  # pip shows progress
    assert commands[1] in (ROOT / ".ci" / "run").read_text()  # CI runs exactly that


def test_just_works_from_the_venv_without_being_on_path() -> None:
    just = Path(sys.executable).parent / "just"
    if not just.exists():
        pytest.skip(f"no just next to {sys.executable} (the dev extra installs it)")
    recipes = (ROOT / "justfile").read_text()
    assert not re.search(r"^\s+@?just\b", recipes, re.M), "a recipe calls `just` from PATH"
    out = subprocess.run(
        [str(just)],
        cwd=ROOT,
        env={**os.environ, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0 and "Available recipes" in out.stdout, out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--nats", "nats://x:1"],
        ["demo", "--timeout", "3"],
        ["--nats", "nats://x:1", "demo"],
        ["--timeout", "3", "up"],
        ["up", "--nats", "nats://x:1"],
        ["--nats", "nats://x:1", "tokens"],
        ["tokens", "--timeout", "3"],
    ],
)
def test_options_a_command_ignores_are_not_offered(argv: list[str], tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "runctl", *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert not (tmp_path / ".runctl").exists()  # nothing was started


def test_tail_shows_changes_and_events_and_heartbeats_on_request() -> None:
    def state(cause: str) -> bytes:
        return (
            b'{"t":"state/1","run":"r","rank":"0","version":3,"ts":0,"state":{"step":7},'
            b'"cause":"' + cause.encode() + b'"}'
        )

    changed_event = b'{"t":"event/1","run":"r","rank":"0","kind":"changed","ts":0,"version":3}'
    for cause in ("heartbeat", "changed"):  # the program's own updates come at that pace
        assert format_message("runctl.r.0.state", state(cause)) is None
        assert format_message("runctl.r.0.state", state(cause), heartbeats=True) is not None
    assert format_message("runctl.r.0.evt.changed", changed_event) is None
    assert format_message("runctl.r.0.evt.changed", changed_event, heartbeats=True)
    line = format_message("runctl.r.0.state", state("set"))
    assert line is not None and "(set)" in line
    stop = b'{"t":"event/1","run":"r","rank":"0","kind":"stop_requested","ts":0,"version":3}'
    assert "stop_requested" in (format_message("runctl.r.0.evt.stop_requested", stop) or "")


# --- the demo, and the README's CLI lines against it --------------------------------------


class Demo:
    """``runctl demo`` as a user starts it, its output read on a thread."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.gateway_port = free_port()
        self.cwd = cwd
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runctl",
                "demo",
                "--port",
                str(self.gateway_port),
                "--nats-port",
                "0",
                "--step-time",
                "0.02",
                *args,
            ],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
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

    def ready(self) -> None:
        wait_for(
            lambda: "Ctrl-C stops everything." in self.output or self.proc.poll() is not None,
            timeout=60,
        )
        assert self.proc.poll() is None, self.output

    def cli_lines(self) -> list[str]:
        """The CLI lines the demo printed, as printed (comments cut)."""
        block = self.output.split("or with the CLI:")[1].split("Ctrl-C stops")[0]
        return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]

    def cli_prefix(self) -> str:
        """How the demo says to type runctl (path and environment included)."""
        return self.cli_lines()[0].removesuffix(" ls")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    d = Demo(tmp_path)
    try:
        d.ready()
        yield d
    finally:
        d.close()


def shell(line: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A line as a user types it into a shell."""
    return subprocess.run(
        ["bash", "-c", line],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def started_tail(line: str, cwd: Path) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        ["bash", "-c", line],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for out in proc.stdout:
            lines.append(out.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: any("tailing" in x for x in lines), timeout=30)
    return proc, lines


def ended(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.mark.timeout(240)
def test_the_demo_and_readme_cli_lines_run_as_printed(demo: Demo) -> None:
    printed = demo.cli_lines()
    prefix = demo.cli_prefix()
    assert all(line.startswith(prefix + " ") for line in printed), printed
    # the epochs of the demo's step log: a few are done by now (10 steps of 0.02 s each)
    wait_for(lambda: demo.output.count("epoch 3 done") == 2, timeout=60)

    (block,) = [b for b in code_blocks(README.read_text()) if b.startswith("runctl ls")]
    readme = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert readme[-1].startswith("runctl stop demo")
    forgot = 0
    for source, lines in (("demo", printed[:-1]), ("README", readme)):
        for line in lines:
            command = prefix + line.removeprefix("runctl") if source == "README" else line
            if " tail " in command:
                tail, seen = started_tail(command, demo.cwd)
                try:  # a change shows at once; the program's own step/loss updates do not
                    r = httpx.put(
                        f"http://127.0.0.1:{demo.gateway_port}/runs/demo/ranks/all/set/"
                        "optimizer.momentum",
                        params={"value": "0.85"},
                        timeout=20,
                    )
                    assert r.status_code == 200, r.text
                    wait_for(lambda seen=seen: any("(set)" in x for x in seen), timeout=20)
                    time.sleep(1.5)  # more than a heartbeat
                    assert not any("(heartbeat)" in x or "(changed)" in x for x in seen), seen
                finally:
                    ended(tail)
                continue
            out = shell(command, demo.cwd)
            assert out.returncode == 0, (source, command, out.stdout, out.stderr)
            if " steps " in command:
                assert "epoch" in out.stdout and "skip" in out.stdout, out.stdout
            if " forget " in command:  # the first forgets epochs; a second finds fewer
                forgot += "forgot" in out.stdout
                assert forgot or "forgotten: 0" in out.stdout, out.stdout
    assert forgot
    demo.proc.wait(30)  # the README's last line stopped every rank: the demo ends
    assert "every rank has stopped" in demo.output
    for rank in (0, 1):
        assert f"[rank {rank}] stop requested (enough)" in demo.output


@pytest.mark.timeout(120)
def test_a_synchronised_stop_and_the_demo_agree_on_the_step(demo: Demo) -> None:
    (stop,) = [line for line in demo.cli_lines() if " stop " in line]
    assert stop.endswith("stop demo --sync")
    wait_for(lambda: demo.output.count("ready:") == 2, timeout=30)
    out = shell(stop, demo.cwd)
    assert out.returncode == 0, (out.stdout, out.stderr)
    at = re.search(r"synchronised at step (\d+)", out.stdout)
    assert at is not None, out.stdout
    demo.proc.wait(30)
    said_by_demo = demo.output
    for rank in (0, 1):
        pattern = rf"\[rank {rank}\] stop requested .*: stopping before step (\d+)"
        said = re.search(pattern, said_by_demo)
        assert said is not None and said.group(1) == at.group(1), demo.output


# --- a program re-run after a stop --------------------------------------------------------

PROGRAM = """
import os, time
from pydantic import BaseModel
from runctl import control

class S(BaseModel):
    x: int = 0

ctl = control(S(), run=os.environ["RUN"], rank=0)
ctl.wait_ready(30)
print(f"READY stop_requested={ctl.stop_requested}", flush=True)
while not ctl.stop_requested:
    time.sleep(0.02)
ctl.close()
"""


def run_program(url: str, run: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PROGRAM],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), "RUNCTL_NATS_URL": url, "RUN": run},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ready_line(proc: subprocess.Popen[str]) -> str:
    """The program's READY line (runctl's own log lines may come before it on stdout)."""
    assert proc.stdout is not None
    for line in proc.stdout:  # the test's timeout bounds this; the program prints READY first
        if "READY" in line:  # a log line written at the same moment may share its line
            return line[line.index("READY") :]
    raise AssertionError(f"the program ended without READY: {proc.wait(10)}")


def test_a_rerun_after_a_stop_says_why_it_stops_and_how_to_start_fresh(
    nats_server: NatsServer, run_id: str, tmp_path: Path
) -> None:
    url = nats_server.url
    first = run_program(url, run_id, tmp_path)
    try:
        assert "stop_requested=False" in ready_line(first)

        async def stop() -> None:
            async with await Client.connect(url) as client:
                await client.stop(run_id, "all", "enough")

        anyio.run(stop)
        first.wait(30)
    finally:
        out, err = first.communicate(timeout=30)
    again = run_program(url, run_id, tmp_path)
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0 and "stop_requested=True" in out, (out, err)
    (why,) = [line for line in err.splitlines() if "was stopped" in line]
    assert f"run {run_id!r} was stopped" in why and "(enough)" in why
    hint = why.split("forget that stop: ")[1]
    assert hint.endswith(f"forget {run_id} --stop")
    fresh = shell(f"RUNCTL_NATS_URL={url} {hint}", tmp_path)  # as printed
    assert fresh.returncode == 0 and "forgot the recorded stop" in fresh.stdout, fresh
    third = run_program(url, run_id, tmp_path)
    try:
        assert "stop_requested=False" in ready_line(third)
        anyio.run(stop)
        out, err = third.communicate(timeout=30)
    finally:
        if third.poll() is None:  # failed before the stop: never leave the program running
            third.kill()
            third.communicate(timeout=30)
    assert "was stopped" not in err


def test_forget_of_nothing_says_so_and_exits_0_as_http_answers_200(
    nats_url: str, run_id: str, gateway: object
) -> None:
    out = shell(
        f"{shlex.quote(sys.executable)} -m runctl forget {run_id} 'epoch:9+' --nats {nats_url}",
        ROOT,
    )
    assert out.returncode == 0 and "nothing to forget" in out.stdout, out
    assert "forgotten: 0" in out.stdout
    http = gateway()  # type: ignore[operator]
    r = http.delete(f"/runs/{run_id}/steps/epoch:9", params={"successors": "true"})
    assert r.status_code == 200 and r.json()["forgotten"] == 0
