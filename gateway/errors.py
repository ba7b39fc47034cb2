"""runctl's errors as HTTP answers: one handler, one body shape, and the body-size guard.

Every error the gateway answers with (a route's, an auth check's, FastAPI's own request
validation, an unknown route, a nats-py failure) goes through :func:`as_error` to a class of
the one error tree (``runctl.bus.errors``), which carries its status. Every error body has
one shape::

    {"error": "<code>", "message": "<one line>", "detail": <pydantic's list, or the message>}

plus ``"missing": [ranks]`` for a timeout and ``"runs": [runs]`` for an ambiguous run.
``detail`` keeps FastAPI's meaning: for a request FastAPI refused it is its list (each
``loc`` starting with ``query``, ``path`` or ``body``), inputs over 200 characters
summarised rather than echoed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from nats.errors import Error as NatsError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runctl.bus.errors import (
    AmbiguousRun,
    BadRequest,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotAnObject,
    NotFound,
    PayloadTooLarge,
    RunctlError,
    Timeout,
    Unauthorized,
    map_nats_error,
)

__all__ = [
    "HANDLED",
    "BodyLimit",
    "as_error",
    "declares_body",
    "error_body",
    "handle_error",
    "install",
    "json_response",
    "preview",
    "send_error",
]

log = structlog.get_logger()

PREVIEW_LIMIT: Final = 200
_CHALLENGE: Final = 'Bearer realm="runctl"'
_encoder = msgspec.json.Encoder()


def as_error(exc: BaseException) -> RunctlError:
    """The one place any exception a request raised becomes a runctl error.

    >>> as_error(HTTPException(404)).http_status
    404
    """
    if isinstance(exc, RunctlError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidRequest("invalid request", summarise_errors(exc.errors()))
    if isinstance(exc, HTTPException):  # Starlette's own: an unknown route or method
        return _from_http(exc)
    if isinstance(exc, NatsError | TimeoutError):  # e.g. a registry read timing out
        return map_nats_error(exc)
    # a bug of ours: the same body shape, without the exception's text (it may hold input)
    return RunctlError(f"unexpected {type(exc).__name__} in the gateway (see its log)")


def _from_http(exc: HTTPException) -> RunctlError:
    message = str(exc.detail)
    if exc.status_code == 404:
        return NotFound("", message=message)
    if exc.status_code == 405:
        return MethodNotAllowed(message)
    if exc.status_code == 401:
        return Unauthorized(message)
    if exc.status_code == 403:
        return Forbidden(message)
    error = BadRequest(message) if exc.status_code < 500 else RunctlError(message)
    error.http_status = exc.status_code  # whatever else Starlette answers, kept as it was
    return error


def error_body(exc: RunctlError) -> dict[str, Any]:
    """The one HTTP error body: ``{"error": code, "message": line, "detail": ...}``."""
    body: dict[str, Any] = {"error": exc.code, "message": exc.describe(), "detail": exc.detail}
    if isinstance(exc, Timeout):
        body["missing"] = exc.missing
    if isinstance(exc, AmbiguousRun):
        body["runs"] = exc.runs
    return body


def error_headers(exc: RunctlError) -> dict[str, str] | None:
    """Headers that go with an error: who did not answer, or how to authenticate."""
    if isinstance(exc, Timeout):
        return {"X-Runctl-Missing": ",".join(exc.missing)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": _CHALLENGE}
    if isinstance(exc, NotAnObject):  # a value is set (PUT), only objects merge (PATCH)
        return {"Allow": "PUT"}
    return None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON through msgspec: values from the bus are plain data already."""
    return Response(_encoder.encode(data), status, headers, media_type="application/json")


async def handle_error(request: Request, exc: Exception) -> Response:
    """The gateway's one exception handler (also the fast path's: gateway/hot.py)."""
    error = as_error(exc)
    status = error.http_status
    if status >= 500:
        log.warning(
            "request failed",
            method=request.method,
            path=request.url.path,
            status=status,
            error=str(error),
        )
    return json_response(error_body(error), status, error_headers(error))


def preview(value: Any, limit: int = PREVIEW_LIMIT) -> Any:
    """An input shown back in an error only when small.

    >>> preview("x" * 300, 5)
    'xxxxx... (300 chars)'
    """
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"
    try:
        size = len(_encoder.encode(value))
    except (TypeError, ValueError, msgspec.EncodeError):
        return f"<{type(value).__name__}>"
    return value if size <= limit else f"<{type(value).__name__} of {size} bytes>"


def _plain(value: Any) -> Any:
    return value if value is None or isinstance(value, str | bool | int | float) else str(value)


def summarise_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """pydantic's error list with inputs (and context values) cut to a preview."""
    out = []
    for err in errors:
        item = {k: v for k, v in dict(err).items() if k not in ("input", "ctx", "url")}
        item["loc"] = list(err.get("loc", ()))
        if "input" in err:
            item["input"] = preview(err["input"])
        if ctx := err.get("ctx"):
            item["ctx"] = {k: preview(_plain(v)) for k, v in ctx.items()}
        out.append(item)
    return out


#: what a route may raise that :func:`handle_error` answers as a client or bus error (anything
#: else is a bug: answered too, and logged with its traceback)
HANDLED: Final = (RunctlError, RequestValidationError, HTTPException, NatsError, TimeoutError)


def install(app: FastAPI) -> None:
    """Register the one handler on ``app`` for every kind of error a request can raise
    (the body limit is a middleware: see BodyLimit)."""
    for kind in HANDLED:
        app.add_exception_handler(kind, handle_error)
    # Starlette answers with this one and still re-raises, so the traceback is logged
    app.add_exception_handler(Exception, handle_error)


class BodyLimit:
    """Refuse request bodies over ``max_body`` bytes with 413, without reading them.

    A declared ``Content-Length`` over the limit is answered before any byte of the body
    is read; a streamed (chunked) body is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await send_error(send, PayloadTooLarge(declared, self.max_body))
            return
        if not declares_body(scope):  # nothing to count (the common GET, a ?value= set)
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise PayloadTooLarge(received, self.max_body)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except PayloadTooLarge as exc:  # read outside a route (no handler saw it)
            if started:
                raise
            await send_error(send, exc)


def declares_body(scope: Scope) -> bool:
    """Whether the request says it has a body: a ``Transfer-Encoding``, or a
    ``Content-Length`` other than 0. HTTP/1.x has no other way to send one, so a request
    without either has an empty body, known without reading it. Under HTTP/2 and later a
    body needs neither header: such a request always counts as having one."""
    if scope.get("http_version", "1.1") not in ("1.0", "1.1"):
        return True
    for name, header in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and header.strip() != b"0"):
            return True
    return False


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself rejects a malformed length
    return None


async def send_error(send: Send, exc: RunctlError) -> None:
    """Answer ``exc`` from an ASGI middleware (before any route: the one body shape)."""
    body = _encoder.encode(error_body(exc))
    await send(
        {
            "type": "http.response.start",
            "status": exc.http_status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
