"""What agents, the gateway and users' scripts share: subjects, messages, errors,
connection and server helpers, the rank registry and the client API."""

from runctl.bus import messages, subjects
from runctl.bus.client import Client, Gathered, Result
from runctl.bus.cluster import NatsCluster
from runctl.bus.connection import DEFAULT_URL, connect
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
from runctl.bus.registry import RankInfo, Registry
from runctl.bus.server import NatsServer

__all__ = [
    "DEFAULT_URL",
    "BadPath",
    "BadRequest",
    "BadToken",
    "Client",
    "Gathered",
    "NatsCluster",
    "NatsServer",
    "NotFound",
    "PayloadTooLarge",
    "RankInfo",
    "Registry",
    "RemoteError",
    "Result",
    "RunctlError",
    "ServerStartError",
    "Timeout",
    "Unavailable",
    "ValidationRejected",
    "connect",
    "messages",
    "subjects",
]
