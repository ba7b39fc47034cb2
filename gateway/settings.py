"""What a gateway is started with.

The gateway keeps nothing else: every answer comes from the bus (the registry's KV bucket
or the ranks themselves), so it can be restarted at any time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from runctl.bus.defaults import GATEWAY_HOST, GATEWAY_PORT, MAX_PAYLOAD, switched_on
from runctl.bus.subjects import check_rank, check_token
from runctl.gateway.auth import TokenTable
from runctl.gateway.site import normalize_origin, split_host

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_BODY",
    "DEFAULT_PORT",
    "FAST_PATH_ENV",
    "Settings",
    "fast_path_enabled",
]

DEFAULT_HOST: Final = GATEWAY_HOST
DEFAULT_PORT: Final = GATEWAY_PORT
DEFAULT_MAX_BODY: Final = MAX_PAYLOAD


#: ``off`` (or ``0``/``no``/``false``) sends every request through FastAPI's router
FAST_PATH_ENV: Final = "RUNCTL_GATEWAY_FAST_PATH"


def fast_path_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether :data:`FAST_PATH_ENV` leaves the gateway's fast path on (the default)."""
    return switched_on(FAST_PATH_ENV, env)


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
    #: Host names served besides loopback and the listen address ("*": any); see
    #: gateway.site (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()
    #: origins (scheme://host[:port]) whose pages may change state besides the gateway's own
    allowed_origins: tuple[str, ...] = ()
    #: answer plain reads and ``?value=`` sets before FastAPI's router (gateway/hot.py);
    #: default: on, unless ``RUNCTL_GATEWAY_FAST_PATH=off``
    fast_path: bool = field(default_factory=fast_path_enabled)

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
        for origin in self.allowed_origins:
            if normalize_origin(origin) is None:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
        for host in self.allowed_hosts:
            if host != "*" and split_host(host) is None:
                raise ValueError(f"{host!r} is not a host name")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
