"""The processes of one benchmark run: a controlled program with its load client, and the
runctl gateway. Every process logs to a file in the run's work dir (shown on failure)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.control import shm

__all__ = [
    "REPO",
    "BenchError",
    "Gateway",
    "Program",
    "child_env",
    "die_with_parent",
    "free_port",
    "read_ready",
    "tail",
    "wait_or_kill",
]

REPO = Path(__file__).resolve().parent.parent.parent


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark's child process: unbuffered, the repo importable."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # the repo root first: `bench.control.*` must import from Freak's venv too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class Program:
    """The controlled program (``bench.control.program``) run by ``python``, plus a load
    client process (``bench.control.client``) attached to the same shared page."""

    def __init__(
        self,
        tool: str,
        python: Path | str,
        workdir: Path,
        args: list[str],
        base: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.tool = tool
        self.python = str(python)
        self.dir = workdir / tool
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = args
        self.base = base
        self.env = child_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.page: shm.Page | None = None

    @property
    def log(self) -> Path:
        return self.dir / "program.log"

    def start(self, timeout: float = 60.0) -> Program:
        page_path, ready_path = self.dir / "page", self.dir / "ready.json"
        ready_path.unlink(missing_ok=True)
        self.page = shm.create(page_path, "pause")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "bench.control.program",
                    "--tool",
                    self.tool,
                    "--shm",
                    str(page_path),
                    "--ready",
                    str(ready_path),
                    *self.args,
                ],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        self.ready = read_ready(self.proc, ready_path, self.log, f"{self.tool} program", timeout)
        with (self.dir / "client.log").open("wb") as log:
            self.client = subprocess.Popen(
                [sys.executable, "-m", "bench.control.client", "--shm", str(page_path)],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                preexec_fn=die_with_parent,
            )
        return self

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.client is not None and self.client.stdin and self.client.stdout
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"{self.tool} program exited:\n{tail(self.log)}")
        self.client.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.client.stdin.flush()
        line = self.client.stdout.readline()
        if not line:
            raise BenchError(f"load client died:\n{tail(self.dir / 'client.log')}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok"):
            raise BenchError(f"{self.tool}: {op} failed: {reply['error']}\n{tail(self.log)}")
        return reply

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.client is not None and self.client.poll() is None:
            assert self.client.stdin is not None
            with contextlib.suppress(OSError):
                self.client.stdin.write('{"op": "quit"}\n')
                self.client.stdin.close()
            wait_or_kill(self.client, 5)
        if self.page is not None:
            self.page.set_mode("exit")
        if self.proc is not None:
            wait_or_kill(self.proc, 10)
        if self.page is not None:
            self.page.close()
            self.page = None


class Gateway:
    """The gateway in its own process (``bench.control.gateway_main``)."""

    def __init__(
        self, nats_url: str, run: str, rank: str, workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable, "-m", "bench.control.gateway_main", "--nats", nats_url,
            "--host", "127.0.0.1", "--port", str(self.port), "--run", run, "--rank", rank,
        ]  # fmt: skip
        self.log = workdir / "gateway.log"
        self.env = child_env(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, probe: str, timeout: float = 30.0) -> Gateway:
        """Start, then wait until ``probe`` (a path) answers 200."""
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + probe, timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop()
        raise BenchError(f"gateway not answering {probe} ({last}):\n{tail(self.log)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            wait_or_kill(self.proc, 10)


def read_ready(
    proc: subprocess.Popen[Any], path: Path, log: Path, what: str, timeout: float
) -> dict[str, Any]:
    """The JSON a child writes (atomically) to ``path`` once it is ready; BenchError with
    the end of its ``log`` if it exits or ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} did not start:\n{tail(log)}")
        time.sleep(0.02)
    ready: dict[str, Any] = json.loads(path.read_text())
    return ready


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: SIGTERM when the runner dies, so an interrupted run leaves no busy loop."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_or_kill(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait for ``proc`` to exit; kill it after ``timeout`` seconds."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
