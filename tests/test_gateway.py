"""The HTTP gateway end to end: real uvicorn socket, real nats-server, real agents (in this
process through ``control()``, or in separate processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, Literal

import httpx
import pytest
from conftest import GatewayFactory, spawn_python, wait_for
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.bus.server import NatsServer
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    kind: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9


class Cfg(BaseModel):
    epochs: int = 3
    seed: int | None = None
    name: str = "x"
    tags: list[str] = []
    opt: Opt = Opt()


class CappedOpt(Opt):
    lr: float = Field(0.1, gt=0, le=0.3)


class Capped(Cfg):
    opt: CappedOpt = CappedOpt()


@pytest.fixture
def agents(nats_url: str) -> Iterator[Callable[..., Control[Any]]]:
    """Agents in this process; closed at the end of the test."""
    ctls: list[Control[Any]] = []

    def start(state: BaseModel, run: str, rank: int = 0, **options: Any) -> Control[Any]:
        ctl = control(state, run=run, rank=rank, url=nats_url, **options).wait_ready()
        ctls.append(ctl)
        return ctl

    yield start
    for ctl in ctls:
        ctl.close()


RANK_PROGRAM = """
    import os, sys, time
    from pydantic import BaseModel
    from runctl.agent import control

    class S(BaseModel):
        lr: float = 0.1

    ctl = control(S(), heartbeat=float(os.environ.get("HEARTBEAT", "1"))).wait_ready()
    os.write(1, b"READY\\n")
    while not ctl.stop_requested:
        time.sleep(0.01)
    os.write(1, ("STOPPED " + ctl.stop_reason + "\\n").encode())
    ctl.close()
    sys.exit(0)
