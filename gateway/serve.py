"""Run the gateway: in the foreground (``runctl gateway``) or on a thread (the demo, tests).

``port=0`` lets the OS pick a free port; :attr:`GatewayThread.port` tells which.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Self

import uvicorn
from fastapi import FastAPI

from runctl.bus.errors import Unavailable
from runctl.gateway.app import create_app
from runctl.gateway.live import close_bridges
from runctl.gateway.settings import Settings

__all__ = ["GatewayThread", "serve"]


class _Server(uvicorn.Server):
    """uvicorn's server, ending the console's live streams first when it stops (it would
    otherwise wait for them, then cancel them with an error in the log)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        if isinstance(app, FastAPI):
            close_bridges(app)
        await super().shutdown(sockets)


def _config(settings: Settings, log_level: str, access_log: bool) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=access_log,
        lifespan="on",
        # keep-alive clients must not hold up a stop
        timeout_graceful_shutdown=2,
        server_header=False,
        # HTTPS when a certificate is given (uvicorn's own TLS; TLS 1.2 and later)
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
    )


def serve(settings: Settings, *, log_level: str = "info", access_log: bool = True) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's own signal handling)."""
    _Server(_config(settings, log_level, access_log)).run()


class GatewayThread:
    """A gateway on a daemon thread with its own event loop; ``start()`` returns once it
    accepts connections (and has tried NATS once)."""

    def __init__(
        self, settings: Settings, *, log_level: str = "warning", access_log: bool = False
    ) -> None:
        self.settings = settings
        self.server = _Server(_config(settings, log_level, access_log))
        self.thread = threading.Thread(target=self.server.run, name="runctl-gateway", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS picked for ``port=0``)."""
        for server in self.server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.settings.port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running gateway."""
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    def start(self, timeout: float = 15.0) -> Self:
        """Start the thread; return once it accepts connections (``Unavailable`` if not)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise Unavailable(
                    f"the gateway could not listen on {self.settings.host}:{self.settings.port}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"the gateway did not start within {timeout:g}s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to exit and wait up to ``timeout`` seconds for the thread."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
