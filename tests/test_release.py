"""runctl as users get it: one import package, and a wheel that works outside the checkout.

Two promises are checked with real processes:
- a program whose directory holds its own ``agent.py``, ``bus.py`` and ``gateway.py`` (names
  an RL or web project often uses) still gets runctl from ``from runctl import control``, and
  is controlled through the gateway and the CLI;
- the wheel built from this checkout, installed (not editable) into a fresh venv and used from
  an empty directory, runs ``runctl up`` with the shipped roles, a program with ``control()``,
  a set through the gateway and one through the CLI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, GatewayFactory, wait_for

# Files a user's project might have beside the script; importing any of them instead of
# runctl's own modules ends the program with a message naming the file.
_SHADOWS = ("agent", "bus", "gateway")

_PROGRAM = """
import sys, time
from pydantic import BaseModel
from runctl import control

class Cfg(BaseModel):
    lr: float = 0.1
    name: str = "start"

ctl = control(Cfg(), run=sys.argv[1])
ctl.wait_ready(30)
print("READY", flush=True)
deadline = time.monotonic() + 60
while ctl.state.lr != 0.25 and time.monotonic() < deadline:
    time.sleep(0.02)
print(f"SAW lr={ctl.state.lr} name={ctl.state.name}", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no checkout on the path, no runctl settings."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("RUNCTL_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class _Proc:
    """A child process whose output goes to a file, so the test can wait on it with a deadline
    and show it when something fails."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=self._out)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"exited {self.proc.returncode} before {text!r}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout}s:\n{self.output()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()


def _user_project(where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    for name in _SHADOWS:
        (where / f"{name}.py").write_text(
            f"raise SystemExit('the user\\'s own {name}.py was imported instead of runctl')\n"
        )
    (where / "train.py").write_text(textwrap.dedent(_PROGRAM))
    return where


def test_a_program_with_its_own_agent_bus_and_gateway_modules(
    nats_url: str, run_id: str, gateway: GatewayFactory, tmp_path: Path
) -> None:
    project = _user_project(tmp_path / "project")
    env = _clean_env(RUNCTL_NATS_URL=nats_url)
    rank = _Proc(
        [sys.executable, "train.py", run_id], cwd=project, env=env, log=tmp_path / "rank.log"
    )
    try:
        rank.wait_output("READY")
        http = gateway()
        r = http.put(f"/runs/{run_id}/ranks/0/set/name", params={"value": "from-http"})
        assert r.status_code == 200, r.text
        # `python -m runctl` puts the project directory first on sys.path, as a user's shell does
        cli = subprocess.run(
            [sys.executable, "-m", "runctl", "set", run_id, "lr=0.25"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert rank.wait_exit() == 0, rank.output()
        assert "SAW lr=0.25 name=from-http" in rank.output()
    finally:
        rank.stop()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout installed (not editable)."""
    where = tmp_path_factory.mktemp("release")
    env = _clean_env()
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(where / "dist"),
            str(ROOT),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (where / "dist").glob("runctl-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return venv


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_works_from_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    bin_dir = installed / "bin"
    work = _user_project(tmp_path / "work")  # empty but for the program and its look-alikes
    env = _clean_env()

    def run(*argv: str, cwd: Path = work) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    version = run(str(bin_dir / "runctl"), "--version")
    assert version.returncode == 0 and version.stdout.startswith("runctl "), version
    # only `runctl` is installed: the layers are reachable only under its namespace
    for name in _SHADOWS:
        probe = run(str(bin_dir / "python"), "-c", f"import {name}", cwd=tmp_path)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, probe
    installed_file = run(str(bin_dir / "python"), "-c", "import runctl; print(runctl.__file__)")
    assert str(installed) in installed_file.stdout, installed_file

    port, http_port = _free_port(), _free_port()
    url = f"nats://127.0.0.1:{port}"
    server = _Proc(
        [str(bin_dir / "runctl"), "up", "--port", str(port), "--monitor-port", "0"],
        cwd=work,
        env=env,
        log=tmp_path / "up.log",
    )
    procs = [server]
    try:
        wait_for(lambda: _listening(port) or server.proc.poll() is not None, timeout=30)
        assert server.proc.poll() is None, server.output()
        log = server.output()
        # the roles come from the nats.conf inside the installed package
        assert "generated NATS passwords" in log, log
        assert f"config {installed}" in log and "runctl/bus/nats.conf" in log, log
        assert (work / ".runctl" / "credentials" / "agent.env").is_file()
        # no login, no access: the shipped roles are in force
        anonymous = run(str(bin_dir / "runctl"), "--nats", url, "ls", cwd=tmp_path)
        assert anonymous.returncode == 5 and "Authorization Violation" in anonymous.stderr

        env["RUNCTL_NATS_URL"] = url
        rank = _Proc(
            [str(bin_dir / "python"), "train.py", "release"],
            cwd=work,
            env=env,
            log=tmp_path / "rank.log",
        )
        procs.append(rank)
        rank.wait_output("READY")
        gateway = _Proc(
            [str(bin_dir / "runctl"), "gateway", "--port", str(http_port)],
            cwd=work,
            env=env,
            log=tmp_path / "gateway.log",
        )
        procs.append(gateway)
        wait_for(lambda: _listening(http_port) or gateway.proc.poll() is not None, timeout=30)
        assert gateway.proc.poll() is None, gateway.output()
        r = httpx.put(
            f"http://127.0.0.1:{http_port}/runs/release/ranks/0/set/name",
            params={"value": "from-http"},
            timeout=30,
        )
        assert r.status_code == 200, r.text + gateway.output()
        cli = run(str(bin_dir / "runctl"), "set", "release", "lr=0.25")
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert rank.wait_exit() == 0, rank.output()
        assert "SAW lr=0.25 name=from-http" in rank.output()
    finally:
        for proc in reversed(procs):
            proc.stop()
