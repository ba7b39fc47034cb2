"""What operators see: ``runctl steps`` / ``--explain`` / ``runctl forget`` and the HTTP
routes, driven by a real program's runs: a changed config re-runs, an ignored-prefix key
does not, ``forget STEP+`` re-runs that step and every later one, and explain says why."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import BaseModel

from runctl.agent import control
from runctl.cli.app import main as cli
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings


class S(BaseModel):
    x: int = 0


def program(url: str, run: str, cfg: dict[str, Any]) -> list[str]:
    """One run of the program: four epochs under ``cfg``, then an export. What ran."""
    ran: list[str] = []
    with control(S(), run=run, rank=0, url=url) as ctl:
        for epoch in ctl.steps("epoch", range(4), config=cfg):
            ran.append(f"epoch[{epoch}]")
        with ctl.once("export") as s:
            if not s.done:
                ran.append("export")
    return ran


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli(list(argv))
    return code, capsys.readouterr().out


def explain_rows(out: str) -> dict[str, tuple[str, str]]:
    """STEP -> (ON RESTART, WHY) from the --explain table."""
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[2] in ("skip", "run"):
            rows[parts[0]] = (parts[2], parts[3])
    return rows


def test_config_changes_prefix_keys_forget_plus_and_explain(
    nats_url: str, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    everything = [f"epoch[{i}]" for i in range(4)] + ["export"]
    assert program(nats_url, run_id, {"lr": 0.1, "_workers": 2}) == everything
    # a key with the ignore prefix is not part of the identity: nothing runs again
    assert program(nats_url, run_id, {"lr": 0.1, "_workers": 8}) == []

    code, out = run_cli(capsys, "steps", run_id, "--url", nats_url)
    assert code == 0
    assert "epoch[3]" in out and "5 steps: 5 done" in out

    code, out = run_cli(
        capsys, "steps", run_id, "--url", nats_url, "--explain", "--config", 'epoch={"lr": 0.2}'
    )
    rows = explain_rows(out)
    assert rows["epoch[0]"][0] == "run" and "lr: 0.1 -> 0.2" in rows["epoch[0]"][1]
    assert rows["export"][0] == "skip" and rows["export"][1].startswith("done")
    assert "a restart would skip 1 and run 4 (4 config changed)" in out

    # the changed config re-runs every epoch (export has its own, unchanged identity)
    assert program(nats_url, run_id, {"lr": 0.2}) == [f"epoch[{i}]" for i in range(4)]

    code, out = run_cli(capsys, "forget", run_id, "epoch:2+", "--url", nats_url)
    assert code == 0 and "forgot 3 step(s)" in out  # epoch 2 (both configs), epoch 3
    code, out = run_cli(capsys, "steps", run_id, "--url", nats_url, "--explain")
    rows = explain_rows(out)
    assert rows["epoch[2]"][0] == "run" and rows["epoch[2]"][1].startswith("forced")
    assert "epoch:2+" in rows["epoch[3]"][1]
    assert rows["epoch[1]"][0] == "skip" and rows["export"][0] == "skip"

    assert program(nats_url, run_id, {"lr": 0.2}) == ["epoch[2]", "epoch[3]"]

    code, out = run_cli(capsys, "forget", run_id, "nothing-like-this", "--url", nats_url)
    # as the HTTP route (200, forgotten: 0): nothing matching is no error
    assert code == 0 and "nothing to forget" in out and "forgotten: 0" in out
    code, out = run_cli(
        capsys,
        "steps",
        run_id,
        "--url",
        nats_url,
        "--rank",
        "0",
        "--json",
        "--status",
        "done",
        "--name",
        "epoch",
    )
    view = json.loads(out)
    assert view["count"] == 7  # epochs 0-3 at lr 0.2; 0, 1 and 3 at lr 0.1 (2 was forgotten)
    assert {r["status"] for r in view["steps"]} == {"done"}


def test_cli_errors_name_the_problem(nats_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["steps", "bad.run", "--url", nats_url]) == 2
    assert "invalid run 'bad.run'" in capsys.readouterr().err
    assert cli(["forget", "r", "--url", nats_url]) == 2
    assert "--everything" in capsys.readouterr().err


@pytest.fixture
async def http(nats_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway (uvicorn on a socket, with its auth, limits and error handlers),
    not the router on a bare app."""
    thread = GatewayThread(Settings(nats_url=nats_url, port=0)).start()
    try:
        async with httpx.AsyncClient(base_url=thread.url, timeout=20) as client:
            yield client
    finally:
        thread.stop()


@pytest.mark.anyio
async def test_http_lists_explains_and_forgets_after_the_program_exited(
    http: httpx.AsyncClient, nats_url: str, run_id: str
) -> None:
    with control(S(), run=run_id, rank=0, url=nats_url) as ctl:
        for _ in ctl.steps("shard", ["a", "b", "c"]):
            pass
        ctl.done("prepare", scope="run", result={"rows": 3})
    with control(S(), run=run_id, rank=1, url=nats_url) as ctl:
        for _ in ctl.steps("shard", ["a"]):
            pass

    got = (await http.get(f"/runs/{run_id}/steps")).json()
    assert got["count"] == 5
    assert [r["step"] for r in got["steps"]][:3] == ["shard[a]", "shard[b]", "shard[c]"]
    last = (await http.get(f"/runs/{run_id}/steps", params={"limit": 2})).json()
    assert last["count"] == 5 and last["truncated"] and len(last["steps"]) == 2
    rank1 = (await http.get(f"/runs/{run_id}/steps", params={"rank": 1})).json()
    assert sorted((r["scope"], r["step"]) for r in rank1["steps"]) == [
        ("1", "shard[a]"),
        ("run", "prepare"),
    ]
    (prepare,) = [r for r in rank1["steps"] if r["name"] == "prepare"]
    assert prepare["result"] == {"rows": 3} and prepare["rank"] == "0"
    explained = (
        await http.get(f"/runs/{run_id}/steps", params={"explain": "true", "rank": "0"})
    ).json()
    assert explained["summary"] == {"skip": 4, "run": 0}
    assert (await http.get(f"/runs/{run_id}/steps", params={"status": "bogus"})).status_code == 400
    assert (await http.get("/runs/bad.run/steps")).status_code in (400, 404)

    forgot = (
        await http.delete(
            f"/runs/{run_id}/steps/shard:b", params={"successors": "true", "rank": "0"}
        )
    ).json()
    assert forgot["forgotten"] == 3  # b, c, and prepare (done after b started)
    after = (await http.get(f"/runs/{run_id}/steps")).json()
    assert sorted(r["step"] for r in after["steps"]) == ["shard[a]", "shard[a]"]
    assert (await http.delete(f"/runs/{run_id}/steps")).status_code == 400
    wiped = (await http.delete(f"/runs/{run_id}/steps", params={"everything": "true"})).json()
    assert wiped["forgotten"] == 2
    assert (await http.get(f"/runs/{run_id}/steps")).json()["count"] == 0
