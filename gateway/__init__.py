"""The HTTP gateway: HTTP requests in, bus requests out; it keeps no state.

``create_app(settings)`` builds the FastAPI app; ``serve`` runs it in the foreground and
``GatewayThread`` on a thread; ``python -m runctl.gateway`` is the program (what
``runctl gateway`` runs). Modules: ``routes`` (runs, ranks, state), ``steps_api`` (the step
log), ``errors`` (the one exception handler and error body), ``auth`` (bearer tokens),
``page`` (the status page), ``settings``, ``serve``, ``main``.
"""

from runctl.gateway.app import create_app
from runctl.gateway.serve import GatewayThread, serve
from runctl.gateway.settings import Settings

__all__ = ["GatewayThread", "Settings", "create_app", "serve"]