"""


def spawn_rank(run: str, rank: int, url: str, heartbeat: float = 1.0) -> subprocess.Popen[str]:
    proc = spawn_python(
        textwrap.dedent(RANK_PROGRAM),
        env={
            "RUNCTL_RUN": run,
            "RUNCTL_RANK": str(rank),
            "RUNCTL_NATS_URL": url,
            "HEARTBEAT": str(heartbeat),
        },
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # the agent's log lines share stdout
        if "READY" in line:
            return proc
    proc.kill()
    raise AssertionError(f"rank {rank} did not start: {proc.communicate()}")


# --- discovery -----------------------------------------------------------------------------


def test_runs_list_each_rank_with_its_liveness(
    gateway: GatewayFactory, agents: Any, run_id: str
) -> None:
    agents(Cfg(), run_id, 0)
    agents(Cfg(), run_id, 1)
    http = gateway()
    runs = http.get("/runs").json()["runs"]
    mine = next(r for r in runs if r["run"] == run_id)
    assert mine["counts"] == {"alive": 2, "stalled": 0, "stale": 0, "exited": 0}
    rank0 = mine["ranks"][0]
    assert (rank0["rank"], rank0["status"], rank0["version"], rank0["pid"]) == (
        "0",
        "alive",
        0,
        os.getpid(),
    )
    assert rank0["heartbeat_age_s"] >= 0 and rank0["host"] and rank0["model"] == "Cfg"

    one = http.get(f"/runs/{run_id}")
    assert one.status_code == 200
    assert [r["rank"] for r in one.json()["ranks"]] == ["0", "1"]
    missing = http.get(f"/runs/{run_id}-nope")
    assert missing.status_code == 404 and "no live run" in missing.json()["message"]


# --- reads ---------------------------------------------------------------------------------


def test_reads_return_the_state_itself_with_headers(
    gateway: GatewayFactory, agents: Any, run_id: str
) -> None:
    state = Cfg()
    agents(state, run_id)
    http = gateway()
    base = f"/runs/{run_id}/ranks/0"
    r = http.get(f"{base}/get")
    assert r.status_code == 200
    assert r.json() == state.model_dump(mode="json")
    assert r.headers["X-Runctl-Version"] == "0"
    assert r.headers["X-Runctl-Status"] == "alive"
    assert r.headers["X-Runctl-Source"] == "registry"
    assert float(r.headers["X-Runctl-Age"]) >= 0
    assert http.get(f"{base}/get/opt.lr").json() == 0.1
    assert http.get(f"{base}/get/opt/kind").json() == "sgd"
    assert http.get(f"{base}/get_from_path", params={"path": "opt.momentum"}).json() == 0.9
    fresh = http.get(f"{base}/get/opt", params={"fresh": "true"})
    assert fresh.json() == {"lr": 0.1, "kind": "sgd", "momentum": 0.9}
    assert fresh.headers["X-Runctl-Source"] == "agent"
    gathered = http.get(f"/runs/{run_id}/ranks/all/get/opt.lr").json()
    assert gathered["ranks"]["0"]["value"] == 0.1 and gathered["missing"] == []
    bad = http.get(f"{base}/get/opt.nope")
    assert bad.status_code == 404 and "nope" in bad.json()["message"]  # as Freak


def test_reads_come_from_the_registry_and_mark_a_killed_rank_stale(
    gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    proc = spawn_rank(run_id, 0, nats_url, heartbeat=0.2)
    http = gateway()
    base = f"/runs/{run_id}/ranks/0"
    assert http.put(f"{base}/set/lr", params={"value": "0.25"}).status_code == 200
    proc.send_signal(signal.SIGKILL)
    proc.communicate()

    def stale() -> bool:
        return bool(http.get(f"{base}/get").headers.get("X-Runctl-Status") == "stale")

    wait_for(stale, timeout=15)
    r = http.get(f"{base}/get")
    assert r.status_code == 200 and r.json() == {"lr": 0.25}  # its last published state
    assert r.headers["X-Runctl-Version"] == "1" and float(r.headers["X-Runctl-Age"]) > 0.5
    listed = http.get(f"/runs/{run_id}").json()["ranks"][0]
    assert listed["status"] == "stale"
    # nobody answers for it any more: a write is a fast 404, not a timeout
    gone = http.put(f"{base}/set/lr", params={"value": "0.5"})
    assert gone.status_code == 404
    assert http.get(f"{base}/get", params={"fresh": "true"}).status_code == 404


def test_an_exited_rank_reads_as_exited(
    gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    ctl = control(Cfg(), run=run_id, rank=0, url=nats_url).wait_ready()
    ctl.close()
    r = gateway().get(f"/runs/{run_id}/ranks/0/get")
    assert r.status_code == 200 and r.headers["X-Runctl-Status"] == "exited"


# --- writes --------------------------------------------------------------------------------


def test_put_parses_json_else_string(gateway: GatewayFactory, agents: Any, run_id: str) -> None:
    state = Cfg()
    agents(state, run_id)
    http = gateway()
    base = f"/runs/{run_id}/ranks/0/set"

    r = http.put(f"{base}/seed", params={"value": "5"})  # Optional[int] that was None
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["outcome"], body["version"], body["changed"]) == ("applied", 1, True)
    assert body["value"]["seed"] == 5 and state.seed == 5
    assert r.headers["X-Runctl-Version"] == "1" and r.headers["X-Runctl-Changed"] == "true"

    assert http.put(f"{base}/seed", params={"value": "null"}).status_code == 200
    assert state.seed is None
    assert http.put(f"{base}/opt.kind", params={"value": "adam"}).status_code == 200
    assert state.opt.kind == "adam"  # a bare word is a string
    assert http.put(f"{base}/name", params={"value": "123"}).status_code == 200
    assert state.name == "123"  # a number a str field refuses is taken as the text
    assert http.put(f"{base}/name", params={"value": '"quoted"'}).status_code == 200
    assert state.name == "quoted"
    assert http.put(f"{base}/tags", params={"value": '["a", "b"]'}).status_code == 200
    assert state.tags == ["a", "b"]
    assert http.put(f"{base}/tags/1", params={"value": "c"}).status_code == 200
    assert state.tags == ["a", "c"]

    version = int(
        http.get(f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"}).headers[
            "X-Runctl-Version"
        ]
    )
    bad = http.put(f"{base}/opt.kind", params={"value": "rmsprop"})
    assert bad.status_code == 422
    err = bad.json()
    assert err["error"] == "validation"
    assert err["detail"][0]["loc"] == ["query", "value"]  # FastAPI's, as Freak's clients read
    assert err["detail"][0]["field"] == ["opt", "kind"]  # where in the state
    assert err["detail"][0]["type"] == "literal_error"
    assert "invalid value for opt.kind" in err["message"]
    assert state.opt.kind == "adam"  # unchanged
    after = http.get(f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"})
    assert int(after.headers["X-Runctl-Version"]) == version
    assert http.put(f"{base}/epochs", params={"value": "many"}).status_code == 422
    assert http.put(f"{base}/__dict__", params={"value": "1"}).status_code == 400


def test_patch_merges_nested_and_keeps_siblings(
    gateway: GatewayFactory, agents: Any, run_id: str
) -> None:
    state = Cfg()
    held = state.opt
    agents(state, run_id)
    http = gateway()
    base = f"/runs/{run_id}/ranks/0/set"
    # the siblings away from their defaults first: a shallow merge would bring them back
    r = http.patch(base, json={"opt": {"kind": "adam", "momentum": 0.5}})
    assert r.status_code == 200, r.text
    r = http.patch(base, json={"opt": {"lr": 0.5}, "epochs": 9})
    assert r.status_code == 200, r.text
    assert r.json()["value"]["opt"] == {"lr": 0.5, "kind": "adam", "momentum": 0.5}
    assert (held.lr, held.kind, held.momentum, state.epochs) == (0.5, "adam", 0.5, 9)
    # into a sub-tree; no content-type header needed (curl -d sends a form type)
    r = http.patch(
        f"{base}/opt",
        content=b'{"kind": "adam"}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert (held.lr, held.kind) == (0.5, "adam")

    bad = http.patch(base, json={"opt": {"lr": -1, "momentum": 0.1}})
    assert bad.status_code == 422
    assert [e["loc"] for e in bad.json()["detail"]] == [["body", "opt", "lr"]]
    assert [e["field"] for e in bad.json()["detail"]] == [["opt", "lr"]]
    unknown = http.patch(base, json={"opt": {"lrr": 1}})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["type"] == "extra_forbidden"
    assert (held.lr, held.momentum) == (0.5, 0.5)  # nothing of either change was applied


def test_reset_returns_to_the_initial_state(
    gateway: GatewayFactory, agents: Any, run_id: str
) -> None:
    state = Cfg()
    agents(state, run_id)
    http = gateway()
    http.put(f"/runs/{run_id}/ranks/0/set/opt.lr", params={"value": "0.7"})
    r = http.delete(f"/runs/{run_id}/ranks/0/reset")
    assert r.status_code == 200 and r.json()["changed"] is True
    assert state.opt.lr == 0.1 and r.json()["value"] == Cfg().model_dump(mode="json")
    again = http.delete(f"/runs/{run_id}/ranks/0/reset")
    assert again.json()["changed"] is False and again.headers["X-Runctl-Changed"] == "false"


def test_writes_to_all_report_each_rank(gateway: GatewayFactory, agents: Any, run_id: str) -> None:
    s0, s1 = Cfg(), Capped()
    agents(s0, run_id, 0)
    agents(s1, run_id, 1)
    http = gateway()
    base = f"/runs/{run_id}/ranks/all"

    both = http.put(f"{base}/set/opt.lr", params={"value": "0.2"})
    assert both.status_code == 200
    body = both.json()
    assert body["acknowledged"] == ["0", "1"] and body["missing"] == []
    assert {r: v["outcome"] for r, v in body["ranks"].items()} == {"0": "applied", "1": "applied"}
    assert s0.opt.lr == s1.opt.lr == 0.2

    mixed = http.put(f"{base}/set/opt.lr", params={"value": "0.5"})  # over rank 1's cap
    assert mixed.status_code == 207
    ranks = mixed.json()["ranks"]
    assert ranks["0"]["outcome"] == "applied"
    assert ranks["1"]["outcome"] == "rejected"
    assert ranks["1"]["detail"][0]["type"] == "less_than_equal"
    assert (s0.opt.lr, s1.opt.lr) == (0.5, 0.2)

    none = http.patch(f"{base}/set", json={"opt": {"kind": "bogus"}})
    assert none.status_code == 422
    assert {v["outcome"] for v in none.json()["ranks"].values()} == {"rejected"}
    assert s0.opt.kind == s1.opt.kind == "sgd"

    reset = http.delete(f"{base}/reset")
    assert reset.status_code == 200 and s0.opt.lr == s1.opt.lr == 0.1


def test_stop_all_reaches_ranks_in_separate_processes(
    gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    procs = [spawn_rank(run_id, rank, nats_url) for rank in (0, 1)]
    try:
        r = gateway().post(f"/runs/{run_id}/ranks/all/stop", params={"reason": "enough"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["acknowledged"] == ["0", "1"] and body["missing"] == []
        assert all(v["outcome"] == "applied" for v in body["ranks"].values())
        for proc in procs:
            out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            assert "STOPPED enough" in out
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


def test_stop_one_rank_and_schema(gateway: GatewayFactory, agents: Any, run_id: str) -> None:
    ctl = agents(Cfg(), run_id, 0)
    agents(Cfg(), run_id, 1)
    http = gateway()
    schema = http.get(f"/runs/{run_id}/ranks/0/schema").json()
    assert schema["properties"]["opt"]["$ref"] == "#/$defs/Opt"
    assert set(schema["$defs"]["Opt"]["properties"]) == {"lr", "kind", "momentum"}
    every = http.get(f"/runs/{run_id}/ranks/all/schema").json()
    assert set(every["ranks"]) == {"0", "1"}
    r = http.post(f"/runs/{run_id}/ranks/0/stop", params={"reason": "r0 only"})
    assert r.status_code == 200 and r.json()["value"]["stop_requested"] is True
    assert ctl.stop_requested and ctl.stop_reason == "r0 only"
    assert http.get(f"/runs/{run_id}/ranks/1/get", params={"fresh": "true"}).status_code == 200


# --- Freak-compatible root routes ------------------------------------------------------------


def test_freak_root_routes_act_on_the_default_rank(
    gateway: GatewayFactory, agents: Any, run_id: str
) -> None:
    state = Cfg()
    agents(state, run_id)
    http = gateway(default_run=run_id, default_rank="0")
    assert http.get("/get").json() == Cfg().model_dump(mode="json")
    assert http.get("/get/opt/lr").json() == 0.1
    assert http.get("/get_from_path", params={"path": "opt.kind"}).json() == "sgd"
    r = http.put("/set/opt/lr", params={"value": "0.3"})
    assert (r.status_code, r.json()) == (200, "success") and state.opt.lr == 0.3
    assert http.patch("/set/opt", json={"kind": "adam"}).json() == "success"
    assert http.patch("/set", json={"epochs": 7}).json() == "success"
    assert (state.opt.lr, state.opt.kind, state.epochs) == (0.3, "adam", 7)
    assert http.put("/set/opt/kind", params={"value": "bogus"}).status_code == 422
    assert http.delete("/reset").json() == "success" and state.opt.lr == 0.1


def test_root_routes_without_a_run_act_on_the_only_live_one(nats_server: NatsServer) -> None:
    url = nats_server.url  # a private server: no other test's runs
    with (
        GatewayThread(Settings(nats_url=url, port=0)) as gw,
        httpx.Client(base_url=gw.url, timeout=20) as http,
    ):
        r = http.get("/get")
        assert r.status_code == 404 and "no live run" in r.json()["message"]
        with control(Cfg(), run="solo", url=url).wait_ready() as solo:
            assert http.get("/get").json() == Cfg().model_dump(mode="json")
            assert http.put("/set/epochs", params={"value": "4"}).json() == "success"
            assert solo.state.epochs == 4
            with control(Cfg(), run="other", url=url).wait_ready():
                r = http.get("/get/epochs")
                assert r.status_code == 409 and r.json()["runs"] == ["other", "solo"]
                assert "/runs/" in r.json()["message"]
        r = http.get("/get")  # both said goodbye
        assert r.status_code == 404 and "none alive" in r.json()["message"]


# --- docs and page ---------------------------------------------------------------------------


def test_openapi_docs_and_page(gateway: GatewayFactory) -> None:
    http = gateway()
    assert http.get("/docs").status_code == 200
    spec = http.get("/openapi.json").json()
    ops = {
        (path, method): op for path, item in spec["paths"].items() for method, op in item.items()
    }
    assert ops[("/runs/{run}/ranks/{rank}/set/{path}", "put")]["summary"] == "Set one value"
    assert ops[("/runs/{run}/ranks/{rank}/set", "patch")]["requestBody"]["required"] is True
    assert all(op.get("summary") for op in ops.values())
    page = http.get("/")  # the console (tests/test_console_*.py drive it)
    assert page.status_code == 200 and "/static/js/main.js" in page.text
