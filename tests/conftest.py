"""Shared fixtures. Integration tests start the real nats-server binary (free port chosen
by the server itself, temporary store dir): the bus and HTTP are never mocked."""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from runctl.bus.server import NatsServer
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
#: in CI (RUNCTL_REQUIRE_ALL=1) a skip fails the test (tests/noskip.py)
pytest_plugins = ["noskip"]
_run_ids = itertools.count()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One server for tests that only need a bus; each test uses its own run id."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats-session")).start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(session_server: NatsServer) -> str:
    return session_server.url


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A private server, for tests that kill or restart it."""
    server = NatsServer(store_dir=tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id unique to the test (tokens allow letters, digits, '_' and '-')."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"t{os.getpid()}-{next(_run_ids)}-{name}".strip("-")


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (for programs that take a port
    number rather than port 0, e.g. the embedded server's RUNCTL_NATS_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def process_env(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with (Linux: /proc/<pid>/environ)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def spawn_python(
    code: str,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    prefix: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    """Run ``code`` in a separate Python process (a real rank), stdout/stderr piped;
    ``prefix`` runs it under another command (``ip netns exec NS``: on another host)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [*prefix, sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=str(cwd or ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate: object, timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until truthy (for state that arrives asynchronously)."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s: {predicate}")


async def wait_exit(proc: subprocess.Popen[Any], timeout: float, what: str = "process") -> int:
    """The exit code of ``proc``, polled on the event loop: a deadline that cancels (a
    thread blocked in ``proc.wait()`` cannot be cancelled, so a process that never exits
    would hold the test until it does). Raises ``TimeoutError`` naming ``what``."""
    import anyio

    with anyio.move_on_after(timeout):
        while True:
            code = proc.poll()
            if code is not None:
                return code
            await anyio.sleep(0.02)
    raise TimeoutError(f"{what} (pid {proc.pid}) did not exit within {timeout:g}s")


async def register_silent_rank(url: str, run: str, rank: str) -> None:
    """Put a live-looking record in the registry for a rank that will never answer
    (tests of Timeout/504: the client only waits for ranks the registry knows)."""
    await register_rank(url, run, rank)


async def register_rank(
    url: str, run: str, rank: str, *, heartbeat_age: float = 0.0, heartbeat_interval: float = 60.0
) -> None:
    """Put a registry record for ``rank`` whose last heartbeat was ``heartbeat_age``
    seconds ago (stale once that is over three ``heartbeat_interval``s, at least 1.5 s),
    with no agent behind it: the test answers for the rank, or not."""
    import time as _time

    import nats

    from runctl.bus.messages import RankRecord
    from runctl.bus.registry import Registry

    nc = await nats.connect(url)
    try:
        registry = await Registry.open(nc)
        now = _time.time()
        await registry.put(
            RankRecord(
                run=run,
                rank=rank,
                host="silent",
                pid=0,
                started=now - heartbeat_age,
                heartbeat=now - heartbeat_age,
                heartbeat_interval=heartbeat_interval,
                version=0,
                state={},
            )
        )
    finally:
        await nc.close()


GatewayFactory = Callable[..., httpx.Client]


@pytest.fixture
def gateway(nats_url: str) -> Iterator[GatewayFactory]:
    """Start gateways on free ports (real uvicorn sockets); each call returns an httpx client."""
    started: list[tuple[GatewayThread, httpx.Client]] = []

    def start(**options: Any) -> httpx.Client:
        settings = Settings(**{"nats_url": nats_url, "port": 0, **options})
        thread = GatewayThread(settings).start()
        client = httpx.Client(base_url=thread.url, timeout=20)
        started.append((thread, client))
        return client

    yield start
    for thread, client in started:
        client.close()
        thread.stop()
