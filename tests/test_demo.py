"""``runctl demo`` as a user runs it: it starts, answers curl-like requests that change the
ranks mid-run, and stops everything it started (after --duration, or on Ctrl-C)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, wait_for


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Demo:
    """``runctl demo`` in a subprocess; its stdout collected line by line."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runctl",
                "demo",
                "--port",
                str(self.port),
                "--nats-port",
                "0",
                "--step-time",
                "0.05",
                *args,
            ],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        wait_for(
            lambda: "Ctrl-C stops everything." in self.output or self.proc.poll() is not None,
            timeout=45,
            interval=0.05,
        )
        assert self.proc.poll() is None, self.output

    def finish(self, timeout: float = 45) -> tuple[int, str]:
        # not communicate(): the reader thread owns stdout (stderr is small: no deadlock)
        self.proc.wait(timeout)
        self.reader.join(10)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        return self.proc.returncode, err

    def rank_pids(self) -> list[int]:
        return [int(m.group(1)) for m in re.finditer(r"\[rank \d+\] pid (\d+) ready", self.output)]

    def nats_port(self) -> int:
        match = re.search(r"NATS\s+nats://127\.0\.0\.1:(\d+)", self.output)
        assert match, self.output
        return int(match.group(1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for d in started:
        d.kill()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_demo_changes_a_rank_mid_run_and_stops_after_duration(
    demo: list[Demo], tmp_path: Path
) -> None:
    d = Demo(tmp_path, "--ranks", "2", "--duration", "3")
    demo.append(d)
    d.wait_ready()
    assert "curl -s -X PUT" in d.output and "runctl set demo" in d.output
    console = re.search(r"console\s+(http://\S+)", d.output)  # the console's URL, printed
    assert console and console.group(1) == f"{d.url}/console/demo", d.output
    page = httpx.get(console.group(1), timeout=10)
    assert page.status_code == 200 and "/static/js/main.js" in page.text
    r = httpx.put(
        f"{d.url}/runs/demo/ranks/all/set/optimizer.lr", params={"value": "0.05"}, timeout=10
    )
    assert r.status_code == 200, r.text
    assert r.json()["acknowledged"] == ["0", "1"]
    bad = httpx.put(
        f"{d.url}/runs/demo/ranks/0/set/optimizer.kind", params={"value": "rmsprop"}, timeout=10
    )
    assert bad.status_code == 422
    assert httpx.get(f"{d.url}/get/optimizer/lr", timeout=10).json() == 0.05  # root routes
    code, err = d.finish()
    assert code == 0, err
    assert "Traceback" not in err
    for rank in (0, 1):  # each rank's loop saw the change, then stopped cleanly
        assert re.search(rf"\[rank {rank}\] step \d+: now sgd lr=0.05", d.output), d.output
        assert f"[rank {rank}] stop requested" in d.output
    assert "3s are up" in d.output
    pids = d.rank_pids()
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)
    assert not _listening(d.nats_port()) and not _listening(d.port)
    assert (tmp_path / ".runctl" / f"demo-{d.port}" / "jetstream").is_dir()  # its own store


def test_demo_ctrl_c_stops_everything(demo: list[Demo], tmp_path: Path) -> None:
    d = Demo(tmp_path, "--ranks", "2")
    demo.append(d)
    d.wait_ready()
    stopped = httpx.post(
        f"{d.url}/runs/demo/ranks/1/stop", params={"reason": "one less"}, timeout=10
    )
    assert stopped.status_code == 200
    wait_for(lambda: "[rank 1] stop requested" in d.output, timeout=20)
    d.proc.send_signal(signal.SIGINT)
    code, err = d.finish()
    assert code == 0, err
    assert "Traceback" not in err and "runctl demo: stopping" in d.output
    assert "[rank 0] stop requested" in d.output  # stopped by the demo, gracefully
    assert all(_gone(pid) for pid in d.rank_pids())
    assert not _listening(d.nats_port())


def test_a_second_demo_starts_afresh(demo: list[Demo], tmp_path: Path) -> None:
    """The first demo's changes are in the change journal of its store; the next demo in the
    same directory starts from the code's defaults all the same (no replay of them)."""
    first = Demo(tmp_path, "--ranks", "2", "--duration", "3")
    demo.append(first)
    first.wait_ready()
    r = httpx.patch(
        f"{first.url}/runs/demo/ranks/0/set",
        json={"optimizer": {"kind": "adam", "lr": 0.05}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert first.finish()[0] == 0
    second = Demo(tmp_path, "--ranks", "2", "--duration", "3")
    demo.append(second)
    second.wait_ready()
    for rank in (0, 1):
        assert f"[rank {rank}] pid" in second.output
        (ready,) = re.findall(rf"\[rank {rank}\] pid \d+ ready: (.*)", second.output)
        assert ready == "sgd lr=0.01 momentum=0.9 batch=32", second.output
    history = httpx.get(f"{second.url}/runs/demo/history", timeout=10).json()["changes"]
    assert [c for c in history if c["verb"] != "replay"] == []
    assert second.finish()[0] == 0
