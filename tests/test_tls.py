"""TLS on the bus and the gateway, with real servers: certificates made by ``runctl up --tls``
(bus/tls.py), nats-server requiring TLS, agents and clients verifying it; the failures an
operator meets (wrong CA, expired certificate, plain TCP to a TLS port, a plain server when
TLS is configured) each end in one clear message, and no secret reaches a log."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import ROOT
from faultkit import free_port
from pydantic import BaseModel

from runctl.agent import control
from runctl.bus.client import Client, Result
from runctl.bus.connection import connect
from runctl.bus.credentials import Credentials, ensure_credentials
from runctl.bus.errors import BadRequest, SetupError, TlsError, Unavailable
from runctl.bus.server import NatsServer
from runctl.bus.tls import (
    CA_ENV,
    CERT_ENV,
    CERTIFICATE_REQUIRED,
    CLIENT_CERT_HINT,
    KEY_ENV,
    TlsFiles,
    _load_cert,
    _load_key,
    _pem_cert,
    _pem_key,
    ensure_tls,
    issue_certificate,
)
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

NATS_CONF = ROOT / "nats.conf"


class Cfg(BaseModel):
    lr: float = 0.1


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TLS and logins come from each test, never from the caller's environment."""
    for var in (
        CA_ENV,
        CERT_ENV,
        KEY_ENV,
        "RUNCTL_NATS_URL",
        "RUNCTL_NATS_USER",
        "RUNCTL_NATS_PASSWORD",
        "RUNCTL_NATS_TOKEN",
        "RUNCTL_NATS_CREDS",
        "RUNCTL_NATS_NKEY",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RUNCTL_NATS_CREDENTIALS_DIR", str(tmp_path / "no-credentials"))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return ensure_tls(tmp_path_factory.mktemp("tls") / "tls", ["node1.example", "10.9.8.7"])


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return ensure_credentials(tmp_path_factory.mktemp("creds") / "credentials", env={})


def start(
    store: Path,
    creds: Credentials,
    tls: TlsFiles | None,
    *,
    verify_clients: bool = False,
    trace: bool = False,
) -> NatsServer:
    """runctl's nats.conf (passwords required), TLS as given, no monitoring port."""
    args = ("-m", "0", *(("-V",) if trace else ()))
    server = NatsServer(
        config_file=NATS_CONF,
        store_dir=store,
        extra_args=args,
        tls=tls,
        tls_verify_clients=verify_clients,
    )
    with pytest.MonkeyPatch.context() as mp:  # the passwords reach only the server process
        for key, value in creds.server_env().items():
            mp.setenv(key, value)
        return server.start()


@pytest.fixture(scope="module")
def secured(
    tmp_path_factory: pytest.TempPathFactory, creds: Credentials, tls: TlsFiles
) -> Iterator[NatsServer]:
    server = start(tmp_path_factory.mktemp("nats-tls"), creds, tls)
    yield server
    server.stop()


def secrets_of(creds: Credentials, tls: TlsFiles) -> list[str]:
    """What must never appear in a log: every password and every private key."""
    keys = [tls.ca_key, tls.server_key, tls.client_key]
    body = [p.read_text().splitlines()[1] for p in keys]  # a line of each key's base64
    return [*creds.passwords.values(), *body, "PRIVATE KEY"]


def login_env(creds: Credentials, role: str = "operator") -> dict[str, str]:
    return creds.client_env(role)  # type: ignore[arg-type]


async def connect_error(url: str) -> TlsError:
    """The TlsError connecting to ``url`` raises (the test fails if it connects)."""
    with pytest.raises(TlsError) as caught:
        await connect(url)
    return caught.value


# --- certificates --------------------------------------------------------------------------


def test_certificates_are_private_and_name_the_hosts(tmp_path: Path) -> None:
    files = ensure_tls(tmp_path / "tls", ["Node1.Example", "10.9.8.7", "fd00::7"])
    assert files.created
    assert os.stat(files.dir).st_mode & 0o777 == 0o700
    written = sorted(p.name for p in files.dir.iterdir())
    assert written == [
        "ca-key.pem",
        "ca.pem",
        "client-key.pem",
        "client.pem",
        "server-key.pem",
        "server.pem",
    ]
    for path in files.dir.iterdir():
        assert os.stat(path).st_mode & 0o777 == 0o600, path
    names = files.names()
    for name in ("node1.example", "10.9.8.7", "fd00::7", "localhost", "127.0.0.1", "::1"):
        assert name in names
    ca_before = files.ca.read_bytes()
    server_before = files.server_cert.read_bytes()
    again = ensure_tls(files.dir, ["node1.example"])
    assert not again.created and files.server_cert.read_bytes() == server_before
    # a new name: a new server certificate from the same CA (clients keep their ca.pem)
    more = ensure_tls(files.dir, ["node2.example"])
    assert more.created and files.ca.read_bytes() == ca_before
    assert files.server_cert.read_bytes() != server_before
    assert {"node1.example", "node2.example", "10.9.8.7"} <= set(more.names())
    for path in files.dir.iterdir():
        assert os.stat(path).st_mode & 0o777 == 0o600, path


@pytest.mark.parametrize("bad", ["under_score.example", "a b", "-x.example", "x" * 300, ""])
def test_a_certificate_names_only_hosts_and_addresses(tmp_path: Path, bad: str) -> None:
    with pytest.raises(BadRequest, match="neither a host name nor an IP address"):
        ensure_tls(tmp_path / "tls", [bad])
    assert not (tmp_path / "tls").exists()


# --- the bus over TLS ----------------------------------------------------------------------


def test_agent_and_client_work_over_tls(
    secured: NatsServer,
    creds: Credentials,
    tls: TlsFiles,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert secured.url.startswith("tls://")
    monkeypatch.setenv(CA_ENV, str(tls.ca))
    for key, value in login_env(creds, "agent").items():
        monkeypatch.setenv(key, value)
    state = Cfg()
    with control(state, run=run_id, url=secured.url) as ctl:
        ctl.wait_ready(20)

        async def change() -> tuple[float, str]:
            async with await Client.connect(secured.url, **creds.auth("operator")) as client:
                assert client.nc.connected_url is not None
                scheme = client.nc.connected_url.scheme
                transport: Any = client.nc._transport  # nats-py's own, to see the TLS session
                ssl_object = transport._io_writer.get_extra_info("ssl_object")
                result = await client.set(run_id, 0, "lr", 0.5)
                assert isinstance(result, Result)
                return float(state.lr), f"{scheme} {ssl_object.version()}"

        lr, how = anyio.run(change)
    assert lr == 0.5
    assert how in ("tls TLSv1.3", "tls TLSv1.2")
    # the same server through a nats:// URL: TLS all the same, because RUNCTL_NATS_CA is set
    nats_url = secured.url.replace("tls://", "nats://")

    async def plain_scheme() -> bool:
        nc = await connect(nats_url, **creds.auth("observer"))
        try:
            transport: Any = nc._transport
            return transport._io_writer.get_extra_info("ssl_object") is not None
        finally:
            await nc.close()

    assert anyio.run(plain_scheme)


def test_the_wrong_ca_is_refused_clearly(
    secured: NatsServer,
    creds: Credentials,
    tls: TlsFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = ensure_tls(tmp_path / "other-tls")  # a CA that did not sign the server's cert
    monkeypatch.setenv(CA_ENV, str(other.ca))
    for key, value in login_env(creds).items():
        monkeypatch.setenv(key, value)
    error = anyio.run(connect_error, secured.url)
    assert str(error) == (
        f"cannot connect to NATS at {secured.url}: TLS: the server's certificate is not signed "
        f"by the CA in {CA_ENV}={other.ca} (unable to get local issuer certificate)"
    )
    for secret in secrets_of(creds, tls):
        assert secret not in str(error)


def test_an_expired_certificate_is_refused_clearly(
    creds: Credentials, tls: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expired_dir = tmp_path / "expired"
    expired_dir.mkdir(mode=0o700)
    shutil.copy(tls.ca, expired_dir / "ca.pem")
    ca = (_load_cert(tls.ca), _load_key(tls.ca_key))
    now = dt.datetime.now(dt.UTC)
    cert, key = issue_certificate(
        ca,
        ["127.0.0.1"],
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    (expired_dir / "server.pem").write_bytes(_pem_cert(cert))
    (expired_dir / "server-key.pem").write_bytes(_pem_key(key))
    server = start(tmp_path / "nats", creds, TlsFiles(expired_dir))
    try:
        monkeypatch.setenv(CA_ENV, str(tls.ca))
        error = anyio.run(connect_error, server.url)
        assert str(error) == (
            f"cannot connect to NATS at {server.url}: TLS: the server's certificate has expired "
            "(runctl up --tls renews it, signed by the same CA)"
        )
    finally:
        server.stop()


def test_a_plain_client_at_a_tls_port_fails_clearly(
    secured: NatsServer, creds: Credentials, tls: TlsFiles
) -> None:
    # runctl without RUNCTL_NATS_CA: nats-py switches to TLS as the server asks, and the
    # private CA is unknown to this machine
    plain = secured.url.replace("tls://", "nats://")
    error = anyio.run(connect_error, plain)
    assert str(error) == (
        f"cannot connect to NATS at {plain}: TLS: the server's certificate is not signed by a "
        f"CA this machine trusts (set {CA_ENV} to the server's ca.pem) "
        "(unable to get local issuer certificate)"
    )
    # any other client speaking plain text: the server takes nothing from it
    password = creds.passwords["operator"]
    with socket.create_connection(("127.0.0.1", secured.port), timeout=5) as sock:
        info = sock.recv(4096)
        assert b'"tls_required":true' in info
        sock.sendall(
            b'CONNECT {"user":"runctl-operator","pass":"' + password.encode() + b'"}\r\nPING\r\n'
        )
        received = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(4096):  # until the server hangs up
                received += chunk
    assert b"PONG" not in received and b"+OK" not in received


def test_tls_configured_refuses_a_plain_server_before_the_login(
    creds: Credentials, tls: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start(tmp_path / "nats", creds, None, trace=True)  # no TLS; traces every op
    try:
        monkeypatch.setenv(CA_ENV, str(tls.ca))
        for key, value in login_env(creds).items():
            monkeypatch.setenv(key, value)
        for url in (server.url, server.url.replace("nats://", "tls://")):
            error = anyio.run(connect_error, url)
            assert str(error) == (
                f"cannot connect to NATS at {url}: 127.0.0.1:{server.port} does not offer "
                f"TLS, and TLS is configured ({CA_ENV} or a tls:// URL): refusing to log in "
                "over a plain connection (start the server with TLS: runctl up --tls)"
            )
        # without RUNCTL_NATS_CA, a tls:// URL alone asks for TLS too
        monkeypatch.delenv(CA_ENV)
        error = anyio.run(connect_error, server.url.replace("nats://", "tls://"))
        assert "does not offer TLS" in str(error)
        log = server.log_path.read_text()
        assert "CONNECT" not in log, log[-2000:]  # no login ever reached the server
        assert creds.passwords["operator"] not in log
    finally:
        server.stop()


def test_client_certificates_when_the_server_verifies_clients(
    creds: Credentials, tls: TlsFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start(tmp_path / "nats", creds, tls, verify_clients=True)
    try:
        monkeypatch.setenv(CA_ENV, str(tls.ca))
        for key, value in login_env(creds).items():
            monkeypatch.setenv(key, value)
        # no client certificate: TLS 1.3 lets the client finish its handshake, so the
        # server's alert may be read, or only the hang-up that follows it
        with pytest.raises(Unavailable) as caught:
            anyio.run(connect, server.url)
        assert str(caught.value) in (
            f"cannot connect to NATS at {server.url}: {CERTIFICATE_REQUIRED}",
            f"cannot connect to NATS at {server.url}: NATS is not reachable: Connection lost "
            f"({CLIENT_CERT_HINT})",
        )
        monkeypatch.setenv(CERT_ENV, str(tls.client_cert))
        with pytest.raises(SetupError, match=f"{CERT_ENV} and {KEY_ENV} go together"):
            anyio.run(connect_error, server.url)
        monkeypatch.setenv(KEY_ENV, str(tls.client_key))

        async def ok() -> bool:
            nc = await connect(server.url)
            try:
                await nc.flush(timeout=5)
                return bool(nc.is_connected)
            finally:
                await nc.close()

        assert anyio.run(ok)
    finally:
        server.stop()


def test_a_missing_ca_file_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CA_ENV, "/nonexistent/ca.pem")
    with pytest.raises(SetupError, match=f"{CA_ENV}=/nonexistent/ca.pem: no such file"):
        anyio.run(connect_error, "tls://127.0.0.1:1")


def test_nothing_secret_in_the_server_log(
    secured: NatsServer, creds: Credentials, tls: TlsFiles
) -> None:
    log = secured.log_path.read_text()
    assert "TLS required for client connections" in log or "tls" in log.lower()
    for secret in secrets_of(creds, tls):
        assert secret not in log


# --- runctl up --tls, the CLI --------------------------------------------------------------


UP = (sys.executable, "-m", "runctl", "up")


def start_up(cwd: Path, port: int, *args: str) -> subprocess.Popen[str]:
    """``runctl up ARGS`` without nats.conf, in ``cwd``; stderr piped (read_until)."""
    return subprocess.Popen(
        [*UP, *args, "--no-config", "--port", str(port), "--store-dir", str(cwd / "store")],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def runctl(
    *args: str, cwd: Path, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-m", "runctl", *args],
        env=full,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 30) -> list[str]:
    """stderr lines of ``proc`` up to the one holding ``marker`` (fails with the output)."""
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stderr.fileno(), False)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line:
            lines.append(line)
            if marker in line:
                return lines
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.05)
    raise AssertionError(f"{marker!r} not seen: {''.join(lines)}{proc.stderr.read() or ''}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def test_runctl_up_tls_serves_tls_and_the_cli_needs_the_ca(tmp_path: Path) -> None:
    port = free_port()
    proc = start_up(tmp_path, port, "--tls", "--tls-host", "node1.example")
    try:
        lines = read_until(proc, "Server is ready")
        ca = (tmp_path / ".runctl" / "tls" / "ca.pem").resolve()
        said = "".join(lines)
        assert f"clients need RUNCTL_NATS_CA={ca}" in said, said
        assert "node1.example" in said and "PRIVATE" not in said
        url = f"tls://127.0.0.1:{port}"
        ok = runctl("ls", cwd=tmp_path, env={"RUNCTL_NATS_URL": url, CA_ENV: str(ca)})
        assert ok.returncode == 0, ok.stderr
        refused = runctl("ls", cwd=tmp_path, env={"RUNCTL_NATS_URL": url})
        assert refused.returncode == 5
        assert refused.stderr.strip() == (
            f"runctl: cannot connect to NATS at {url}: TLS: the server's certificate is not "
            f"signed by a CA this machine trusts (set {CA_ENV} to the server's ca.pem) "
            "(unable to get local issuer certificate)"
        )
    finally:
        stop(proc)


def test_runctl_up_refuses_a_public_address_without_tls(tmp_path: Path) -> None:
    done = runctl("up", "--no-config", "--host", "0.0.0.0", cwd=tmp_path, env={})
    assert done.returncode == 2
    assert done.stderr.startswith("runctl: refusing to listen on 0.0.0.0 without TLS")
    assert not (tmp_path / ".runctl" / "tls").exists()


def test_runctl_up_cluster_tls(tmp_path: Path) -> None:
    from test_cluster import _free_block

    port = _free_block(3)
    proc = start_up(tmp_path, port, "--cluster", "3", "--tls")
    try:
        lines = read_until(proc, "RUNCTL_NATS_URL=", timeout=60)
        ca = (tmp_path / ".runctl" / "tls" / "ca.pem").resolve()
        urls = ",".join(f"tls://127.0.0.1:{port + i}" for i in range(3))
        assert lines[-1].strip().endswith(f"RUNCTL_NATS_URL={urls} RUNCTL_NATS_CA={ca}"), lines
        assert "R3" in "".join(lines), lines
        # every node's route port takes TLS only, and only with a certificate of this CA
        for i in range(3):
            assert route_port_refuses(port + 2000 + i, ca)
        ok = runctl("ls", cwd=tmp_path, env={"RUNCTL_NATS_URL": urls, CA_ENV: str(ca)})
        assert ok.returncode == 0, ok.stderr
    finally:
        stop(proc)
    assert proc.returncode == 0


def handshake_and_read(context: ssl.SSLContext, sock: socket.socket) -> bytes:
    # TLS 1.3: a refusal of the client arrives after the handshake, at the first read
    with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
        return tls_sock.recv(4096)


def route_port_refuses(port: int, ca: Path) -> bool:
    """Plain text gets nothing; TLS without a client certificate gets refused."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=2) as sock,
        contextlib.suppress(TimeoutError),
    ):
        assert sock.recv(4096) == b""
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as caught:
            handshake_and_read(context, sock)
        assert "CERTIFICATE_REQUIRED" in str(caught.value) or isinstance(
            caught.value, ConnectionResetError
        )
    return True


# --- the gateway over HTTPS ----------------------------------------------------------------


def test_the_gateway_serves_https(nats_url: str, tls: TlsFiles) -> None:
    settings = Settings(
        nats_url=nats_url,
        port=0,
        tls_cert=str(tls.server_cert),
        tls_key=str(tls.server_key),
    )
    with GatewayThread(settings) as gateway:
        assert gateway.url.startswith("https://127.0.0.1:")
        verify = ssl.create_default_context(cafile=str(tls.ca))
        with httpx.Client(verify=verify, timeout=10) as http:
            assert http.get(f"{gateway.url}/runs").status_code == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{gateway.url}/runs", timeout=10)  # the system's CAs do not know it
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP to the HTTPS port
            httpx.get(gateway.url.replace("https://", "http://") + "/runs", timeout=10)


def test_runctl_gateway_refuses_tokens_over_plain_http_beyond_loopback(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    assert runctl("tokens", "--file", str(tokens), cwd=tmp_path, env={}).returncode == 0
    done = runctl(
        "gateway",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--tokens-file",
        str(tokens),
        cwd=tmp_path,
        env={},
    )
    assert done.returncode == 2
    assert done.stderr.startswith(
        "runctl: refusing to take bearer tokens over plain HTTP on 0.0.0.0"
    ), done.stderr
    assert "--allow-plain-http" in done.stderr
    half = runctl("gateway", "--tls-cert", str(tmp_path / "nope.pem"), cwd=tmp_path, env={})
    assert half.returncode == 2
    assert "--tls-cert and --tls-key go together" in half.stderr


def test_a_name_the_certificate_does_not_hold_is_refused_clearly(
    secured: NatsServer, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CA_ENV, str(tls.ca))

    async def go() -> TlsError:
        with pytest.raises(TlsError) as caught:
            await connect(secured.url, tls_hostname="other.example")
        return caught.value

    assert str(anyio.run(go)) == (
        f"cannot connect to NATS at {secured.url}: TLS: Hostname mismatch, certificate is not "
        "valid for 'other.example'; connect with a name the certificate holds, or add the "
        "name (runctl up --tls --tls-host NAME)"
    )
