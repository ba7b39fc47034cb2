"""The HTTP gateway, the ``runctl`` CLI and the demo.

``create_app(settings)`` builds the FastAPI app; ``serve`` runs it in the foreground and
``GatewayThread`` on a thread. The names are imported on first use, so ``runctl`` and the
demo's ranks do not pay for FastAPI and uvicorn unless they serve.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runctl.gateway.app import create_app
    from runctl.gateway.serve import GatewayThread, serve
    from runctl.gateway.settings import Settings

__all__ = ["GatewayThread", "Settings", "create_app", "serve"]

_WHERE = {
    "create_app": "runctl.gateway.app",
    "GatewayThread": "runctl.gateway.serve",
    "serve": "runctl.gateway.serve",
    "Settings": "runctl.gateway.settings",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'gateway' has no attribute {name!r}")
