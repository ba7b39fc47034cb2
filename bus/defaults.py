"""Where runctl's servers listen when nobody says otherwise: one definition each, for the
programs that serve (the gateway) and those that start or call them (the CLI, the demo);
and how an on/off setting in the environment is read (:func:`switched_on`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = ["GATEWAY_HOST", "GATEWAY_PORT", "MAX_PAYLOAD", "NATS_PORT", "NATS_URL", "switched_on"]

#: what turns an on/off setting off (any case, spaces around ignored); anything else is on
OFF: Final = frozenset({"0", "false", "no", "off"})

#: nats-server's own default client port
NATS_PORT: Final = 4222
#: where clients and agents look for NATS when nothing else is said
NATS_URL: Final = f"nats://127.0.0.1:{NATS_PORT}"

#: the HTTP gateway listens on loopback unless tokens are configured (gateway.auth)
GATEWAY_HOST: Final = "127.0.0.1"
#: Freak's port: Freak users' curl lines keep working
GATEWAY_PORT: Final = 4444
#: the largest command (and HTTP request body) runctl sends or accepts, in bytes
MAX_PAYLOAD: Final = 1 << 20


def switched_on(name: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable ``name`` leaves its setting on: unset or anything
    but 0/false/no/off."""
    return (os.environ if env is None else env).get(name, "").strip().lower() not in OFF
