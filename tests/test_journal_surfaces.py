"""The change journal through the gateway (named tokens: who is the token's name and role)
and the CLI (``user@host``): history and its filters, undo, schedules, cancel, forgetting,
and ``runctl ls`` showing what a rank replayed."""

from __future__ import annotations

import getpass
import json
import secrets
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GatewayFactory, free_port, listening, wait_for
from pydantic import BaseModel, Field
from test_cli import runctl

from runctl.agent import Control, control
from runctl.bus.server import find_binary
from runctl.gateway.auth import parse_env

ALICE, ROOT, VIEWER = (secrets.token_urlsafe(24) for _ in range(3))
TOKENS = f"alice=write:{ALICE},root=admin:{ROOT},viewer=read:{VIEWER}"


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)


class Cfg(BaseModel):
    epochs: int = 3
    opt: Opt = Opt()


@pytest.fixture
def agent(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        ctl.wait_ready()
        ctl.sync(1)
        yield ctl


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_the_gateway_journals_the_token_name_and_role(
    gateway: GatewayFactory, agent: Control[Cfg], run_id: str
) -> None:
    http = gateway(tokens=parse_env(TOKENS))
    r = http.put(f"/runs/{run_id}/ranks/0/set/opt.lr", params={"value": "0.5"}, headers=auth(ALICE))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["journaled"] is True and r.headers["X-Runctl-Change"] == body["change_id"]
    r = http.patch(f"/runs/{run_id}/ranks/all/set", json={"epochs": 7}, headers=auth(ROOT))
    assert r.json()["ranks"]["0"]["journaled"] is True

    history = http.get(f"/runs/{run_id}/history", headers=auth(VIEWER)).json()["changes"]
    assert [c["by"]["name"] for c in history] == ["root", "alice"]
    by = history[1]["by"]
    assert by["via"] == "http" and by["role"] == "write" and by["addr"] == "127.0.0.1"
    assert history[1]["ranks"]["0"]["diff"] == [{"path": "opt.lr", "before": 0.1, "after": 0.5}]
    only = http.get(f"/runs/{run_id}/history", params={"path": "epochs"}, headers=auth(VIEWER))
    assert [c["by"]["name"] for c in only.json()["changes"]] == ["root"]
    since = http.get(f"/runs/{run_id}/history", params={"since": "1h"}, headers=auth(VIEWER))
    assert len(since.json()["changes"]) == 2
    bad = http.get(f"/runs/{run_id}/history", params={"since": "yesterday"}, headers=auth(ROOT))
    assert bad.status_code == 400 and "not a time" in bad.text
    for path in ("a..b", "_private", "x" * 2000):
        bad = http.get(f"/runs/{run_id}/history", params={"path": path}, headers=auth(ROOT))
        assert bad.status_code == 400 and bad.json()["error"] == "bad_path", path
    for rank in ("a.b", "*", "all"):
        bad = http.get(f"/runs/{run_id}/history", params={"rank": rank}, headers=auth(ROOT))
        assert bad.status_code == 400, rank

    # undo (write): its own author; a later change to the same field refuses it
    r = http.post(f"/runs/{run_id}/undo/{body['change_id'][:8]}", headers=auth(VIEWER))
    assert r.status_code == 403
    r = http.post(f"/runs/{run_id}/undo/{body['change_id'][:8]}", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert agent.state == Cfg(epochs=7)
    undo = http.get(f"/runs/{run_id}/history", params={"limit": 1}, headers=auth(ROOT)).json()
    assert undo["changes"][0]["undo_of"] == body["change_id"]
    assert undo["changes"][0]["by"]["name"] == "alice"
    r = http.post(f"/runs/{run_id}/undo/{body['change_id']}", headers=auth(ALICE))
    assert r.status_code == 409 and r.json()["error"] == "conflict"

    # a change at a step: listed, cancelled
    r = http.put(
        f"/runs/{run_id}/ranks/all/set/epochs",
        params={"value": "9", "at_step": "100"},
        headers=auth(ALICE),
    )
    assert r.status_code == 200 and r.json()["at_step"] == 100 and r.json()["journaled"]
    sched = http.get(f"/runs/{run_id}/schedules", headers=auth(VIEWER)).json()["schedules"]
    assert [s["id"] for s in sched] == [r.json()["change_id"]]
    assert sched[0]["by"]["name"] == "alice"
    r = http.post(f"/runs/{run_id}/schedules/{sched[0]['id']}/cancel", headers=auth(ALICE))
    assert r.status_code == 200, r.text
    assert http.get(f"/runs/{run_id}/schedules", headers=auth(VIEWER)).json()["schedules"] == []

    # removing the journal is the admin's
    assert http.delete(f"/runs/{run_id}/history", headers=auth(ALICE)).status_code == 403
    r = http.delete(f"/runs/{run_id}/history", headers=auth(ROOT))
    assert r.status_code == 200 and r.json()["removed"] >= 5
    assert http.get(f"/runs/{run_id}/history", headers=auth(ROOT)).json()["changes"] == []


def test_the_cli_journals_user_at_host(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    out = runctl("set", run_id, "opt.lr=0.5", url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = runctl("history", run_id, "--json", url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (entry,) = json.loads(out.stdout)
    assert entry["by"]["name"] == f"{getpass.getuser()}@{socket.gethostname()}"
    assert entry["by"]["via"] == "cli"
    table = runctl("history", f"{run_id}/0", url=nats_url, cwd=tmp_path).stdout
    assert "opt.lr: 0.1 -> 0.5" in table and "applied" in table and "(cli)" in table

    out = runctl("undo", run_id, url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"undid {entry['id'][:12]}" in out.stdout and agent.state.opt.lr == 0.1
    out = runctl("undo", run_id, entry["id"], url=nats_url, cwd=tmp_path)
    assert out.returncode == 1 and "already undone" in out.stderr


def test_the_cli_schedules_and_cancels(
    agent: Control[Cfg], nats_url: str, run_id: str, tmp_path: Path
) -> None:
    out = runctl("set", run_id, "epochs=9", "--at-step", "50", url=nats_url, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "scheduled at step 50" in out.stdout and "rank 0: pending (at step 50)" in out.stdout
    table = runctl("history", run_id, url=nats_url, cwd=tmp_path).stdout
    assert "@50" in table and "epochs = 9" in table, table  # what it asks, as typed
    listed = runctl("schedules", run_id, "--json", url=nats_url, cwd=tmp_path)
    (sched,) = json.loads(listed.stdout)
    out = runctl("cancel", run_id, sched["id"][:10], url=nats_url, cwd=tmp_path)
    assert out.returncode == 0 and "cancelled" in out.stdout, out.stderr
    assert (
        json.loads(runctl("schedules", run_id, "--json", url=nats_url, cwd=tmp_path).stdout) == []
    )
    agent.sync(60)
    assert agent.state.epochs == 3


def test_the_cli_refuses_what_it_cannot_do(nats_url: str, run_id: str, tmp_path: Path) -> None:
    out = runctl("forget-history", run_id, url=nats_url, cwd=tmp_path)
    assert out.returncode == 2 and "--yes" in out.stderr
    out = runctl("history", run_id, "--since", "soon", url=nats_url, cwd=tmp_path)
    assert out.returncode == 2 and "not a time" in out.stderr


def test_ls_shows_what_a_rank_replayed(nats_url: str, run_id: str, tmp_path: Path) -> None:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        ctl.wait_ready()
        assert runctl("set", run_id, "epochs=4", url=nats_url, cwd=tmp_path).returncode == 0
        assert runctl("set", run_id, "opt.lr=0.2", url=nats_url, cwd=tmp_path).returncode == 0
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        ctl.wait_ready()
        assert [c.verb for c in ctl.replayed] == ["set", "set"]
        out = runctl("ls", run_id, url=nats_url, cwd=tmp_path)
        header, row = out.stdout.splitlines()[:2]
        assert header.split()[4] == "REPLAYED" and row.split()[4] == "2"
        data = json.loads(runctl("ls", run_id, "--json", url=nats_url, cwd=tmp_path).stdout)
        assert data[0]["replayed"] == 2 and data[0]["replay_skipped"] == 0


def test_the_cli_says_per_rank_what_an_undo_set_back(
    nats_url: str, run_id: str, tmp_path: Path
) -> None:
    """An undo whose before-values differ per rank names each rank's values once."""
    with (
        control(Cfg(), run=run_id, rank=0, url=nats_url) as r0,
        control(Cfg(), run=run_id, rank=1, url=nats_url) as r1,
    ):
        r0.wait_ready()
        r1.wait_ready()
        for where, value in ((f"{run_id}/0", "0.5"), (f"{run_id}/1", "0.3"), (run_id, "0.2")):
            out = runctl("set", where, f"opt.lr={value}", url=nats_url, cwd=tmp_path)
            assert out.returncode == 0, out.stderr
        out = runctl("undo", run_id, url=nats_url, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert (r0.state.opt.lr, r1.state.opt.lr) == (0.5, 0.3)
        first = out.stdout.splitlines()[0]
        assert first.endswith(": rank 0: opt.lr=0.5; rank 1: opt.lr=0.3"), out.stdout
        table = runctl("history", run_id, "--limit", "1", url=nats_url, cwd=tmp_path).stdout
        assert " assign  0,1 " in table.splitlines()[1], table
        # the same values on every rank: said once
        assert runctl("set", run_id, "epochs=5", url=nats_url, cwd=tmp_path).returncode == 0
        out = runctl("undo", run_id, url=nats_url, cwd=tmp_path)
        assert out.stdout.splitlines()[0].endswith(": epochs=3"), out.stdout
        assert "rank 0: applied" in out.stdout and "rank 1: applied" in out.stdout, out.stdout


def test_a_server_without_jetstream_is_named(tmp_path: Path) -> None:
    """A user's own nats-server without ``-js``: the journal's commands say so (exit 5)."""
    port = free_port()
    server = subprocess.Popen(
        [find_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: listening(port), timeout=20)
        url = f"nats://127.0.0.1:{port}"
        for args in (("history", "exp1"), ("schedules", "exp1"), ("undo", "exp1")):
            out = runctl(*args, url=url, cwd=tmp_path)
            assert out.returncode == 5, (args, out.stderr)
            assert "JetStream is not available on the NATS server" in out.stderr, out.stderr
            assert "Traceback" not in out.stderr
    finally:
        server.terminate()
        server.wait(10)
