"""Gateway bearer tokens (gateway/auth.py): roles read < write < admin, 401 and 403, no
token in any log or answer, no open gateway beyond loopback; and the whole chain over the
secured nats.conf (agent login, operator login for the gateway, tokens for HTTP)."""

from __future__ import annotations

import hmac
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_for
from pydantic import BaseModel
from test_nats_permissions import start_secured

from runctl.agent import Control, control
from runctl.bus.credentials import ensure_credentials
from runctl.gateway.app import create_app
from runctl.gateway.auth import (
    InsecureBind,
    TokenError,
    TokenTable,
    check_bind,
    generate_tokens_file,
    load_tokens,
    parse_env,
    parse_file,
    required_role,
)
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
READ = "read-token-0123456789abcdef"
WRITE = "write-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"
TOKENS = f"read:{READ},write:{WRITE},admin:{ADMIN}"


class Opt(BaseModel):
    lr: float = 0.1


class Cfg(BaseModel):
    epochs: int = 3
    opt: Opt = Opt()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the token table ----------------------------------------------------------------------


def test_tokens_from_env_and_file_give_each_its_role(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\nadmin {ADMIN}\nread:{READ}   # trailing comment\n")
    path.chmod(0o600)
    table = load_tokens(path, env={"RUNCTL_GATEWAY_TOKENS": f" write:{WRITE} , read:{READ}"})
    assert table.role_of(READ) == "read"
    assert table.role_of(WRITE) == "write"
    assert table.role_of(ADMIN) == "admin"
    assert table.role_of(ADMIN[:-1]) is None and table.role_of(ADMIN + "x") is None
    assert table.role_of("") is None and table.role_of(None) is None
    assert not load_tokens(None, env={})  # nothing configured: authentication is off


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"root:{ADMIN}", "unknown role 'root'"),
        ("admin:short-secret", "at least 16 characters"),
        (f"admin{ADMIN}", "expected role:token"),
        (f"admin:{ADMIN},read:{ADMIN}", "two roles"),
    ],
)
def test_bad_token_settings_are_refused_without_echoing_the_token(value: str, problem: str) -> None:
    with pytest.raises(TokenError, match=problem) as info:
        parse_env(value)
    assert ADMIN not in str(info.value) and "short-secret" not in str(info.value)


def test_a_bad_tokens_file_names_the_line_not_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"admin {ADMIN}\n\nsuperuser {WRITE}\n")
    with pytest.raises(TokenError, match=r"line 3: unknown role 'superuser'") as info:
        parse_file(path)
    assert WRITE not in str(info.value)
    with pytest.raises(TokenError, match="No such file"):
        parse_file(tmp_path / "missing")


def test_the_table_never_shows_tokens_or_digests() -> None:
    table = parse_env(TOKENS)
    assert repr(table) == str(table) == "TokenTable(read=1, write=1, admin=1)"


