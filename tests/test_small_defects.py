"""Smaller defects a new user hits, each with the exact situation that showed it: a port in
TIME_WAIT called busy, a synchronised change reported as "unchanged (version 0)", an agent
without the login its server requires saying only "not connected", two demos sharing one
store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_demo
from conftest import ROOT, free_port, wait_exit
from rankkit import ProgramRank, runctl_cli
from test_demo import Demo

from runctl.bus.server import NatsServer, port_free


def _time_wait(port: int) -> None:
    """Leave ``port`` in TIME_WAIT, as a nats-server that just exited leaves 4222: the
    listening side closes its connection first, then stops listening."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen()
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server's side closes first: its end goes to TIME_WAIT
    client.recv(1)  # the FIN arrived
    client.close()
    server.close()
    time.sleep(0.05)
    with socket.socket() as plain, pytest.raises(OSError, match="in use"):
        plain.bind(("127.0.0.1", port))  # the old check: a plain bind calls it busy


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for d in started:
        d.kill()


def test_a_port_in_time_wait_is_free_for_the_next_server(tmp_path: Path) -> None:
    port = free_port()
    _time_wait(port)
    assert port_free(port)
    # and a server binds it indeed (the check is the server's own way of binding)
    server = NatsServer(port=port, store_dir=tmp_path / "nats").start()
    try:
        assert server.port == port
    finally:
        server.stop()


def test_the_demo_serves_on_its_port_when_that_port_is_in_time_wait(
    demos: list[Demo], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    _time_wait(port)
    monkeypatch.setattr(test_demo, "_free_port", lambda: port)  # Demo passes --port PORT
    d = Demo(tmp_path, "--ranks", "1", "--duration", "1")
    demos.append(d)
    code, err = d.finish()
    assert code == 0, (d.output, err)
    assert "in use" not in d.output + err
    assert f"127.0.0.1:{port}" in d.output, d.output


def test_two_demos_with_different_ports_never_share_a_store(
    demos: list[Demo], tmp_path: Path
) -> None:
    one = Demo(tmp_path, "--ranks", "1")
    demos.append(one)
    one.wait_ready()
    two = Demo(tmp_path, "--ranks", "1")
    demos.append(two)
    two.wait_ready()
    stores = tmp_path / ".runctl"
    for d in (one, two):
        assert (stores / f"demo-{d.port}" / "jetstream").is_dir(), sorted(stores.iterdir())
    # a store that a running demo holds is refused, with the way out
    three = Demo(tmp_path, "--ranks", "1", "--store-dir", str(stores / f"demo-{one.port}"))
    demos.append(three)
    code, err = three.finish()
    assert code != 0, three.output
    assert "another runctl demo" in err and "--store-dir" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("step", [7, None], ids=["at-step-7", "before-its-first-step"])
def test_a_synchronised_set_says_pending_and_at_which_step(
    nats_url: str, run_id: str, step: int | None
) -> None:
    models = "from pydantic import BaseModel\nclass Cfg(BaseModel):\n    lr: float = 0.1\n"
    with ProgramRank(models, "Cfg()", run=run_id, url=nats_url) as rank:
        if step is not None:
            rank.do(f"ctl.sync({step})")
        out = runctl_cli("set", run_id, "lr=0.01", "--sync", url=nats_url)
        assert "unchanged (version 0)" not in out.stdout, out.stdout
        if step is None:  # no step to synchronise on: refused, saying why
            assert out.returncode == 2 and "has not reported a step" in out.stderr, out
            assert "ctl.sync(step)" in out.stderr
            return
        assert out.returncode == 0, out.stderr
        assert "synchronised at step" in out.stdout, out.stdout
        assert "rank 0: pending (at step" in out.stdout, out.stdout


def test_an_agent_without_the_login_its_server_requires_names_the_cause(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "auth.conf"
    conf.write_text('authorization { user: "someone", password: "secret" }\n')
    server = NatsServer(store_dir=tmp_path / "nats", config_file=conf).start()
    program = (
        "from pydantic import BaseModel\n"
        "from runctl.agent import control\n"
        "class Cfg(BaseModel):\n    lr: float = 0.1\n"
        "ctl = control(Cfg(), run='creds', rank=0, url=" + repr(server.url) + ")\n"
        "try:\n    ctl.wait_ready(5)\n"
        "except Exception as exc:\n    print('FAILED:', exc, flush=True)\n"
        "ctl.close(1)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_NATS")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", program],
            env={**env, "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,  # no .runctl/credentials here
            capture_output=True,
            text=True,
            timeout=40,
            check=False,
        )
    finally:
        server.stop()
    said = next((line for line in done.stdout.splitlines() if line.startswith("FAILED:")), "")
    assert said, (done.stdout, done.stderr)
    assert "not connected after 5s" in said
    assert "Authorization Violation" in said, said
    assert "RUNCTL_NATS_USER" in said and "runctl up" in said, said
    assert ".runctl/credentials/agent.env" in said, said


@pytest.mark.anyio
async def test_waiting_for_a_process_that_never_exits_fails_at_its_deadline() -> None:
    """The tests' exit-code helper: a rank that never exits fails the test at the deadline
    instead of holding it (a thread blocked in proc.wait() cannot be cancelled)."""
    proc = subprocess.Popen(["sleep", "600"])  # noqa: ASYNC220 - the helper takes a Popen
    try:
        with pytest.raises(TimeoutError, match="did not exit within"):
            await wait_exit(proc, 0.3, "sleep")
    finally:
        proc.kill()
        proc.wait(10)
    assert await wait_exit(proc, 5) == -9


@pytest.mark.parametrize(
    ("test", "required", "verdict"),
    [
        ("pytest.importorskip('no_such_extra_module')\ndef test_x():\n    pass\n", "1", "failed"),
        ("def test_x():\n    pytest.skip('4222 is busy')\n", "1", "failed"),
        ("def test_x():\n    pytest.skip('4222 is busy')\n", "", "skipped"),
        ("pytest.importorskip('no_such_extra_module')\ndef test_x():\n    pass\n", "", "skipped"),
    ],
    ids=["module-in-ci", "test-in-ci", "test-locally", "module-locally"],
)
def test_in_ci_a_skip_fails(tmp_path: Path, test: str, required: str, verdict: str) -> None:
    """.ci/run sets RUNCTL_REQUIRE_ALL=1: a test that would skip (a missing extra, a busy
    default port) fails there, saying why; elsewhere it still skips."""
    (tmp_path / "test_one.py").write_text("import pytest\n" + test)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}", "RUNCTL_REQUIRE_ALL": required}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "noskip", "-q", "-rA", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    out = done.stdout + done.stderr
    if verdict == "failed":
        assert done.returncode != 0 and "RUNCTL_REQUIRE_ALL=1 (CI) requires it" in out, out
    else:
        assert done.returncode in (0, 5) and "skipped" in out, out  # 5: nothing collected
