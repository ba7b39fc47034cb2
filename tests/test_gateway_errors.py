"""Every error the gateway maps, through a real uvicorn socket and a real nats-server:
bad names never become subjects, unknown ranks are 404 at once, silent ranks are 504 naming
them, large bodies are 413 unread, and nothing is ever echoed back in bulk."""

from __future__ import annotations

import signal
import socket
import subprocess
import textwrap
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import nats
import pytest
from conftest import GatewayFactory, register_silent_rank, spawn_python, wait_for
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.bus.server import NatsServer
from runctl.gateway.auth import parse_env
from runctl.gateway.errors import declares_body
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)


class Cfg(BaseModel):
    epochs: int = 3
    opt: Opt = Opt()


@pytest.fixture
def agent(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        yield ctl.wait_ready()


@pytest.fixture
async def bus_traffic(nats_url: str) -> AsyncIterator[list[str]]:
    """Subjects of every runctl message published while the test runs."""
    seen: list[str] = []
    nc = await nats.connect(nats_url)

    async def record(msg: Any) -> None:
        seen.append(msg.subject)

    await nc.subscribe("runctl.>", cb=record)
    await nc.flush()
    yield seen
    await nc.drain()


#: httpx itself refuses control characters in a URL, so none here
BAD_NAMES = ["a.b", "a*", "a>", "a b", "caf\u00e9", "x" * 10_000, "-" * 129, "a//b"[:1] + ":b"]


@pytest.mark.anyio
async def test_bad_names_are_400_and_never_reach_the_bus(
    gateway: GatewayFactory, bus_traffic: list[str]
) -> None:
    http = gateway()
    for bad in BAD_NAMES:
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/runs/{bad}", {}),
            ("GET", f"/runs/{bad}/ranks/0/get", {}),
            ("GET", f"/runs/{bad}/ranks/0/get", {"params": {"fresh": "true"}}),
            ("PUT", f"/runs/{bad}/ranks/all/set/epochs", {"params": {"value": "1"}}),
            ("PATCH", f"/runs/{bad}/ranks/0/set", {"json": {"epochs": 1}}),
            ("DELETE", f"/runs/{bad}/ranks/all/reset", {}),
            ("POST", f"/runs/{bad}/ranks/all/stop", {}),
            ("GET", f"/runs/{bad}/ranks/0/schema", {}),
            ("PUT", f"/runs/ok/ranks/{bad}/set/epochs", {"params": {"value": "1"}}),
            ("GET", f"/runs/ok/ranks/{bad}/get", {}),
        ]
        for method, url, kwargs in requests:
            r = http.request(method, url, **kwargs)
            assert r.status_code == 400, (method, url[:60], r.status_code, r.text[:200])
            body = r.json()
            assert body["error"] == "bad_token"
            assert "invalid run" in body["message"] or "invalid rank" in body["message"]
            assert len(r.content) < 1000  # a 10 KB name is cut short, not echoed
    assert not [s for s in bus_traffic if ".cmd." in s]


def test_malformed_paths_are_400_and_unknown_ones_404(
    gateway: GatewayFactory, agent: Control[Cfg], run_id: str
) -> None:
    http = gateway()
    base = f"/runs/{run_id}/ranks/0"
    for path, status, code in [
        ("opt..lr", 400, "bad_path"),
        ("__dict__", 400, "bad_path"),
        ("opt._private", 400, "bad_path"),
        ("x" * 2000, 400, "bad_path"),
        ("opt.nope", 404, "unknown_path"),  # well formed, names nothing: Freak's 404
        ("nope", 404, "unknown_path"),
    ]:
        for r in (
            http.get(f"{base}/get/{path}"),
            http.get(f"{base}/get/{path}", params={"fresh": "true"}),
            http.put(f"{base}/set/{path}", params={"value": "1"}),
            http.patch(f"{base}/set/{path}", json={"lr": 1}),
        ):
            assert r.status_code == status, (path[:20], r.request.method, r.text[:200])
            assert r.json()["error"] == code and len(r.content) < 1000
    assert agent.version == 0


def test_unknown_run_or_rank_is_404_from_no_responders(
    gateway: GatewayFactory, agent: Control[Cfg], run_id: str
) -> None:
    # A 20 s command timeout: a 404 that waited for it would fail the 10 s HTTP timeout.
    http = gateway(timeout=20.0)
    for run, rank in [
        (f"{run_id}-nope", "0"),
        (f"{run_id}-nope", "all"),
        (run_id, "7"),
        ("all", "0"),
    ]:
        base = f"/runs/{run}/ranks/{rank}"
        requests: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"{base}/get", {}),
            ("GET", f"{base}/get", {"params": {"fresh": "true"}}),
            ("PUT", f"{base}/set/epochs", {"params": {"value": "1"}}),
            ("PATCH", f"{base}/set", {"json": {"epochs": 1}}),
            ("DELETE", f"{base}/reset", {}),
            ("POST", f"{base}/stop", {}),
            ("GET", f"{base}/schema", {}),
        ]
        for method, url, kwargs in requests:
            r = http.request(method, url, **kwargs)
            assert r.status_code == 404, (method, url, r.text, bus_traffic)
            assert r.json()["error"] == "not_found"
            assert "no live" in r.json()["message"]


