"""A program's lease on the machine's embedded nats-server and gateway.

With no NATS URL configured, an agent takes a lease from the embedded host
(:mod:`runctl.agent.embedded_host`), starting the host first if none answers. The lease
is a Unix-socket connection the agent holds until it has said goodbye on the bus; the
host keeps the server (and the gateway) running while any lease is open, so the server
outlives every program that uses it, under torchrun as for two scripts side by side.

Ports and switches, all optional::

    RUNCTL_NATS_PORT      the embedded nats-server's port (default 4222)
    RUNCTL_GATEWAY_PORT   the embedded gateway's port (default 4444, Freak's)
    RUNCTL_GATEWAY=0      no gateway (also ``control(state, gateway=False)``)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from runctl.bus.defaults import GATEWAY_PORT, NATS_PORT, switched_on
from runctl.bus.errors import BadRequest, Unavailable
from runctl.bus.server import find_binary, server_env

__all__ = [
    "DEFAULT_GATEWAY_PORT",
    "DEFAULT_NATS_PORT",
    "EmbeddedConfig",
    "Lease",
    "acquire",
    "embedded_config",
    "lease_paths",
]

DEFAULT_NATS_PORT: Final = NATS_PORT
DEFAULT_GATEWAY_PORT: Final = GATEWAY_PORT
_HOST_SCRIPT: Final = Path(__file__).with_name("embedded_host.py")


class HostClosed(Unavailable):
    """The host closed a lease: it is stopping (or died)."""


@dataclass(frozen=True)
class EmbeddedConfig:
    nats_port: int = DEFAULT_NATS_PORT
    gateway_port: int = DEFAULT_GATEWAY_PORT
    gateway: bool = True


def _port(env: Mapping[str, str], key: str, default: int) -> int:
    text = env.get(key, "").strip()
    if not text:
        return default
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise BadRequest(f"{key} must be a port number (1-65535), not {text[:20]!r}")
    return int(text)


def embedded_config(
    gateway: bool | None = None, env: Mapping[str, str] | None = None
) -> EmbeddedConfig:
    """Ports and the gateway switch from the environment; ``gateway`` (the ``control()``
    argument) wins over ``RUNCTL_GATEWAY``."""
    env = os.environ if env is None else env
    if gateway is None:
        gateway = switched_on("RUNCTL_GATEWAY", env)
    return EmbeddedConfig(
        nats_port=_port(env, "RUNCTL_NATS_PORT", DEFAULT_NATS_PORT),
        gateway_port=_port(env, "RUNCTL_GATEWAY_PORT", DEFAULT_GATEWAY_PORT),
        gateway=gateway,
    )


def lease_paths(nats_port: int) -> tuple[Path, Path]:
    """The host's socket and lock for ``nats_port``: one host per port and user."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    folder = base / f"runctl-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Unavailable(f"{folder} is not private to this user: refusing to use it")
    return folder / f"embedded-{nats_port}.sock", folder / f"embedded-{nats_port}.lock"


@dataclass
class Lease:
    """An open lease: the bus URL and, once known, the gateway's. Close it (after the
    agent's goodbye) to let the host stop when it was the last one."""

    sock: socket.socket
    nats_url: str
    #: this process started the host (and with it, the server)
    started_host: bool
    #: the host started nats-server (False: it uses one that already listened)
    started_server: bool
    host_pid: int
    owner: int
    store: str | None
    users: int
    gateway_wanted: bool
    _buffer: bytes = b""
    _gateway: dict[str, Any] | None = field(default=None, repr=False)
    _gateway_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def gateway(self, timeout: float = 60.0) -> tuple[str | None, str]:
        """(URL, "") once the gateway listens, or (None, why not). Blocks up to
        ``timeout`` the first time."""
        if not self.gateway_wanted:
            return None, "turned off"
        with self._gateway_lock:  # the agent's announcement and the program may both ask
            if self._gateway is None:
                try:
                    self._gateway = _read_message(self, timeout)
                except Unavailable as exc:
                    self._gateway = {"url": None, "reason": str(exc)}
        return self._gateway.get("url"), str(self._gateway.get("reason", ""))

    def close(self) -> None:
        """Give the lease back: the host stops once no program holds one."""
        with contextlib.suppress(OSError):
            self.sock.close()


