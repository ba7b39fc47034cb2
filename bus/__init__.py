"""What agents, the gateway, the CLI and users' scripts share, in layers (docs/architecture.md;
tests/test_layers.py keeps them):

* protocol, no I/O: ``subjects``, ``messages``, ``paths``, ``canonical``, ``errors`` (the one
  error tree), ``results`` (what an answer looks like), ``steps.records``, ``steps.forget``,
  ``steps.explain``, ``formatting``, ``defaults``
* NATS I/O: ``connection``, ``transport`` (requests, scatter-gather), ``registry``,
  ``steps.store``, ``journalstore``, ``cluster``, ``server``, ``credentials``, ``tls``
* the client and what both surfaces build on it: ``client`` (:class:`Client`), ``views`` and
  ``stepviews`` (JSON views), ``assign`` (typed-in values and patches)

Here: the client API, the errors a caller catches, and the server helpers.
"""

from runctl.bus import errors, messages, subjects, views
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
    "errors",
    "messages",
    "subjects",
    "views",
]