@pytest.mark.anyio
async def test_a_rank_that_never_answers_is_504_naming_it(
    gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)

    async def ignore(msg: Any) -> None:
        pass  # subscribed, never replies: the request cannot be a no-responders 404

    await nc.subscribe(f"runctl.{run_id}.0.cmd.*", cb=ignore)
    await nc.flush()
    await register_silent_rank(nats_url, run_id, "0")
    try:
        http = gateway(timeout=0.5)
        base = f"/runs/{run_id}/ranks/0"
        for r in (
            http.get(f"{base}/get", params={"fresh": "true"}),
            http.put(f"{base}/set/epochs", params={"value": "1"}),
            http.post(f"{base}/stop"),
        ):
            assert r.status_code == 504, r.text
            body = r.json()
            assert body["error"] == "timeout" and body["missing"] == ["0"]
            assert "rank '0'" in body["message"] and run_id in body["message"]
            assert r.headers["X-Runctl-Missing"] == "0"
    finally:
        await nc.drain()


STOPPABLE = """
    import os, time
    from pydantic import BaseModel
    from runctl.agent import control

    class S(BaseModel):
        lr: float = 0.1

    # slow heartbeat: a SIGSTOPped rank stays "alive" in the registry for the whole test
    ctl = control(S(), heartbeat=10.0).wait_ready()
    os.write(1, b"READY\\n")
    while not ctl.stop_requested:
        time.sleep(0.01)
    ctl.close()
"""


