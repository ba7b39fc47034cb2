"""What a gateway is started with.

The gateway keeps nothing else: every answer comes from the bus (the registry's KV bucket
or the ranks themselves), so it can be restarted at any time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

from runctl.bus.defaults import GATEWAY_HOST, GATEWAY_PORT, MAX_PAYLOAD
from runctl.bus.subjects import check_rank, check_token
from runctl.gateway.auth import TokenTable

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY",
    "DEFAULT_PORT",
    "Settings",
]

DEFAULT_HOST: Final = GATEWAY_HOST
DEFAULT_PORT: Final = GATEWAY_PORT
DEFAULT_MAX_BODY: Final = MAX_PAYLOAD


@dataclass(frozen=True)
class Settings:
    """What a gateway is started with (checked at construction)."""

    #: NATS URL(s), comma separated; None means $RUNCTL_NATS_URL or nats://127.0.0.1:4222
    nats_url: str | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: run of the Freak-compatible root routes (/get, /set, /reset ...); None: the only
    #: live run (gateway.freak)
    default_run: str | None = None
    #: their rank; None: reads from rank 0, writes to every rank
    default_rank: str | None = None
    #: how long a command waits for its rank(s), seconds
    timeout: float = 2.0
    #: request bodies over this many bytes get 413 without being read
    max_body: int = DEFAULT_MAX_BODY
    #: bearer tokens (gateway.auth); empty: open, which only a loopback bind allows
    tokens: TokenTable = field(default_factory=TokenTable)
    #: serve HTTPS with this certificate and key (PEM files); None: plain HTTP
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        # Checked at start, so a bad --run fails the gateway instead of every request.
        if self.default_run is not None:
            check_token(self.default_run, "run")
        if self.default_rank is not None:
            check_rank(self.default_rank)
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError("timeout must be positive and finite")
        if self.max_body < 1:
            raise ValueError("max_body must be at least 1 byte")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
