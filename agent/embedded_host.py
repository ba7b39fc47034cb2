"""The embedded host: the one process per machine that owns the zero-setup nats-server and
HTTP gateway, shared by every program that uses them, and gone when the last one exits.

A program that calls ``control(state)`` with no NATS URL configured asks for a *lease* on
a Unix socket (:mod:`runctl.agent.embedded_lease`); if no host answers, it starts this one
(a detached process in its own session, so a Ctrl-C or a launcher killing the program's
process group never takes the bus away from the other programs). The host

- holds an exclusive lock for its port while it lives, so two programs starting at once
  start one host (the second host sees the lock and leaves);
- starts ``nats-server`` (JetStream) on the port, or uses the server already listening
  there, and the gateway (``runctl gateway``, loopback only) the first time a lease asks
  for it and the gateway port is free;
- counts the open lease connections: a program holds its lease until it has said goodbye
  on the bus, and the kernel closes it if the program dies, even by SIGKILL. When no
  lease is left for :data:`LINGER` seconds the host stops the gateway, then the server,
  and exits.

Its children get SIGTERM if the host itself dies (``PR_SET_PDEATHSIG``): no orphans.

Only the standard library is imported here, and the module runs by its file path, so a
new program's agent is connected without waiting for a second Python to import runctl's
dependencies (the gateway child does that, after the bus is up).

Why one module of this size: it runs by its file path with only the standard library (see
above), so it cannot lean on runctl's other modules for its process handling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["LINGER", "main"]

#: seconds without any lease before the host stops (a program re-run at once finds it)
LINGER: Final = 1.0
#: the host exits if nobody takes a lease this long after it started
FIRST_LEASE_TIMEOUT: Final = 30.0
NATS_START_TIMEOUT: Final = 20.0
GATEWAY_START_TIMEOUT: Final = 60.0
_READY: Final = "Server is ready"
_FATAL = re.compile(r"\[(?:FTL|ERR)\]\s*(.*)")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    """As runctl.bus.server.port_free (this module imports only the standard library):
    checked the way the server binds (SO_REUSEADDR), so a port in TIME_WAIT is free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tail(path: Path, limit: int = 400) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    fatal = _FATAL.findall(text)
    if fatal:
        return str(fatal[-1]).strip()
    return text[-limit:]


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child that gets SIGTERM if the host dies (no orphan server or gateway)."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _stop_child(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class Host:
    def __init__(self, args: argparse.Namespace, ready_fd: int | None = None) -> None:
        self.args = args
        self.ready_fd = ready_fd
        self.nats_port: int = args.nats_port
        self.gateway_port: int = args.gateway_port
        self.store = Path(args.store)
        self.log_dir = Path(args.log_dir)
        self.nats: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.nats_info: dict[str, Any] = {}
        self.gateway_info: dict[str, Any] | None = None
        self.leases = 0
        self.leased_once = False
        #: set, with no await since the last lease count, once the host decided to stop
        self.closing = False
        self.users: set[int] = set()
        self.changed = asyncio.Event()
        self.nats_ready = asyncio.Event()
        self.gateway_task: asyncio.Task[None] | None = None
        self.gateway_ready = asyncio.Event()

    # --- services ------------------------------------------------------------------------

    async def start_nats(self) -> None:
        """Start nats-server on the port, or adopt the one already listening there."""
        url = f"nats://127.0.0.1:{self.nats_port}"
        if _listening(self.nats_port):
            # a server someone else runs (``runctl up``, a test): use it, never stop it
            self.nats_info = {"url": url, "started": False}
            self.nats_ready.set()
            return
        self.store.mkdir(parents=True, exist_ok=True)
        log_path = self.store / "nats-server.log"
        argv = [
            self.args.nats_server,
            "-a",
            "127.0.0.1",
            "-p",
            str(self.nats_port),
            "-js",
            "-sd",
            str(self.store),
        ]
        self.nats = _spawn(argv, log_path)
        deadline = time.monotonic() + NATS_START_TIMEOUT
        while True:
            text = log_path.read_text(errors="replace")
            if _READY in text:
                self.nats_info = {
                    "url": url,
                    "started": True,
                    "store": str(self.store),
                    "pid": self.nats.pid,
                }
                break
            if self.nats.poll() is not None or time.monotonic() > deadline:
                _stop_child(self.nats, 5)
                why = _tail(log_path) or f"exit code {self.nats.returncode}"
                self.nats_info = {"error": f"nats-server on 127.0.0.1:{self.nats_port}: {why}"}
                break
            await asyncio.sleep(0.01)
        self.nats_ready.set()

    def want_gateway(self) -> None:
        """Whether a lease asked for the HTTP gateway (the first one that asks starts it)."""
        if self.gateway_task is None:
            self.gateway_task = asyncio.ensure_future(self.start_gateway())

    async def start_gateway(self) -> None:
        """Start the gateway on loopback if its port is free (if not, that is logged)."""
        await self.nats_ready.wait()
        port = self.gateway_port
        url = f"http://127.0.0.1:{port}"
        if "url" not in self.nats_info:
            self.gateway_info = {"url": None, "reason": "the bus did not start"}
        elif not _port_free(port):
            self.gateway_info = {"url": None, "reason": f"port {port} is in use"}
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"gateway-{port}.log"
            argv = [
                sys.executable,
                "-m",
                "runctl.gateway",  # `runctl gateway`, without the CLI's own start first
                "--nats",
                self.nats_info["url"],
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ]
            self.gateway = _spawn(argv, log_path)
            deadline = time.monotonic() + GATEWAY_START_TIMEOUT
            while True:
                if self.gateway.poll() is not None or time.monotonic() > deadline:
                    _stop_child(self.gateway, 5)
                    why = _tail(log_path) or f"exit code {self.gateway.returncode}"
                    self.gateway_info = {"url": None, "reason": f"the gateway failed: {why}"}
                    break
                if _listening(port):
                    self.gateway_info = {"url": url, "pid": self.gateway.pid}
                    break
                await asyncio.sleep(0.05)
        self.gateway_ready.set()

    # --- leases --------------------------------------------------------------------------

    async def on_lease(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one lease connection: count it until the program closes it (or dies)."""
        if self.closing:  # too late: the program retries, with the next host
            writer.close()
            return
        self.leases += 1
        self.leased_once = True
        self.changed.set()
        pid = 0
        try:
            try:
                request = json.loads(await asyncio.wait_for(reader.readline(), 10) or b"{}")
            except (TimeoutError, ValueError):
                return
            pid = int(request.get("pid") or 0)
            self.users.add(pid)
            if request.get("gateway"):
                self.want_gateway()
            await self.nats_ready.wait()
            self._send(writer, {"kind": "nats", **self._common(), **self.nats_info})
            await writer.drain()
            if "error" in self.nats_info:
                return
            if request.get("gateway"):
                await self.gateway_ready.wait()
                self._send(writer, {"kind": "gateway", **(self.gateway_info or {})})
                await writer.drain()
            while await reader.read(4096):  # held until the program closes it, or dies
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self.users.discard(pid)
            self.leases -= 1
            self.changed.set()
            with contextlib.suppress(Exception):
                writer.close()

    def _common(self) -> dict[str, Any]:
        return {
            "host_pid": os.getpid(),
            "owner": self.args.owner,
            "users": len(self.users),
        }

    @staticmethod
    def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        writer.write(json.dumps(message).encode() + b"\n")

    # --- life ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Hold the port's lock, serve leases, and stop everything once the last lease is gone."""
        sock_path = Path(self.args.sock)
        _remove(sock_path)  # a dead host's: we hold the lock, so nobody else's
        server = await asyncio.start_unix_server(self.on_lease, path=str(sock_path))
        os.chmod(sock_path, 0o600)
        _tell(self.ready_fd, b"1")  # leases are taken from now on
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, stopping.set)
        nats_task = asyncio.ensure_future(self.start_nats())
        try:
            await self._until_unused(stopping)
        finally:
            self.closing = True
            server.close()
            _remove(sock_path)
            nats_task.cancel()
            if self.gateway_task is not None:
                self.gateway_task.cancel()
            _stop_child(self.gateway, 5)
            _stop_child(self.nats, 10)  # SIGTERM: JetStream writes its state out
        return 0

    async def _until_unused(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.changed.clear()
            if self.leases > 0:
                await self._wake(stopping)
                continue
            idle = LINGER if self.leased_once else FIRST_LEASE_TIMEOUT
            try:
                await asyncio.wait_for(self._wake(stopping), idle)
            except TimeoutError:
                if self.leases == 0:
                    self.closing = True
                    return

    async def _wake(self, stopping: asyncio.Event) -> None:
        waits = [
            asyncio.ensure_future(self.changed.wait()),
            asyncio.ensure_future(stopping.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def _take_lock(lock_path: Path, sock_path: Path, timeout: float = 20.0) -> int | None:
    """The host's lock, held for its life; None if a live host already serves leases."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        if _accepts(sock_path):
            os.close(fd)
            return None  # another host lives: the program will use it
        if time.monotonic() > deadline:  # a host stuck while stopping
            os.close(fd)
            raise SystemExit(f"runctl embedded host: {lock_path} stays locked")
        time.sleep(0.05)  # a host is stopping: take over once it is gone


def _accepts(sock_path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(sock_path))
        except OSError:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the detached host process (run by its file path)."""
    parser = argparse.ArgumentParser(description="runctl's shared embedded nats-server and gateway")
    parser.add_argument("--nats-port", type=int, required=True)
    parser.add_argument("--gateway-port", type=int, required=True)
    parser.add_argument("--nats-server", required=True, help="the nats-server binary")
    parser.add_argument("--store", required=True, help="JetStream store directory")
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("--sock", required=True)
    parser.add_argument("--lock", required=True)
    parser.add_argument("--owner", type=int, default=0, help="pid of the program that started it")
    parser.add_argument(
        "--detach",
        action="store_true",
        help="fork: the command returns once the host takes leases (or another host does)",
    )
    args = parser.parse_args(argv)
    ready_fd = _detach() if args.detach else None
    fd = _take_lock(Path(args.lock), Path(args.sock))
    if fd is None:
        _tell(ready_fd, b"0")
        return 0
    try:
        return asyncio.run(Host(args, ready_fd).run())
    finally:
        os.close(fd)


def _detach() -> int:
    """Fork; the parent (the program's child) exits 0 once the host takes leases or
    found another host, 1 if the host died first. The host is then nobody's child that
    a program must reap."""
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        got = os.read(read_end, 1)
        os._exit(0 if got in (b"0", b"1") else 1)
    os.close(read_end)
    return write_end


def _tell(fd: int | None, what: bytes) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, what)
            os.close(fd)


if __name__ == "__main__":
    raise SystemExit(main())
