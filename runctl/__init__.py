"""runctl: read and change a running program's pydantic state from outside, on every rank.

The one line to add to a program::

    from runctl import control

    ctl = control(state)

Everything a program or a script needs is importable from here; the layers below
(``runctl.bus``, ``runctl.agent``, ``runctl.gateway``, ``runctl.cli``) are documented in
docs/architecture.md.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from runctl.agent import (
    Agent,
    Control,
    LiveState,
    Step,
    Steps,
    control,
    detect_rank,
    detect_run,
    detect_world_size,
)
from runctl.bus.client import Client, Gathered, Result
from runctl.bus.cluster import NatsCluster
from runctl.bus.errors import (
    BadPath,
    BadRequest,
    BadToken,
    NotFound,
    PayloadTooLarge,
    RemoteError,
    RunctlError,
    ServerStartError,
    Timeout,
    Unavailable,
    ValidationRejected,
)
from runctl.bus.progress import StallPolicy
from runctl.bus.server import NatsServer

try:
    __version__ = version("runctl")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Agent",
    "BadPath",
    "BadRequest",
    "BadToken",
    "Client",
    "Control",
    "Gathered",
    "LiveState",
    "NatsCluster",
    "NatsServer",
    "NotFound",
    "PayloadTooLarge",
    "RemoteError",
    "Result",
    "RunctlError",
    "ServerStartError",
    "StallPolicy",
    "Step",
    "Steps",
    "Timeout",
    "Unavailable",
    "ValidationRejected",
    "__version__",
    "control",
    "detect_rank",
    "detect_run",
    "detect_world_size",
]
