"""Zero setup: with no NATS URL configured, an agent uses (or starts) a server on 4222.

The first rank on a machine starts ``nats-server`` (JetStream stored under the agent's
``data_dir``) from the agent's own thread, so the server dies with that process; the
others find it listening and use it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Final

import structlog

from runctl.bus.errors import ServerStartError
from runctl.bus.server import NatsServer

__all__ = ["EMBEDDED_PORT", "ensure_embedded_server", "listening"]

#: the port the embedded server listens on (module attribute: benchmarks point it elsewhere)
EMBEDDED_PORT: Final = 4222


def ensure_embedded_server(data_dir: str | os.PathLike[str]) -> tuple[str, NatsServer | None]:
    """The URL of the local server on :data:`EMBEDDED_PORT`, and the server if this call
    started it (None when one was already listening, or another rank won the race)."""
    port = EMBEDDED_PORT
    url = f"nats://127.0.0.1:{port}"
    if listening("127.0.0.1", port):
        return url, None
    server = NatsServer(port=port, store_dir=Path(data_dir) / "nats", die_with_parent=True)
    try:
        # Started from this (the agent's) thread: it dies with the thread, no orphan.
        started = server.start()
    except ServerStartError as exc:
        if "address already in use" not in exc.log_line:
            raise
        return url, None  # another rank won the race to start it: use theirs
    structlog.get_logger().info(
        "started embedded nats-server", url=url, store=str(server.store_dir)
    )
    return url, started


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (within 0.2 s)."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False
