"""``runctl`` as a user runs it: a subprocess against a real nats-server and a real agent,
checking what it prints and its exit code."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import anyio
import httpx
import pytest
from conftest import ROOT, process_env, wait_for
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.bus import Client, NotFound
from runctl.cli.app import main
from runctl.cli.server import up_argv
from runctl.cli.tail import format_message, tail_subjects


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    kind: Literal["sgd", "adam"] = "sgd"
    name: str = "x"


class Cfg(BaseModel):
    epochs: int = 3
    seed: int | None = None
    opt: Opt = Opt()


def runctl(
    *args: str, url: str | None, cwd: Path, timeout: float = 30, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RUNCTL_NATS_URL", None)
    if url is not None:
        env["RUNCTL_NATS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "runctl", *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def agent(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        yield ctl.wait_ready()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_ls_shows_runs_as_a_table(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    out = runctl("ls", run_id, url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[:4] == ["RUN", "RANK", "STATUS", "VERSION"]
    assert row.split()[:4] == [run_id, "0", "alive", "0"]
    assert str(os.getpid()) in row and "Cfg" in row
    missing = runctl("ls", f"{run_id}-nope", url=nats_url, cwd=tmp_path)
    assert missing.returncode == 3
    assert one_line(missing.stderr) == f"runctl: no live run '{run_id}-nope'"


def test_get_prints_json(agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path) -> None:
    out = runctl("get", f"{run_id}/0", url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == Cfg().model_dump(mode="json")
    assert out.stdout.startswith("{\n  ")  # pretty
    every = runctl("get", run_id, "opt.lr", url=nats_url, cwd=tmp_path)
    assert json.loads(every.stdout) == {"0": 0.1}
    gone = runctl("get", f"{run_id}-nope/0", url=nats_url, cwd=tmp_path)
    assert gone.returncode == 3
    assert one_line(gone.stderr) == f"runctl: no live rank '0' of run '{run_id}-nope'"


def test_set_applies_several_assignments_atomically(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    state = agent.state
    out = runctl("set", run_id, "opt.lr=0.5", "opt.name=123", "seed=7", url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rank 0: applied (version 1)"
    assert (state.opt.lr, state.opt.name, state.seed) == (0.5, "123", 7)

    bad = runctl("set", run_id, "opt.lr=0.9", "opt.kind=bogus", url=nats_url, cwd=tmp_path)
    assert bad.returncode == 4
    assert one_line(bad.stderr) == (
        "runctl: invalid value for opt.kind: Input should be 'sgd' or 'adam'"
    )
    assert (state.opt.lr, state.opt.kind, agent.version) == (0.5, "sgd", 1)  # none applied

    missing = runctl("set", f"{run_id}-nope", "epochs=1", url=nats_url, cwd=tmp_path)
    assert missing.returncode == 3
    assert one_line(missing.stderr) == f"runctl: no live run '{run_id}-nope'"


def test_patch_reset_and_stop(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    state = agent.state
    out = runctl("patch", f"{run_id}/0", '{"opt": {"kind": "adam"}}', url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (state.opt.kind, state.opt.lr) == ("adam", 0.1)  # siblings kept
    reset = runctl("reset", run_id, url=nats_url, cwd=tmp_path)
    assert reset.returncode == 0 and state.opt.kind == "sgd" and state.opt.lr == 0.1

    stop = runctl("stop", run_id, "--reason", "from the cli", url=nats_url, cwd=tmp_path)
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip() == "rank 0: stop requested"
    assert agent.stop_requested and agent.stop_reason == "from the cli"


def test_tail_prints_changes_and_events(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RUNCTL_NATS_URL": nats_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "tail", run_id, "--count", "2"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "tailing" in proc.stderr.readline()

        async def change() -> None:
            async with await Client.connect(nats_url, timeout=20) as client:
                # tail does not listen to commands: a missing rank is still a fast 404
                with pytest.raises(NotFound):
                    await client.get(run_id, 9, fresh=True)
                await client.set(run_id, 0, "opt.lr", 0.25)

        anyio.run(change)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert any(" state    v1 (set) " in line and '"lr":0.25' in line for line in lines)
    assert any(" event    set v1" in line for line in lines)
    assert all(f"{run_id}/0" in line for line in lines)


def test_tail_formats_commands_and_raw_json() -> None:
    cmd = b'{"t":"set/1","path":"opt.lr","value":0.5}'
    line = format_message("runctl.r1.all.cmd.set", cmd)
    assert line is not None and " r1/all " in line and " command  set " in line
    assert '"path":"opt.lr"' in line and '"value":0.5' in line
    raw = format_message("runctl.r1.all.cmd.set", cmd, raw=True)
    assert raw is not None
    assert json.loads(raw) == {"subject": "runctl.r1.all.cmd.set", "data": json.loads(cmd)}
    beat = (
        b'{"t":"state/1","run":"r1","rank":"0","version":3,"ts":0,"state":{},"cause":"heartbeat"}'
    )
    assert format_message("runctl.r1.0.state", beat) is None
    assert format_message("runctl.r1.0.state", beat, heartbeats=True) is not None
    odd = format_message("runctl.r1.0.evt.started", b"not json")
    assert odd is not None and "not json" in odd
    assert tail_subjects("r1") == ["runctl.r1.*.state", "runctl.r1.*.evt.*", "runctl.r1.*.done.>"]
    assert "runctl.*.*.cmd.*" in tail_subjects(None, commands=True)


def test_unreachable_nats_is_one_line_and_exit_5(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = runctl("--nats", f"nats://127.0.0.1:{port}", "ls", url=None, cwd=tmp_path)
    assert out.returncode == 5
    line = one_line(out.stderr)
    assert line.startswith(f"runctl: cannot connect to NATS at nats://127.0.0.1:{port}")
    assert "Traceback" not in out.stderr
    usage = runctl(url=None, cwd=tmp_path)
    assert usage.returncode == 2


def test_up_runs_nats_server_in_the_foreground(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GOMAXPROCS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runctl",
            "up",
            "--no-config",  # an open server: this test is about the foreground process
            "--port",
            str(port),
            "--store-dir",
            str(tmp_path / "store"),
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        async def reachable() -> bool:
            try:
                async with await Client.connect(f"nats://127.0.0.1:{port}") as client:
                    return await client.runs() == []  # JetStream is on
            except Exception:
                return False

        wait_for(lambda: anyio.run(reachable), timeout=20, interval=0.1)
        # Go on one core, as every server runctl starts (the environment sets none here)
        assert process_env(proc.pid).get("GOMAXPROCS") == "1"
        proc.send_signal(signal.SIGTERM)  # the server itself (exec): it stops cleanly
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "nats-server (127.0.0.1:" in err
    assert (tmp_path / "store" / "jetstream").is_dir()


def test_up_with_the_repo_config_generates_credentials_the_cli_uses(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # the repo's nats.conf, minus its fixed monitoring port (tests run side by side)
    conf = (ROOT / "nats.conf").read_text()
    (work / "nats.conf").write_text(
        "\n".join(line for line in conf.splitlines() if not line.startswith("http:"))
    )
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("RUNCTL_NATS_URL", "RUNCTL_NATS_USER", "RUNCTL_NATS_PASSWORD"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "up", "--port", str(port)],
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: _listening(port), timeout=20, interval=0.1)
        creds = work / ".runctl" / "credentials"
        assert stat.S_IMODE((creds / "operator.env").stat().st_mode) == 0o600
        here = runctl("--nats", url, "ls", url=None, cwd=work)  # logs in as the operator
        assert (here.returncode, here.stdout.strip()) == (0, "no runs"), here.stderr
        elsewhere = runctl("--nats", url, "ls", url=None, cwd=tmp_path)
        assert elsewhere.returncode == 5
        assert "Authorization Violation" in one_line(elsewhere.stderr)
        assert "RUNCTL_NATS_USER" in elsewhere.stderr
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "generated NATS passwords" in err and "config nats.conf" in err
    assert (work / ".runctl" / "nats" / "jetstream").is_dir()


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


def test_up_argv_with_and_without_a_config() -> None:
    assert up_argv("nats-server", config=None, port=None, store_dir="s") == [
        "nats-server",
        "-a",
        "127.0.0.1",
        "-p",
        "4222",
        "-js",
        "-sd",
        "s",
    ]
    assert up_argv("nats-server", config="nats.conf", port=5000, store_dir="s") == [
        "nats-server",
        "-c",
        "nats.conf",
        "-p",
        "5000",
        "-js",
        "-sd",
        "s",
    ]


def test_gateway_command_serves_and_refuses_an_open_public_bind(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    refused = runctl("gateway", "--host", "0.0.0.0", url=nats_url, cwd=tmp_path)
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0" in one_line(refused.stderr)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runctl",
            "--nats",
            nats_url,
            "gateway",
            "--port",
            str(port),
            "--run",
            run_id,
            "--no-access-log",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def answers() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/get/opt/lr").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, timeout=20, interval=0.1)
        r = httpx.put(f"http://127.0.0.1:{port}/set/opt/lr", params={"value": "0.4"})
        assert r.json() == "success" and agent.state.opt.lr == 0.4
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # uvicorn shuts down, then re-raises the signal it caught: the conventional exit status
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in err and "gateway on http://127.0.0.1" in err


def test_tokens_writes_a_private_file(tmp_path: Path) -> None:
    out = runctl("tokens", "--file", "t/tokens", url=None, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "t" / "tokens"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    roles = [
        line.split()[0]
        for line in path.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert roles == ["read", "write", "admin"]
    before = path.read_text()
    again = runctl("tokens", "--file", "t/tokens", url=None, cwd=tmp_path)
    assert again.returncode == 0 and "kept" in again.stdout and path.read_text() == before
    # the line it prints runs as printed (.venv/bin/runctl when the venv is not active)
    (serve,) = [ln.split("serve with:")[1] for ln in out.stdout.splitlines() if "serve with" in ln]
    runs = subprocess.run(
        ["bash", "-c", serve.replace("--tokens-file", "--help --tokens-file")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert runs.returncode == 0 and "--tokens-file" in runs.stdout, (serve, runs.stderr)


# --- in this process (cli.main): the same code, without a process start per call -----------


def run_main(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None
) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def test_more_commands_in_process(
    agent: Control[Cfg], nats_url: str, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    state = agent.state
    url = ("--nats", nats_url)
    code, out, _ = run_main(capsys, *url, "ls", "--json")
    assert code == 0
    assert any(r["run"] == run_id and r["status"] == "alive" for r in json.loads(out))
    code, out, _ = run_main(capsys, *url, "get", f"{run_id}/0", "opt.kind", "--fresh")
    assert (code, json.loads(out)) == (0, "sgd")
    code, out, _ = run_main(
        capsys, *url, "patch", run_id, "-", "--path", "opt", "--json", stdin='{"lr": 0.3}'
    )
    assert code == 0 and state.opt.lr == 0.3
    assert json.loads(out)["ranks"]["0"]["outcome"] == "applied"
    code, out, _ = run_main(capsys, *url, "set", f"{run_id}/0", "seed=12", "opt.name=7")
    assert code == 0 and (state.seed, state.opt.name) == (12, "7")
    code, out, _ = run_main(capsys, *url, "schema", run_id)
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "Cfg" and "opt" in schema["properties"]
    code, out, _ = run_main(capsys, *url, "reset", run_id, "--json")
    assert code == 0 and state.seed is None and json.loads(out)["verb"] == "reset"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("set", "R", "opt.lr"), "is not PATH=VALUE"),
        (("set", "R", "opt=1", "opt.lr=2"), "opt.lr"),
        (("set", "R", "tags.0=a", "seed=1"), "list index"),
        (("set", "a.b", "epochs=1"), "invalid run 'a.b'"),
        (("set", "R/", "epochs=1"), "invalid rank"),
        (("get", "R/0", "opt..lr"), "empty segment"),
        (("reset", "R/0", "--sync"), "--sync applies to every rank"),
        (("reset", "R", "--margin", "3"), "--margin needs --sync"),
        (("patch", "R", "{nope"), "invalid JSON"),
        (("patch", "R", "[1]"), "JSON object"),
        (("stop", "R", "--grace", "0"), "--grace"),
        (("tail", "a>b"), "invalid run"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    argv: tuple[str, ...],
    needle: str,
    run_id: str,
    nats_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = tuple(a.replace("R", run_id, 1) if a.startswith("R") else a for a in argv)
    code, out, err = run_main(capsys, "--nats", nats_url, *argv)
    assert code == 2 and out == ""
    assert one_line(err).startswith("runctl: ") and needle in err


def test_timeout_option_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--timeout", "0", "ls"])
    assert info.value.code == 2 and "--timeout" in capsys.readouterr().err