def test_a_stopped_process_is_504_alone_and_no_answer_among_others(
    gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        for rank in (0, 1):
            proc = spawn_python(
                textwrap.dedent(STOPPABLE),
                env={"RUNCTL_RUN": run_id, "RUNCTL_RANK": str(rank), "RUNCTL_NATS_URL": nats_url},
            )
            procs.append(proc)
            assert proc.stdout is not None
            assert any("READY" in line for line in proc.stdout), proc.communicate()
        procs[1].send_signal(signal.SIGSTOP)
        http = gateway(timeout=0.5)
        alone = http.put(f"/runs/{run_id}/ranks/1/set/lr", params={"value": "0.2"})
        assert alone.status_code == 504 and alone.json()["missing"] == ["1"]
        both = http.put(f"/runs/{run_id}/ranks/all/set/lr", params={"value": "0.3"})
        assert both.status_code == 207, both.text
        body = both.json()
        assert body["missing"] == ["1"] and body["acknowledged"] == ["0"]
        assert body["ranks"]["1"] == {"outcome": "no_answer"}
        assert body["ranks"]["0"]["outcome"] == "applied"
        assert both.headers["X-Runctl-Missing"] == "1"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.communicate()


def test_large_bodies_are_413_unread_and_not_echoed(
    gateway: GatewayFactory, agent: Control[Cfg], run_id: str
) -> None:
    http = gateway()
    url = f"/runs/{run_id}/ranks/0/set"
    big = b'{"epochs": "' + b"x" * (10 << 20) + b'"}'
    r = http.patch(url, content=big)
    assert r.status_code == 413
    assert len(r.content) < 1000 and b"xxxx" not in r.content
    assert r.json()["error"] == "too_large"

    def stream() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"epochs": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    r = http.patch(url, content=stream())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and b"yyyy" not in r.content
    # the connection is still usable afterwards
    assert http.get(f"/runs/{run_id}/ranks/0/get").status_code == 200
    # the limit bounds the command as it goes on the bus: this body's is ~115 bytes with
    # its envelope (path, at_step, texts, synced)
    small = gateway(max_body=160)
    assert small.patch(url, content=b'{"epochs": 5}').status_code == 200
    assert small.patch(url, json={"epochs": 6, "pad": "z" * 200}).status_code == 413
    assert agent.state.epochs == 5


def test_malformed_input_is_refused_without_echo(
    gateway: GatewayFactory, agent: Control[Cfg], run_id: str
) -> None:
    http = gateway()
    url = f"/runs/{run_id}/ranks/0/set"
    r = http.patch(url, content=b"{" + b"q" * 500_000)
    assert r.status_code == 422 and b"qqqq" not in r.content and len(r.content) < 1000
    assert "not valid JSON" in r.json()["message"]  # as FastAPI: 422, loc in the body
    assert r.json()["detail"][0]["loc"][0] == "body"
    r = http.patch(url, json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["message"]
    assert http.patch(url, content=b"").status_code == 400
    # FastAPI's own query validation: inputs are summarised, not echoed
    r = http.post(f"/runs/{run_id}/ranks/all/stop", params={"grace": "g" * 50_000})
    assert r.status_code == 422 and len(r.content) < 1000
    assert r.json()["detail"][0]["loc"] == ["query", "grace"]
    r = http.post(f"/runs/{run_id}/ranks/all/stop", params={"mode": "explode"})
    assert r.status_code == 422
    r = http.put(f"{url}/epochs")  # value missing
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "value"]
    r = http.put(f"{url}/epochs", params={"value": "1", "sync": "true"})
    assert r.status_code == 400 and "rank 'all'" in r.json()["message"]
    assert agent.version == 0 and not agent.stop_requested


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gateway_starts_without_nats_answers_503_then_connects(tmp_path: Any) -> None:
    port = _free_port()
    url = f"nats://127.0.0.1:{port}"
    with (
        GatewayThread(Settings(nats_url=url, port=0)) as gw,
        httpx.Client(base_url=gw.url, timeout=10) as http,
    ):
        r = http.get("/runs")
        assert r.status_code == 503 and r.json()["error"] == "unavailable"
        assert http.get("/runs/x/ranks/0/get").status_code == 503
        with NatsServer(port=port, store_dir=tmp_path / "nats"):
            wait_for(lambda: http.get("/runs").status_code == 200, timeout=20)
            assert http.get("/runs").json() == {"runs": []}


def test_bearer_tokens_guard_the_api_but_not_the_page(
    gateway: GatewayFactory, agent: Control[Cfg], run_id: str
) -> None:
    read, admin = "r" * 20, "a" * 20
    http = gateway(tokens=parse_env(f"read:{read},admin:{admin}"))
    url = f"/runs/{run_id}/ranks/0"
    assert http.get(f"{url}/get").status_code == 401
    assert http.get(f"{url}/get", headers={"Authorization": f"Bearer {read}"}).status_code == 200
    denied = http.put(
        f"{url}/set/epochs", params={"value": "4"}, headers={"Authorization": f"Bearer {read}"}
    )
    assert denied.status_code == 403
    ok = http.put(
        f"{url}/set/epochs", params={"value": "4"}, headers={"Authorization": f"Bearer {admin}"}
    )
    assert ok.status_code == 200 and agent.state.epochs == 4
    assert http.get("/").status_code == 200


def test_every_error_body_has_one_shape(gateway: GatewayFactory, run_id: str) -> None:
    """Route errors, FastAPI's validation, unknown routes, the step-log routes and the
    token check all answer ``{"error", "message", "detail"}``."""
    admin = "a" * 20
    http = gateway()
    guarded = gateway(tokens=parse_env(f"admin:{admin}"))
    answers = [
        (http.get(f"/runs/{run_id}-nope"), 404, "not_found"),
        (http.get("/no/such/route"), 404, "not_found"),
        (http.post("/runs"), 405, "method_not_allowed"),
        (http.put(f"/runs/{run_id}/ranks/0/set/x"), 422, "bad_request"),
        (http.get(f"/runs/{run_id}/steps", params={"limit": "many"}), 422, "bad_request"),
        (http.get(f"/runs/{run_id}/steps", params={"status": "bogus"}), 400, "bad_request"),
        (http.delete(f"/runs/{run_id}/steps"), 400, "bad_request"),
        (http.delete(f"/runs/{run_id}/steps/a:"), 400, "bad_request"),
        (guarded.get("/runs"), 401, "unauthorized"),
    ]
    for r, status, code in answers:
        what = (r.request.method, r.request.url.path, r.status_code, r.text[:200])
        assert r.status_code == status, what
        body = r.json()
        assert set(body) == {"error", "message", "detail"}, what
        assert body["error"] == code and isinstance(body["message"], str), what
    assert answers[-1][0].headers["www-authenticate"].startswith("Bearer")
    # FastAPI's own list stays in detail, each loc saying where the input was
    assert answers[4][0].json()["detail"][0]["loc"] == ["query", "limit"]


@pytest.mark.parametrize(
    ("http_version", "headers", "has_body"),
    [
        ("1.1", [], False),
        ("1.1", [(b"content-length", b"0")], False),
        ("1.1", [(b"content-length", b" 0 ")], False),
        ("1.1", [(b"content-length", b"00")], True),  # read, to be safe
        ("1.1", [(b"content-length", b"12")], True),
        ("1.1", [(b"transfer-encoding", b"chunked")], True),
        ("1.0", [], False),
        ("2", [], True),  # HTTP/2 sends a body without either header
        ("3", [(b"content-length", b"0")], True),
    ],
)
def test_a_request_declares_its_body_or_has_none(
    http_version: str, headers: list[tuple[bytes, bytes]], has_body: bool
) -> None:
    scope = {"type": "http", "http_version": http_version, "headers": headers}
    assert declares_body(scope) is has_body
