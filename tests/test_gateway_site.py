"""A tokenless gateway on loopback against a hostile web page: cross-site requests and DNS
rebinding. Real uvicorn socket, real nats-server, a real rank process.

A browser lets any page send ``POST`` with ``Content-Type: text/plain`` to any origin
without asking first (a "simple" request); DNS rebinding points a page's own name at
127.0.0.1 so its requests carry that name in ``Host``. The gateway answers only the Host
names it serves, refuses state-changing requests from another origin, and takes only JSON
on its JSON routes: plain ``curl`` (no ``Origin``) and the gateway's own pages keep working.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import GatewayFactory
from rankkit import ProgramRank
from starlette.types import Receive, Scope, Send

from runctl.bus.errors import BadHost
from runctl.gateway.site import SiteGuard

MODELS = """
from pydantic import BaseModel

class Cfg(BaseModel):
    lr: float = 0.1
"""


@pytest.fixture
def rank(nats_url: str, run_id: str) -> Iterator[ProgramRank]:
    with ProgramRank(MODELS, "Cfg()", run=run_id, url=nats_url) as rank:
        yield rank


def unchanged(rank: ProgramRank) -> None:
    rank.do("assert not ctl.stop_requested and state.lr == 0.1, (ctl.stop_requested, state)")


def test_a_cross_site_stop_is_refused(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http = gateway()
    # the request of the report: what a page on any origin can send without a preflight
    r = http.post(
        f"/runs/{run_id}/ranks/all/stop",
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
        content=b"x",
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "cross_site"
    for origin in (
        "http://evil.example",
        "null",  # sandboxed frames, file:// pages
        "http://127.0.0.1.evil.example",
        f"http://localhost:{urlsplit(str(http.base_url)).port}.evil.example",
        "http://127.0.0.1:1",  # another local port: another origin
    ):
        for method, path in (
            ("POST", f"/runs/{run_id}/ranks/all/stop"),
            ("PUT", f"/runs/{run_id}/ranks/0/set/lr?value=0.5"),
            ("PATCH", f"/runs/{run_id}/ranks/0/set"),
            ("DELETE", f"/runs/{run_id}/ranks/0/reset"),
            ("PUT", "/set/lr?value=0.5"),
        ):
            r = http.request(method, path, headers={"Origin": origin}, json={"lr": 0.5})
            assert r.status_code == 403, (origin, method, path, r.text)
    # a browser that sends no Origin still says where the request came from
    r = http.post(f"/runs/{run_id}/ranks/all/stop", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403, r.text
    unchanged(rank)


def test_dns_rebinding_is_refused_by_host(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http = gateway()
    port = urlsplit(str(http.base_url)).port
    for host in (
        f"evil.example:{port}",
        "evil.example",
        f"127.0.0.1.evil.example:{port}",
        f"localhost.evil.example:{port}",
        f"127.0.0.1@evil.example:{port}",
        "",
    ):
        for method, path in (
            ("GET", "/runs"),
            ("GET", f"/runs/{run_id}/ranks/0/get"),
            ("GET", "/"),
            ("POST", f"/runs/{run_id}/ranks/all/stop"),
        ):
            r = http.request(method, path, headers={"Host": host})
            assert r.status_code == 400, (host, method, r.text)
            assert r.json()["error"] == "bad_host", r.text
            assert "evil" not in r.headers.get("location", "")
    unchanged(rank)


def test_json_routes_take_only_json(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http = gateway()
    paths = (f"/runs/{run_id}/ranks/0/set", f"/runs/{run_id}/ranks/all/set", "/set")
    for content_type in (
        "text/plain",
        "text/plain;charset=UTF-8",
        "multipart/form-data; boundary=x",
        "application/xml",
    ):
        for path in paths:
            r = http.patch(path, headers={"Content-Type": content_type}, content=b'{"lr": 0.5}')
            assert r.status_code == 415, (content_type, path, r.text)
            assert r.json()["error"] == "unsupported_media_type"
            assert "application/json" in r.json()["message"]
    for content_type in (*_FORMS, "application/x-www-form-urlencoded"):
        for method, path in (
            ("POST", f"/runs/{run_id}/ranks/all/stop"),
            ("PUT", f"/runs/{run_id}/ranks/0/set/lr?value=0.5"),
            ("DELETE", f"/runs/{run_id}/ranks/0/reset"),
        ):
            r = http.request(method, path, headers={"Content-Type": content_type}, content=b"a=b")
            assert r.status_code == 415, (content_type, method, r.text)
    # what a browser form can send as urlencoded is never JSON: the route refuses it
    for path in paths[:2]:
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        r = http.patch(path, headers=form, content=b"lr=0.5&%7B%22lr%22%3A0.5%7D=")
        assert r.status_code == 422, (path, r.text)  # FastAPI's (and Freak's) "not JSON"
        assert r.json()["detail"][0]["type"] == "json_invalid", r.text
    unchanged(rank)


_FORMS = ("text/plain", "multipart/form-data; boundary=x")


def test_curl_and_same_origin_pages_keep_working(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http = gateway()
    base = str(http.base_url).rstrip("/")
    port = urlsplit(base).port
    # curl: no Origin; JSON with or without its Content-Type, and curl -d's form type
    assert http.put(f"/runs/{run_id}/ranks/0/set/lr", params={"value": "0.2"}).status_code == 200
    r = http.patch(f"/runs/{run_id}/ranks/0/set", content=b'{"lr": 0.3}')
    assert r.status_code == 200, r.text
    r = http.patch(
        f"/runs/{run_id}/ranks/0/set",
        content=b'{"lr": 0.35}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    r = http.patch(
        f"/runs/{run_id}/ranks/0/set",
        content=b'{"lr": 0.4}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text
    # the gateway's own page, under each loopback name it may be opened with
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        r = http.patch(
            f"/runs/{run_id}/ranks/0/set",
            json={"lr": 0.25},
            headers={
                "Host": host,
                "Origin": f"http://{host}",
                "Sec-Fetch-Site": "same-origin",
            },
        )
        assert r.status_code == 200, (host, r.text)
        assert http.get("/", headers={"Host": host}).status_code == 200
    r = http.post(
        f"/runs/{run_id}/ranks/0/stop", headers={"Origin": base, "Sec-Fetch-Site": "same-origin"}
    )
    assert r.status_code == 200, r.text
    rank.do("assert ctl.stop_requested and state.lr == 0.25")


def test_allowed_hosts_and_origins_are_configurable(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http: httpx.Client = gateway(
        allowed_hosts=("runctl.lab.example",),
        allowed_origins=("http://console.lab.example:3000",),
    )
    r = http.get("/runs", headers={"Host": "runctl.lab.example:4444"})
    assert r.status_code == 200, r.text
    r = http.get("/runs", headers={"Host": "other.lab.example"})
    assert r.status_code == 400, r.text
    r = http.patch(
        f"/runs/{run_id}/ranks/0/set",
        json={"lr": 0.3},
        headers={"Origin": "http://console.lab.example:3000"},
    )
    assert r.status_code == 200, r.text
    r = http.patch(
        f"/runs/{run_id}/ranks/0/set",
        json={"lr": 0.4},
        headers={"Origin": "http://console.lab.example:3001"},
    )
    assert r.status_code == 403, r.text
    rank.do("assert state.lr == 0.3")


def test_tokens_are_bearer_only(gateway: GatewayFactory, rank: ProgramRank, run_id: str) -> None:
    """A browser attaches cookies by itself; a bearer header it never adds on its own."""
    from runctl.gateway.auth import parse_env

    token = "a" * 32
    http = gateway(tokens=parse_env(f"admin:{token}"))
    r = http.post(
        f"/runs/{run_id}/ranks/all/stop", headers={"Cookie": f"token={token}; runctl={token}"}
    )
    assert r.status_code == 401, r.text
    r = http.post(
        f"/runs/{run_id}/ranks/all/stop",
        headers={"Authorization": f"Bearer {token}", "Origin": "http://evil.example"},
    )
    assert r.status_code == 403, r.text  # a stolen token is not a reason to trust a page
    unchanged(rank)


def test_a_host_verdict_is_remembered_and_the_memory_stays_bounded() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("only the checks run here")

    guard = SiteGuard(app, listen="127.0.0.1")

    def scope(host: str) -> Scope:
        return {"type": "http", "method": "GET", "headers": [(b"host", host.encode())]}

    for _ in range(2):  # the second time from memory: the same verdicts
        guard.check(scope("127.0.0.1:4444"))
        with pytest.raises(BadHost):
            guard.check(scope("evil.example:4444"))
    for i in range(500):  # anyone may send any Host: never remembered without bound
        with pytest.raises(BadHost):
            guard.check(scope(f"h{i}.example"))
    assert len(guard._hosts_seen) <= 64
    guard.check(scope("localhost:4444"))
