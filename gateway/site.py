"""Which pages may talk to the gateway: the rules that keep a web page on another site from
steering a program through it, even when the gateway has no tokens.

A browser lets any page send a "simple" request to any address, ``POST`` with
``Content-Type: text/plain`` included, without asking first; and DNS rebinding points a
page's own name at 127.0.0.1, so that its requests to "itself" reach the gateway. The
browser cannot read the answers without CORS headers (the gateway sends none), but a
change or a stop needs no answer to do harm. So, before any route runs:

1. ``Host`` must be a name the gateway serves: loopback names and addresses
   (``localhost``, ``127.0.0.0/8``, ``[::1]``), the address it listens on, and the names
   given with ``--allow-host`` (``*``: any). A rebinding page sends its own name: 400
   ``bad_host``.
2. A state-changing request (anything but GET, HEAD, OPTIONS) from a browser page of
   another origin is refused: ``Origin`` must be the gateway's own (the same host and
   port as the request) or one given with ``--allow-origin``; without ``Origin``, the
   browser's ``Sec-Fetch-Site`` must not say ``cross-site`` or ``same-site``. 403
   ``cross_site``, whatever token the request carries. Programs (curl, the CLI, scripts)
   send neither header and are not affected.
3. A state-changing request's body, if it says what it is, must be JSON
   (``application/json`` or ``application/*+json``): ``text/plain`` and multipart forms
   are exactly what a page can send without asking, and ``text/plain`` can carry JSON.
   415 ``unsupported_media_type``. One exception: ``application/x-www-form-urlencoded``
   on a PATCH (the only routes that read a body), which ``curl -d`` sends by default: a
   browser's form encoding percent-encodes ``{`` and ``"``, so it can never carry JSON,
   and the route refuses (400) what is not JSON.

With tokens, authentication stays bearer-only (``Authorization`` header; cookies are never
read), which a browser never adds by itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from runctl.bus.errors import BadHost, CrossSite, RunctlError, UnsupportedMediaType
from runctl.bus.tls import is_loopback
from runctl.gateway.errors import send_error

__all__ = ["SAFE_METHODS", "SiteGuard", "normalize_origin", "split_host"]

SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORT: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
#: what a refusal may show of a header (an attacker's 10 KB Host is not echoed)
_SHOWN: Final = 80
#: the request headers the rules read
_READ: Final = frozenset({b"host", b"origin", b"sec-fetch-site", b"content-type"})
#: how many distinct ``Host`` values are remembered with their verdict
_HOSTS_REMEMBERED: Final = 64


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` as (lower-case name, port or None); None if it is not a host name or an
    address with an optional port (``a@b``, ``a/b``, spaces, two ports ...)."""
    value = value.strip()
    port: str | None = None
    if value.startswith("["):  # [::1]:4444
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                return None
            port = rest[1:]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
    else:
        name, sep, after = value.partition(":")
        if sep:
            port = after
        name = name.lower()
        if name.endswith("."):  # "localhost." is the same name
            name = name[:-1]
        if not name or not set(name) <= _NAME_CHARS:
            return None
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return None
    return name.lower(), int(port) if port is not None else None


def normalize_origin(origin: str) -> tuple[str, str, int] | None:
    """``scheme://host[:port]`` as (scheme, host, port with the scheme's default); None for
    ``null`` and anything that is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORT or not parts.hostname or parts.path not in ("", "/"):
        return None
    if parts.username or parts.password or parts.query or parts.fragment:
        return None
    return scheme, parts.hostname.lower().rstrip("."), port or _DEFAULT_PORT[scheme]


class SiteGuard:
    """ASGI middleware applying the three rules above (see the module's docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: Iterable[str] = (),
        origins: Iterable[str] = (),
        listen: str = "",
    ) -> None:
        self.app = app
        hosts = list(hosts)
        self.any_host = "*" in hosts
        self.hosts = {n for h in hosts if h != "*" and (n := _host_name(h))}
        name = _host_name(listen)
        if name and not _is_wildcard(name):
            self.hosts.add(name)  # the address it listens on serves itself
        self.origins = {o for x in origins if (o := normalize_origin(x)) is not None}
        self._hosts_seen: dict[str, tuple[str, int | None] | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            self.check(scope)
        except RunctlError as exc:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": exc.code})
            else:
                await send_error(send, exc)
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> None:
        """Raise the error the rules above give ``scope``, if any."""
        headers: dict[str, list[str]] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.lower()
            if name in _READ:  # only these four are read
                headers.setdefault(name.decode(), []).append(raw_value.decode("latin-1"))
        hosts = headers.get("host", [])
        host = self._host(hosts[0]) if len(hosts) == 1 else None
        if host is None:
            shown = ", ".join(hosts)[:_SHOWN] or "(none)"
            raise BadHost(
                f"Host {shown!r} is not a name this gateway serves (loopback names and "
                "addresses; others with --allow-host NAME): a page on another site "
                "must not reach it by pointing its own name here"
            )
        unsafe = scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS
        if not unsafe:
            return
        origins = headers.get("origin")
        if origins is not None:
            if len(origins) != 1 or not self._same_site(origins[0], host):
                raise CrossSite(
                    f"a change from the page at {origins[0][:_SHOWN]!r} is refused: only the "
                    "gateway's own pages (and origins given with --allow-origin) may change "
                    "state from a browser"
                )
        elif headers.get("sec-fetch-site", ["none"])[0].lower() in ("cross-site", "same-site"):
            raise CrossSite("a change sent by a page of another site is refused")
        if scope["type"] == "http" and (types := headers.get("content-type")):
            media = types[0].split(";", 1)[0].strip().lower()
            json = media == "application/json" or (
                media.startswith("application/") and media.endswith("+json")
            )
            curl = media == "application/x-www-form-urlencoded" and scope["method"] == "PATCH"
            if not (json or curl):
                raise UnsupportedMediaType(
                    f"a body of type {types[0][:_SHOWN]!r} is refused on a request that changes "
                    "state: send JSON with Content-Type: application/json (or no body)"
                )

    def _host(self, value: str) -> tuple[str, int | None] | None:
        """``Host`` split, if it names a host this gateway serves; else None. Remembered:
        a gateway sees the same few values on every request."""
        if value in self._hosts_seen:
            return self._hosts_seen[value]
        host = split_host(value)
        if host is not None and not self._serves(host[0]):
            host = None
        if len(self._hosts_seen) >= _HOSTS_REMEMBERED:  # anyone may send any Host
            self._hosts_seen.clear()
        self._hosts_seen[value] = host
        return host

    def _serves(self, name: str) -> bool:
        return self.any_host or is_loopback(name) or name in self.hosts

    def _same_site(self, origin: str, host: tuple[str, int | None]) -> bool:
        parsed = normalize_origin(origin)
        if parsed is None:  # "null": sandboxed frames, file:// pages
            return False
        if parsed in self.origins:
            return True
        scheme, name, port = parsed
        # the browser built Host from the same URL: its port defaults by the page's scheme
        return name == host[0] and port == (host[1] or _DEFAULT_PORT[scheme])


def _host_name(value: str) -> str | None:
    try:
        return str(ipaddress.ip_address(value.strip("[]")))  # "::1" as --host gives it
    except ValueError:
        found = split_host(value) if value else None
        return found[0] if found else None


def _is_wildcard(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_unspecified
    except ValueError:
        return False
