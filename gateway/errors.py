"""runctl's errors as HTTP answers: one mapping, one handler, and the body-size guard.

=====================  ======  ==================================================
error                  status  why
=====================  ======  ==================================================
ValidationRejected     422     the model refused the change; ``detail`` is pydantic's list
BadToken/Path/Request  400     the request names something that cannot exist
NotFound               404     no responders: known in milliseconds, never a timeout
PayloadTooLarge        413     never read, never echoed
TooLate                409     a rank was past the step of a synchronised change (retry)
Timeout                504     ``missing`` names the ranks that did not answer
Unavailable            503     NATS (or JetStream) cannot be reached
RemoteError            502     the agent failed while handling the command
=====================  ======  ==================================================

Every error body is ``{"error": code, "message": text, "detail": ...}``. FastAPI's own
422 for a malformed query echoes the input; ours summarises inputs over 200 characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from nats.errors import Error as NatsError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runctl.bus.errors import (
    BadPath,
    BadRequest,
    BadToken,
    NotFound,
    PayloadTooLarge,
    RemoteError,
    RunctlError,
    Timeout,
    TooLate,
    Unavailable,
    ValidationRejected,
    map_nats_error,
)
from runctl.gateway.ops import describe_error

__all__ = ["BodyLimit", "error_body", "install", "json_response", "preview", "status_of"]

log = structlog.get_logger()

_STATUS: Final[tuple[tuple[type[RunctlError], int], ...]] = (
    (ValidationRejected, 422),
    (BadToken, 400),
    (BadPath, 400),
    (BadRequest, 400),
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (TooLate, 409),
    (Timeout, 504),
    (Unavailable, 503),
    (RemoteError, 502),
)
PREVIEW_LIMIT: Final = 200
_encoder = msgspec.json.Encoder()


def status_of(exc: RunctlError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: RunctlError) -> dict[str, Any]:
    detail: Any = exc.errors if isinstance(exc, ValidationRejected) and exc.errors else str(exc)
    body: dict[str, Any] = {"error": exc.code, "message": describe_error(exc), "detail": detail}
    if isinstance(exc, Timeout):
        body["missing"] = exc.missing
    return body


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON through msgspec: values from the bus are plain data already."""
    return Response(_encoder.encode(data), status, headers, media_type="application/json")


async def _runctl_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RunctlError)
    status = status_of(exc)
    if status >= 500:
        log.warning(
            "request failed",
            method=request.method,
            path=request.url.path,
            status=status,
            error=str(exc),
        )
    headers = {"X-Runctl-Missing": ",".join(exc.missing)} if isinstance(exc, Timeout) else None
    return json_response(error_body(exc), status, headers)


def preview(value: Any, limit: int = PREVIEW_LIMIT) -> Any:
    """An input shown back in an error only when small."""
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


async def _request_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = summarise_errors(exc.errors())
    return json_response(
        {"error": "bad_request", "message": "invalid request", "detail": detail}, 422
    )


async def _bus_error(request: Request, exc: Exception) -> Response:
    """A nats-py error the client did not map itself (e.g. a registry read timing out)."""
    return await _runctl_error(request, map_nats_error(exc))


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (the body limit is a middleware: see BodyLimit)."""
    app.add_exception_handler(RunctlError, _runctl_error)
    app.add_exception_handler(NatsError, _bus_error)
    app.add_exception_handler(TimeoutError, _bus_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)


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
            await _send_error(send, PayloadTooLarge(declared, self.max_body))
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
            await _send_error(send, exc)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server itself rejects a malformed length
    return None


async def _send_error(send: Send, exc: RunctlError) -> None:
    body = _encoder.encode(error_body(exc))
    await send(
        {
            "type": "http.response.start",
            "status": status_of(exc),
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
