"""How a write request's input reaches the rank, and how a rejection points back at it.

``PUT .../set/{path}`` takes the value in a JSON body (Freak's only form for list and dict
fields) or as ``?value=`` text; with both, the body wins, as in Freak. The text goes as
typed and the rank reads it knowing its model (JSON if the field takes it, else the text).

A rejection keeps pydantic's list in ``detail`` with FastAPI's locations, as Freak's
clients parse them: each ``loc`` starts where the input came from (``["query", "value"]``
or ``["body"]``) followed by the place inside that input; ``field`` beside it is the
location in the state (``["optimizer", "lr"]``).
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from starlette.requests import Request

from runctl.bus import jsonform
from runctl.bus.client import Client, Gathered, Result
from runctl.bus.errors import InvalidRequest, RunctlError, ValidationRejected
from runctl.bus.paths import split_path
from runctl.gateway.errors import declares_body

__all__ = ["SET_BODY", "locate", "read_json_body", "set_from_request"]

SET_BODY: Final = {
    "requestBody": {
        "required": False,
        "description": "the value as JSON (wins over `?value=`); needed for lists and objects",
        "content": {"application/json": {"schema": {}, "example": [1, 2, 3]}},
    }
}
QUERY: Final = ("query", "value")
BODY: Final = ("body",)


async def read_json_body(request: Request) -> tuple[bool, Any]:
    """``(False, None)`` for an empty body, else ``(True, value)``; a body that is not JSON
    is refused as FastAPI refuses it (422, ``loc`` ``["body", position]``)."""
    if not declares_body(request.scope):  # no need to wait for an empty body
        return False, None
    raw = await request.body()  # size-capped by the BodyLimit middleware
    if not raw.strip():
        return False, None
    try:  # invalid UTF-8 and 100k-deep nesting are BadRequest (400) from jsonform
        return True, jsonform.decode(raw, "the request body")
    except msgspec.DecodeError as exc:
        error = {"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error"}
        raise InvalidRequest(f"the request body is not valid JSON: {exc}", [error]) from None


async def set_from_request(
    client: Client,
    request: Request,
    run: str,
    rank: str,
    path: str,
    value: str | None,
    options: dict[str, Any],
) -> Result | Gathered:
    """``PUT .../set/{path}``: the JSON body if there is one, else ``?value=`` as typed."""
    has_body, body = await read_json_body(request)
    if has_body:
        return await located(client.set(run, rank, path, body, **options), BODY, path)
    if value is None:
        missing = {"type": "missing", "loc": list(QUERY), "msg": "Field required", "input": None}
        raise InvalidRequest("a value is needed: ?value=... or a JSON body", [missing])
    return await located(client.set_text(run, rank, path, value, **options), QUERY, path)


async def located(write: Any, source: tuple[str, ...], path: str | None) -> Result | Gathered:
    """Await ``write``; its rejections (raised, or per rank) located in the request."""
    try:
        result: Result | Gathered = await write
    except ValidationRejected as exc:
        raise locate(exc, source, path) from None
    if isinstance(result, Gathered):
        for rank, err in list(result.errors.items()):
            result.errors[rank] = _locate_any(err, source, path)
    return result


def _locate_any(err: RunctlError, source: tuple[str, ...], path: str | None) -> RunctlError:
    return locate(err, source, path) if isinstance(err, ValidationRejected) else err


def locate(
    exc: ValidationRejected, source: tuple[str, ...], path: str | None
) -> ValidationRejected:
    """``exc`` with each error's ``loc`` in the request (module docs)."""
    base = split_path(path or "")
    errors = []
    for err in exc.errors:
        loc = list(err.get("loc", ()))
        rest = loc[len(base) :] if [str(p) for p in loc[: len(base)]] == base else []
        errors.append({**err, "loc": [*source, *rest], "field": loc})
    return ValidationRejected(exc.message, errors)
