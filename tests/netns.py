"""Hosts for tests: Linux network namespaces linked by a bridge, so a cluster can span
"machines" on one machine.

Every host is a namespace with one interface, ``eth0``, with an address the test picks in
10.213.0.0/24; the other end of each veth pair is a port of bridge ``br0`` in one more
namespace, the switch. Nothing is added to the machine's own namespace (no interface, no
route, no address), so no packet of these hosts can leave the machine, and the addresses
cannot clash with anything outside. ``Hosts.cut(name)`` sets a host's ``eth0`` down (its
cable pulled), ``Hosts.mend(name)`` up again.

Processes run on a host through ``ip netns exec NS`` (:meth:`Hosts.prefix`); the test's own
clients run in a thread that has joined the host's namespace (:meth:`Hosts.run`). Everything
is removed at the end, also when the test fails: processes still running in the namespaces
are killed (they can only be the test's), then the namespaces are deleted.

:func:`unavailable` says why namespaces cannot be made here (not root, no ``ip``, no
permission): tests skip with that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from runctl.bus.cluster import run_sync

__all__ = ["SUBNET", "Hosts", "unavailable"]

T = TypeVar("T")
#: the addresses hosts get: used only inside the namespaces the tests make
SUBNET = "10.213.0"
_CLONE_NEWNET = 0x40000000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> str | None:
    """Why this machine cannot give a test network namespaces (None: it can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2): .ci/run installs it"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    name = f"rcprobe{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _remove_orphans() -> None:
    """Namespaces left by a test process that was killed before it could clean up (its pid
    is in the name and no longer runs): delete them, they hold nothing of anyone else."""
    listed = _ip("netns", "list", check=False).stdout.split()
    for name in listed:
        match = re.fullmatch(r"rc(\d+)x\d+-\w+", name)
        if match and not os.path.exists(f"/proc/{match[1]}"):
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", name, check=False)


def _join_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


class Hosts:
    """``names`` hosts on one bridge; host ``i`` has address ``10.213.0.<i+1>``."""

    def __init__(self, names: list[str]) -> None:
        self.tag = f"rc{os.getpid()}x{threading.get_ident() % 10000}"
        self.names = names
        self.address = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(names)}
        self.switch = f"{self.tag}-sw"
        self.made: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def prefix(self, name: str) -> tuple[str, ...]:
        """Put this before a command to run it on host ``name``."""
        return ("ip", "netns", "exec", self.ns(name))

    def up(self) -> Hosts:
        _remove_orphans()
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                ns = self.ns(name)
                self._add(ns)
                port = f"p{i + 1}"
                # made directly inside the two namespaces: never an interface of the machine
                _ip(
                    *("link", "add", "eth0", "netns", ns, "type", "veth"),
                    *("peer", "name", port, "netns", self.switch),
                )
                _ip("-n", self.switch, "link", "set", port, "master", "br0")
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.down()
            raise
        return self

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        """Kill what still runs in the namespaces, delete them (never raises)."""
        for ns in reversed(self.made):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()

    def cut(self, name: str) -> None:
        """Pull host ``name``'s cable: its ``eth0`` goes down, nothing reaches it or leaves."""
        _ip("-n", self.ns(name), "link", "set", "eth0", "down")

    def mend(self, name: str) -> None:
        _ip("-n", self.ns(name), "link", "set", "eth0", "up")

    def run(self, name: str, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()`` on a fresh event loop in a thread inside host ``name``'s network
        namespace (a thread's namespace is its own: the test process stays where it is)."""
        ns_path = f"/run/netns/{self.ns(name)}"

        async def inside() -> T:
            _join_netns(ns_path)  # this thread only; threads it starts inherit it
            return await fn()

        return run_sync(inside)

    @contextlib.contextmanager
    def running(self) -> Iterator[Hosts]:
        self.up()
        try:
            yield self
        finally:
            self.down()
