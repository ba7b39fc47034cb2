"""The gateway's fast path (plain reads and ``?value=`` sets answered before FastAPI's
router) answers exactly as the routes do: the same status, body and headers for good and
bad requests, with and without tokens; and it takes only the plain shapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import GatewayFactory
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.gateway.app import create_app
from runctl.gateway.auth import parse_env
from runctl.gateway.hot import HotRoutes, _match
from runctl.gateway.settings import Settings, fast_path_enabled


class Bar(BaseModel):
    foo: str = "bar"
    baz: int = 0


class State(BaseModel):
    name: str = "x"
    n: int = 0
    lr: float = Field(0.1, gt=0)
    tags: list[str] = ["a"]
    bar: Bar = Bar()


#: values that differ between two equal requests (a new version, a new change id, time)
VOLATILE = {"version", "change_id", "changed", "age", "heartbeat", "ts", "uptime", "started"}
VOLATILE_HEADERS = {"x-runctl-version", "x-runctl-change", "x-runctl-changed", "x-runctl-age"}
TOKENS = "reader=read:rtok-0123456789abcdef0123456789,writer=write:wtok-0123456789abcdef0123456789"


@pytest.fixture
def ranks(nats_url: str, run_id: str) -> Iterator[list[Control[State]]]:
    with (
        control(State(), run=run_id, rank=0, url=nats_url) as zero,
        control(State(), run=run_id, rank=1, url=nats_url) as one,
    ):
        zero.wait_ready()
        one.wait_ready()
        yield [zero, one]


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


def _answer(response: httpx.Response) -> tuple[int, str, Any, dict[str, str]]:
    try:
        body: Any = _normal(response.json())
    except ValueError:
        body = response.text
    headers = {
        k: v
        for k, v in response.headers.items()
        if k.startswith("x-runctl-") and k not in VOLATILE_HEADERS
    }
    names = sorted(k for k in response.headers if k.startswith("x-runctl-"))
    return (
        response.status_code,
        response.headers.get("content-type", ""),
        body,
        headers | {"names": ",".join(names)},
    )


def _requests(run: str) -> list[tuple[str, str]]:
    r = f"/runs/{run}/ranks"
    return [
        ("GET", "/get"),
        ("GET", "/get/bar/foo"),
        ("GET", "/get/bar.foo"),
        ("GET", "/get/tags/0"),
        ("GET", "/get/tags/5"),  # out of range: 404
        ("GET", "/get/tags/+1"),  # not an index: 400
        ("GET", "/get/nope"),
        ("PUT", "/set/n?value=5"),
        ("PUT", "/set/n?value=abc"),  # 422 with pydantic's list
        ("PUT", "/set/lr?value=-1"),  # a constraint: 422
        ("PUT", "/set/lr?value=NaN"),
        ("PUT", "/set/name?value=%5B1%5D"),  # a str field keeps "[1]" as text
        ("PUT", "/set/name?value="),  # an empty value
        ("PUT", "/set/nope?value=1"),  # 404
        ("PUT", "/set/bar?value=1"),  # a sub-model set to a number: 422
        ("PUT", "/set/tags/0?value=b"),
        ("PUT", "/set/n?value=5&value=6"),  # not plain: FastAPI on both
        ("PUT", "/set/n"),  # no value: FastAPI's 422 "missing" on both
        ("GET", f"{r}/0/get"),
        ("GET", f"{r}/1/get/bar"),
        ("GET", f"{r}/all/get"),
        ("GET", f"{r}/7/get"),  # a rank nobody serves: 404
        ("GET", "/runs/nosuchrun/ranks/0/get"),
        ("GET", "/runs/a.b/ranks/0/get"),  # not a run id: 400
        ("GET", f"{r}/-1/get"),
        ("PUT", f"{r}/all/set/n?value=9"),
        ("PUT", f"{r}/1/set/n?value=x"),
        ("PUT", f"{r}/0/set/bar.baz?value=3"),
        ("PUT", f"{r}/9/set/n?value=3"),
    ]


def test_the_fast_path_answers_as_the_routes(
    ranks: list[Control[State]], gateway: GatewayFactory, run_id: str
) -> None:
    fast = gateway(default_run=run_id, fast_path=True)
    slow = gateway(default_run=run_id, fast_path=False)
    for method, url in _requests(run_id):
        # the slow one first: a set then finds the same state on both (volatile fields aside)
        expected = _answer(slow.request(method, url))
        got = _answer(fast.request(method, url))
        assert got == expected, f"{method} {url}"
    assert ranks[0].state.n == 9 and ranks[1].state.n == 9
    assert ranks[0].state.bar.baz == 3 and ranks[0].state.name == ""


def test_the_fast_path_checks_tokens_as_the_routes(
    ranks: list[Control[State]], gateway: GatewayFactory, run_id: str
) -> None:
    tokens = parse_env(TOKENS)
    fast = gateway(default_run=run_id, tokens=tokens, fast_path=True)
    slow = gateway(default_run=run_id, tokens=tokens, fast_path=False)
    reader = {"authorization": "Bearer rtok-0123456789abcdef0123456789"}
    writer = {"authorization": "Bearer wtok-0123456789abcdef0123456789"}
    cases = [
        ("GET", "/get", {}),  # 401
        ("GET", "/get", {"authorization": "Bearer wrong-token-0123456789"}),  # 401
        ("GET", "/get", reader),
        ("PUT", "/set/n?value=4", reader),  # 403
        ("PUT", "/set/n?value=4", writer),
        ("PUT", f"/runs/{run_id}/ranks/0/set/n?value=6", reader),
        ("PUT", f"/runs/{run_id}/ranks/0/set/n?value=6", writer),
        ("GET", f"/runs/{run_id}/ranks/0/get/n", {}),
        ("GET", f"/runs/{run_id}/ranks/0/get/n", reader),
    ]
    for method, url, headers in cases:
        expected = slow.request(method, url, headers=headers)
        got = fast.request(method, url, headers=headers)
        assert _answer(got) == _answer(expected), f"{method} {url} {headers}"
        assert got.headers.get("www-authenticate") == expected.headers.get("www-authenticate")
    assert ranks[0].state.n == 6 and ranks[1].state.n == 4
    history = slow.get(f"/runs/{run_id}/history", headers=writer)
    assert history.status_code == 200
    # the fast path's changes are by the token's holder, as the routes'
    by = {entry["by"]["name"] for entry in history.json()["changes"]}
    assert by == {"writer"}


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "taken"),
    [
        ("GET", "/get", b"", [], True),
        ("GET", "/get/a/b.c", b"", [], True),
        ("PUT", "/set/lr", b"value=0.1", [], True),
        ("PUT", "/runs/r1/ranks/all/set/a.b", b"value=%5B1%5D", [], True),
        ("GET", "/runs/r1/ranks/0/get", b"", [], True),
        ("GET", "/get", b"fresh=true", [], False),
        ("PUT", "/set/lr", b"value=1&sync=true", [], False),
        ("PUT", "/set/lr", b"", [], False),
        ("PUT", "/set/lr", b"value=1", [(b"content-length", b"3")], False),
        ("PUT", "/set/lr", b"value=1", [(b"transfer-encoding", b"chunked")], False),
        ("PUT", "/set/lr", b"value=1", [(b"content-length", b"0")], True),
        ("POST", "/set/lr", b"value=1", [], False),
        ("PATCH", "/set/lr", b"", [], False),
        ("GET", "/get/", b"", [], False),
        ("GET", "/get/caf\u00e9", b"", [], False),
        ("GET", "/runs/r 1/ranks/0/get", b"", [], False),
        ("PUT", "/runs/r1/ranks/0/stop", b"", [], False),
        ("GET", "/getx", b"", [], False),
    ],
)
def test_only_plain_requests_take_the_fast_path(
    method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], taken: bool
) -> None:
    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    assert (_match({**scope, "headers": headers}) is not None) is taken
    # behind a prefix the router strips, never
    assert _match({**scope, "headers": headers, "root_path": "/ctl"}) is None


def test_the_fast_path_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def hot(app: Any) -> bool:
        return any(m.cls is HotRoutes for m in app.user_middleware)

    assert hot(create_app(Settings()))
    assert not hot(create_app(Settings(fast_path=False)))
    monkeypatch.setenv("RUNCTL_GATEWAY_FAST_PATH", "off")
    assert not fast_path_enabled() and not hot(create_app(Settings()))
    assert fast_path_enabled({"RUNCTL_GATEWAY_FAST_PATH": "on"})