def _read_message(lease_or_sock: Lease | socket.socket, timeout: float) -> dict[str, Any]:
    lease = lease_or_sock if isinstance(lease_or_sock, Lease) else None
    sock = lease.sock if lease is not None else lease_or_sock
    assert isinstance(sock, socket.socket)
    buffer = lease._buffer if lease is not None else b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Unavailable(f"the embedded host did not answer within {timeout:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError as exc:
            raise HostClosed(f"the embedded host went away: {exc}") from exc
        if not chunk:
            raise HostClosed("the embedded host closed the lease")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    if lease is not None:
        lease._buffer = rest
    message: dict[str, Any] = json.loads(line)
    return message


def acquire(
    config: EmbeddedConfig, data_dir: str | os.PathLike[str], timeout: float = 30.0
) -> Lease:
    """A lease on the host for ``config.nats_port``, starting the host if none answers.
    Blocks until the bus accepts clients (not for the gateway: see :meth:`Lease.gateway`)."""
    sock_path, lock_path = lease_paths(config.nats_port)
    deadline = time.monotonic() + timeout
    data = Path(data_dir).absolute()
    spawned = False
    while True:
        sock = _connect(sock_path)
        if sock is None:
            if not spawned:
                _start_host(config, data, sock_path, lock_path, deadline)
                spawned = True
        else:
            lease = _request(sock, config, deadline)
            if lease is not None:
                return lease
            spawned = False  # that host was stopping: the next one takes over
        if time.monotonic() > deadline:
            raise Unavailable(f"the embedded host did not start within {timeout:g}s")
        time.sleep(0.02)


def _request(sock: socket.socket, config: EmbeddedConfig, deadline: float) -> Lease | None:
    """Ask a host for a lease; None if it closed the connection (it is stopping)."""
    lease = Lease(
        sock=sock,
        nats_url="",
        started_host=False,
        started_server=False,
        host_pid=0,
        owner=0,
        store=None,
        users=0,
        gateway_wanted=config.gateway,
    )
    try:
        request = {"pid": os.getpid(), "gateway": config.gateway}
        sock.sendall(json.dumps(request).encode() + b"\n")
        first = _read_message(lease, max(1.0, deadline - time.monotonic()))
    except HostClosed:
        sock.close()
        return None
    except BaseException:
        sock.close()
        raise
    if "error" in first:
        sock.close()
        raise Unavailable(str(first["error"]))
    lease.nats_url = str(first["url"])
    lease.started_server = bool(first.get("started"))
    lease.host_pid = int(first.get("host_pid", 0))
    lease.owner = int(first.get("owner", 0))
    lease.started_host = lease.owner == os.getpid()
    lease.store = first.get("store")
    lease.users = int(first.get("users", 0))
    return lease


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start_host(
    config: EmbeddedConfig, data: Path, sock_path: Path, lock_path: Path, deadline: float
) -> None:
    """Start a host; it returns (detached) once it takes leases, or found another host."""
    data.mkdir(parents=True, exist_ok=True)
    log_path = data / "embedded-host.log"
    argv = [
        sys.executable,
        str(_HOST_SCRIPT),
        "--detach",
        "--nats-port",
        str(config.nats_port),
        "--gateway-port",
        str(config.gateway_port),
        "--nats-server",
        find_binary(),
        "--store",
        str(data / "nats"),
        "--log-dir",
        str(data),
        "--sock",
        str(sock_path),
        "--lock",
        str(lock_path),
        "--owner",
        str(os.getpid()),
    ]
    with log_path.open("ab") as log:
        try:
            code = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(),  # the host's nats-server inherits it (GOMAXPROCS)
                start_new_session=True,  # a Ctrl-C or a launcher's kill of our group spares it
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            raise Unavailable("the embedded host did not start in time") from None
    if code != 0:
        raise Unavailable(f"the embedded host failed to start: {_log_tail(log_path)}")


def _log_tail(path: Path, limit: int = 400) -> str:
    try:
        return path.read_text(errors="replace").strip()[-limit:] or "no output"
    except OSError:
        return "no log"