def test_a_token_is_compared_with_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken does not say which entry (if any) matched."""
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    table = parse_env(TOKENS)
    for presented in (READ, ADMIN, "not-a-token-at-all-xxxxxxxx", "x"):
        calls.clear()
        table.role_of(presented)
        assert calls == [64, 64, 64]  # all three, always SHA-256 digests of equal length


def test_generated_tokens_file_is_private_and_loads(tmp_path: Path) -> None:
    path = generate_tokens_file(tmp_path / "sub" / "gateway-tokens")
    assert path.stat().st_mode & 0o777 == 0o600
    table = parse_file(path)
    assert repr(table) == "TokenTable(read=1, write=1, admin=1)"
    before = path.read_text()
    generate_tokens_file(path)  # never overwritten
    assert path.read_text() == before


# --- which role each route needs -----------------------------------------------------------

#: every route of the app and the role it needs: a new route fails this test until added
EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/runs"): "read",
    ("GET", "/runs/{run}"): "read",
    ("GET", "/runs/{run}/ranks/{rank}/get"): "read",
    ("GET", "/runs/{run}/ranks/{rank}/get/{path}"): "read",
    ("GET", "/runs/{run}/ranks/{rank}/get_from_path"): "read",
    ("GET", "/runs/{run}/ranks/{rank}/schema"): "read",
    ("PUT", "/runs/{run}/ranks/{rank}/set/{path}"): "write",
    ("PATCH", "/runs/{run}/ranks/{rank}/set"): "write",
    ("PATCH", "/runs/{run}/ranks/{rank}/set/{path}"): "write",
    ("DELETE", "/runs/{run}/ranks/{rank}/reset"): "write",
    ("POST", "/runs/{run}/ranks/{rank}/stop"): "admin",
    ("GET", "/runs/{run}/steps"): "read",
    ("DELETE", "/runs/{run}/steps/{step}"): "admin",
    ("DELETE", "/runs/{run}/steps"): "admin",
    ("GET", "/runs/{run}/artifacts"): "read",
    ("GET", "/runs/{run}/series"): "read",
    ("GET", "/runs/{run}/live"): "read",
    ("GET", "/live"): "read",
    ("GET", "/whoami"): "read",
    ("GET", "/runs/{run}/openapi.json"): "read",
    ("GET", "/runs/{run}/history"): "read",
    ("DELETE", "/runs/{run}/history"): "admin",
    ("POST", "/runs/{run}/undo"): "write",
    ("POST", "/runs/{run}/undo/{change}"): "write",
    ("GET", "/runs/{run}/schedules"): "read",
    ("POST", "/runs/{run}/schedules/{change}/cancel"): "write",
    ("GET", "/get"): "read",
    ("GET", "/get/{path}"): "read",
    ("GET", "/get_from_path"): "read",
    ("PUT", "/set/{path}"): "write",
    ("PATCH", "/set"): "write",
    ("PATCH", "/set/{path}"): "write",
    ("DELETE", "/reset"): "write",
}
_BELOW = {"write": READ, "admin": WRITE}


def test_every_route_needs_the_documented_role() -> None:
    app = create_app(Settings(tokens=parse_env(TOKENS)))
    seen = {
        (method.upper(), path): required_role(method, path)
        for path, ops in app.openapi()["paths"].items()
        for method in ops
    }
    assert seen == EXPECTED


def test_every_route_refuses_no_token_and_a_lower_role(http: httpx.Client) -> None:
    """At run time, on the real app: the guard covers every route, and with the role the
    table says (a token one role lower is refused before the route runs)."""
    for (method, template), role in EXPECTED.items():
        url = template.format(run="r", rank="0", path="epochs", step="s", change="c0ffee")
        params = {"value": "1", "path": "epochs"}
        assert http.request(method, url, params=params).status_code == 401, (method, url)
        if role in _BELOW:
            r = http.request(method, url, params=params, headers=bearer(_BELOW[role]))
            assert r.status_code == 403, (method, url)
            assert f"needs the {role} role" in r.text


def test_unknown_routes_are_denied_by_default() -> None:
    assert required_role("DELETE", "/runs/{run}/ranks/{rank}/something") == "admin"
    assert required_role("POST", "/runs/{run}/whatever") == "write"
    assert required_role("POST", "/runs/{run}/steps/forget") == "admin"
    # a run or a field named like a route word does not change the role of a template
    assert required_role("PUT", "/runs/{run}/ranks/{rank}/set/{path}") == "write"


# --- binding --------------------------------------------------------------------------------


def test_no_open_gateway_beyond_loopback() -> None:
    none, some = TokenTable(), parse_env(TOKENS)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        check_bind(host, none)
    for host in ("0.0.0.0", "::", "", "10.1.2.3", "gpu-node-7", "example.org"):
        with pytest.raises(InsecureBind, match="without authentication"):
            check_bind(host, none)
        with pytest.raises(InsecureBind, match="without authentication"):
            check_bind(host, none, tls=True)  # HTTPS does not make an open gateway safe
        # tokens beyond loopback travel encrypted: HTTPS here, or a proxy's TLS in front
        with pytest.raises(InsecureBind, match="bearer tokens over plain HTTP"):
            check_bind(host, some)
        check_bind(host, some, tls=True)
        check_bind(host, some, allow_plain=True)
    check_bind("127.0.0.1", some)  # loopback never leaves the machine


def test_cli_refuses_an_open_gateway_on_all_interfaces() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNCTL_GATEWAY_TOKENS"}
    done = subprocess.run(
        [sys.executable, "-m", "runctl", "gateway", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stderr
    assert "RUNCTL_GATEWAY_TOKENS" in done.stderr  # says how to fix it


# --- over HTTP --------------------------------------------------------------------------------


@pytest.fixture
def ctl(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=0.2) as handle:
        handle.wait_ready()
        yield handle


@pytest.fixture
def http(nats_url: str) -> Iterator[httpx.Client]:
    settings = Settings(nats_url=nats_url, port=0, tokens=parse_env(TOKENS))
    with (
        GatewayThread(settings, log_level="debug", access_log=True) as thread,
        httpx.Client(base_url=thread.url, timeout=20) as client,
    ):
        yield client


def test_401_without_a_token_or_with_an_unknown_one(
    http: httpx.Client, ctl: Control[Cfg], run_id: str
) -> None:
    for headers in (
        {},
        bearer("not-a-configured-token-xxxx"),
        {"Authorization": READ},
        {"Authorization": f"Basic {READ}"},
    ):
        r = http.get(f"/runs/{run_id}/ranks/0/get", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = http.put(f"/runs/{run_id}/ranks/0/set/epochs", params={"value": "9"})
    assert r.status_code == 401 and ctl.state.epochs == 3


def test_a_read_token_cannot_set_or_stop(
    http: httpx.Client, ctl: Control[Cfg], run_id: str
) -> None:
    r = http.get(f"/runs/{run_id}/ranks/0/get", headers=bearer(READ))
    assert r.status_code == 200 and r.json()["epochs"] == 3
    base = f"/runs/{run_id}/ranks/0"
    denied = [
        http.put(f"{base}/set/epochs", params={"value": "9"}, headers=bearer(READ)),
        http.patch(f"{base}/set", json={"epochs": 9}, headers=bearer(READ)),
        http.delete(f"{base}/reset", headers=bearer(READ)),
        http.post(f"{base}/stop", headers=bearer(READ)),
        http.put(
            f"/runs/{run_id}/ranks/all/set/epochs",
            params={"value": "9", "sync": "true"},
            headers=bearer(READ),
        ),
    ]
    assert [r.status_code for r in denied] == [403] * 5
    assert "needs the write role" in denied[0].text and "needs the admin role" in denied[3].text
    assert ctl.state.epochs == 3 and ctl.version == 0 and not ctl.stop_requested


def test_write_changes_but_only_admin_stops_and_forgets(
    http: httpx.Client, ctl: Control[Cfg], run_id: str
) -> None:
    base = f"/runs/{run_id}/ranks/0"
    r = http.put(f"{base}/set/opt.lr", params={"value": "0.5"}, headers=bearer(WRITE))
    assert r.status_code == 200 and ctl.state.opt.lr == 0.5
    assert http.delete(f"{base}/reset", headers=bearer(WRITE)).status_code == 200
    assert ctl.state.opt.lr == 0.1
    assert http.post(f"{base}/stop", headers=bearer(WRITE)).status_code == 403
    assert http.delete(f"/runs/{run_id}/steps", headers=bearer(WRITE)).status_code == 403
    assert not ctl.stop_requested
    assert http.post(f"{base}/stop", params={"reason": "x"}, headers=bearer(ADMIN)).is_success
    assert ctl.stop_requested
    assert (
        http.put(f"{base}/set/epochs", params={"value": "4"}, headers=bearer(ADMIN)).status_code
        == 200
    )  # admin may do what write may


def test_tokens_never_appear_in_logs_or_answers(
    http: httpx.Client,
    ctl: Control[Cfg],
    run_id: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "wrong-token-0123456789abcdefgh"
    answers = [
        http.get(f"/runs/{run_id}/ranks/0/get", headers=bearer(wrong)),
        http.post(f"/runs/{run_id}/ranks/0/stop", headers=bearer(READ)),
        http.get(f"/runs/{run_id}/ranks/0/get", headers=bearer(READ)),
        http.get("/nope", headers=bearer(WRITE)),
    ]
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    assert "GET /runs/" in logged  # the access log is on and was captured
    for token in (READ, WRITE, ADMIN, wrong):
        assert token not in logged
        for answer in answers:
            assert token not in answer.text and token not in str(answer.headers)


def test_an_open_gateway_on_loopback_needs_no_token(
    nats_url: str, ctl: Control[Cfg], run_id: str
) -> None:
    with (
        GatewayThread(Settings(nats_url=nats_url, port=0)) as thread,
        httpx.Client(base_url=thread.url, timeout=20) as client,
    ):
        r = client.put(f"/runs/{run_id}/ranks/0/set/epochs", params={"value": "5"})
        assert r.status_code == 200 and ctl.state.epochs == 5


# --- the whole chain over the secured nats.conf -------------------------------------------------


@pytest.fixture
def secured_gateway(
    tmp_path: Path, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Callable[..., httpx.Response], Control[Cfg]]]:
    for var in ("RUNCTL_NATS_USER", "RUNCTL_NATS_PASSWORD", "RUNCTL_NATS_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RUNCTL_NATS_CREDENTIALS_DIR", str(tmp_path / "none"))
    creds = ensure_credentials(tmp_path / "credentials", env={})
    server = start_secured(tmp_path / "nats", creds)
    base = f"127.0.0.1:{server.port}"
    agent, operator = creds.auth("agent"), creds.auth("operator")
    try:
        with control(
            Cfg(),
            run=run_id,
            rank=0,
            heartbeat=0.2,
            url=f"nats://{agent['user']}:{agent['password']}@{base}",
        ) as handle:
            handle.wait_ready()
            settings = Settings(
                nats_url=f"nats://{operator['user']}:{operator['password']}@{base}",
                port=0,
                tokens=parse_env(TOKENS),
            )
            with (
                GatewayThread(settings) as thread,
                httpx.Client(base_url=thread.url, timeout=20) as client,
            ):

                def call(method: str, url: str, token: str, **kw: Any) -> httpx.Response:
                    return client.request(method, url, headers=bearer(token), **kw)

                yield call, handle
    finally:
        server.stop()


def test_gateway_over_secured_nats(
    secured_gateway: tuple[Callable[..., httpx.Response], Control[Cfg]], run_id: str
) -> None:
    call, ctl = secured_gateway
    base = f"/runs/{run_id}/ranks/0"
    assert call("GET", "/runs", READ).status_code == 200
    assert call("GET", f"{base}/get", READ).json()["epochs"] == 3
    assert call("PUT", f"{base}/set/epochs", WRITE, params={"value": "8"}).status_code == 200
    assert ctl.state.epochs == 8
    assert call("GET", f"/runs/{run_id}/steps", READ).status_code == 200

    # the console's curves: the agent's login created the stream, the operator's reads it
    def curve() -> list[int]:
        series = call("GET", f"/runs/{run_id}/series", READ).json()
        assert series["available"], series
        return list(series["ranks"].get("0", {}).get("fields", {}).get("epochs", []))

    wait_for(lambda: curve()[-1:] == [8], timeout=10)
    assert curve()[0] == 3
    assert call("POST", f"/runs/{run_id}/ranks/all/stop", ADMIN).status_code == 200
    assert ctl.stop_requested
