"""The requests a control loop sends all the time, answered before FastAPI's router.

A plain read or a ``?value=`` set spends about a third of its time in the gateway in
FastAPI's routing and parameter machinery (docs/performance.md). These few shapes are
recognised here and handed to the very functions the routes call (:mod:`runctl.gateway.routes`,
:mod:`runctl.gateway.freak`), with the same login check and the same error handler:

- ``GET /get``, ``GET /get/{path}`` (Freak's reads), ``PUT /set/{path}?value=...``
- ``GET /runs/{run}/ranks/{rank}/get[/{path}]``,
  ``PUT /runs/{run}/ranks/{rank}/set/{path}?value=...``

Only the plainest form is taken: no query string on a read, exactly one ``value`` on a set,
no request body, names made of letters, digits and ``_ . -`` (``/`` too in a path). Any
other request -- a body, ``?fresh=``, ``?sync=``, an odd character, a prefix
(``root_path``) -- goes to FastAPI as before, which answers it the one way it always did.

``Settings.fast_path=False`` (or ``RUNCTL_GATEWAY_FAST_PATH=off``) sends everything to FastAPI, to
compare the two.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runctl.bus.client import Client
from runctl.gateway import freak, routes
from runctl.gateway.auth import authorize, required_role, tokens_of
from runctl.gateway.errors import HANDLED, declares_body, handle_error

__all__ = ["ROUTES", "HotRoutes"]

_NAME = r"[A-Za-z0-9_.\-]{1,128}"
_PATH = r"[A-Za-z0-9_.\-][A-Za-z0-9_.\-/]{0,1023}"

Handler = Callable[[Request, Client, Mapping[str, str], str | None], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    #: the FastAPI route's template: what the login check reads the needed role from
    template: str
    handler: Handler
    takes_value: bool


async def _freak_get(
    request: Request, client: Client, params: Mapping[str, str], value: str | None
) -> Response:
    return await freak.read_at_root(request, client, params.get("path"), False)


async def _freak_set(
    request: Request, client: Client, params: Mapping[str, str], value: str | None
) -> Response:
    return await freak.set_at_root(request, client, params["path"], value)


async def _get(
    request: Request, client: Client, params: Mapping[str, str], value: str | None
) -> Response:
    return await routes.read(client, params["run"], params["rank"], params.get("path"), False)


async def _set(
    request: Request, client: Client, params: Mapping[str, str], value: str | None
) -> Response:
    run, rank, path = params["run"], params["rank"], params["path"]
    return await routes.set_answer(client, request, run, rank, path, value, {})


_R = f"/runs/(?P<run>{_NAME})/ranks/(?P<rank>{_NAME})"
ROUTES: Final = (
    _Route("GET", re.compile("/get"), "/get", _freak_get, False),
    _Route("GET", re.compile(f"/get/(?P<path>{_PATH})"), "/get/{path:path}", _freak_get, False),
    _Route("PUT", re.compile(f"/set/(?P<path>{_PATH})"), "/set/{path:path}", _freak_set, True),
    _Route("GET", re.compile(f"{_R}/get"), routes.R + "/get", _get, False),
    _Route(
        "GET", re.compile(f"{_R}/get/(?P<path>{_PATH})"), routes.R + "/get/{path:path}", _get, False
    ),
    _Route(
        "PUT", re.compile(f"{_R}/set/(?P<path>{_PATH})"), routes.R + "/set/{path:path}", _set, True
    ),
)


class HotRoutes:
    """ASGI middleware: the plain reads and sets above, straight to their implementation;
    everything else to ``app``. Sits inside the site guard and the body limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _match(scope) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        route, params, value = found
        request = Request(scope, receive)
        try:
            authorize(tokens_of(request), request, required_role(route.method, route.template))
            client = await routes.get_client(request)
            response = await route.handler(request, client, params, value)
        except HANDLED as exc:  # as the routes' handlers answer them (gateway/errors.py)
            response = await handle_error(request, exc)
        await response(scope, receive, send)


def _match(scope: Scope) -> tuple[_Route, dict[str, str], str | None] | None:
    """The route ``scope`` is a plain request of, its path parameters and ``?value=``."""
    method = scope["method"]
    if method not in ("GET", "PUT") or scope.get("root_path") or declares_body(scope):
        return None
    path: str = scope["path"]
    query: bytes = scope.get("query_string", b"")
    for route in ROUTES:
        matched = route.pattern.fullmatch(path) if route.method == method else None
        if matched is None:
            continue
        params = {k: v for k, v in matched.groupdict().items() if v is not None}
        if not route.takes_value:
            return None if query else (route, params, None)
        value = _only_value(query)
        return None if value is None else (route, params, value)
    return None


def _only_value(query: bytes) -> str | None:
    """The value of a query string that is exactly one ``value=...``; else None."""
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)  # as Starlette reads it
    if len(pairs) != 1 or pairs[0][0] != "value":
        return None
    value: str = pairs[0][1]
    return value
