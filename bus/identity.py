"""Who a change is by: the :class:`~runctl.bus.messages.Author` the change journal records.

- the gateway: the bearer token's name and role, and the caller's address;
- the CLI: ``user@host`` of whoever runs it;
- the Python client: its ``by=`` (``Client(..., by="watch@host")``), else ``user@host``;
- a bare NATS request: nothing (the agent records ``via: "nats"``).

Each also records the NATS user the sender was logged in as.
"""

from __future__ import annotations

import getpass
import socket
from typing import Any

from runctl.bus.messages import Author

__all__ = ["author_of", "nats_user", "user_at_host"]


def user_at_host() -> str:
    """``user@host`` of this process (``?`` for a user the system cannot name)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, no USER variable (containers)
        user = "?"
    return f"{user}@{socket.gethostname()}"


def nats_user(nc: Any) -> str:
    """The user ``nc`` logged in as (URL or options; ``""`` when it gave none)."""
    options = getattr(nc, "options", None) or {}
    if user := options.get("user"):
        return str(user)
    url = getattr(nc, "connected_url", None)
    if url is not None and getattr(url, "username", None):
        return str(url.username)
    if options.get("user_credentials"):
        return "(creds file)"
    if options.get("nkeys_seed"):
        return "(nkey)"
    return ""


def author_of(by: str | Author | None, nc: Any, *, via: str) -> Author:
    """An :class:`Author` from what a caller gave: an Author as is (its NATS user filled
    in), a name, or nothing (``user@host``)."""
    if isinstance(by, Author):
        return by if by.user else Author(**{**_fields(by), "user": nats_user(nc)})
    return Author(name=by or user_at_host(), via=via, user=nats_user(nc))


def _fields(author: Author) -> dict[str, str]:
    return {f: getattr(author, f) for f in author.__struct_fields__}
