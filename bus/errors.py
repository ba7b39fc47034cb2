"""Every error runctl raises on purpose derives from :class:`RunctlError`.

::

    RunctlError
    ├── BadToken            a run id, rank, verb or step name that cannot be a subject token
    ├── BadPath             a dotted path that does not name a declared field (or dict key/index)
    ├── BadRequest          a malformed command (wrong JSON, wrong shape)
    ├── ValidationRejected  refused by pydantic; ``errors`` is its list; nothing changed
    ├── PayloadTooLarge     a message over the size limit (never echoed back)
    ├── NotFound            no such run or rank (no responders: known in milliseconds)
    ├── Unavailable         the bus cannot be reached, or the server could not start
    │   └── ServerStartError    nats-server exited; ``log_line`` is its own fatal line
    ├── Timeout             a rank did not answer in time; ``missing`` names who
    ├── TooLate             a deferred change arrived after the rank passed its step
    ├── CorruptArtifact     a stored step result or file is missing or fails its digest
    └── RemoteError         the agent failed unexpectedly while handling a command

nats-py's exceptions are mapped to these in one place, :func:`map_nats_error`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BadPath",
    "BadRequest",
    "BadToken",
    "CorruptArtifact",
    "NotFound",
    "PayloadTooLarge",
    "RemoteError",
    "RunctlError",
    "ServerStartError",
    "Timeout",
    "TooLate",
    "Unavailable",
    "ValidationRejected",
    "from_code",
    "map_nats_error",
]


class RunctlError(Exception):
    """Root of runctl's errors. ``code`` is the stable name used on the wire."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadToken(RunctlError, ValueError):
    code = "bad_token"

    def __init__(self, what: str, value: str, problem: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid {what} {shown!r}: {problem}")
        self.what = what
        self.value = value
        self.problem = problem


class BadPath(RunctlError, KeyError):
    code = "bad_path"

    def __init__(self, path: str, problem: str, message: str | None = None) -> None:
        shown = path if len(path) <= 200 else path[:197] + "..."
        super().__init__(message or f"invalid path {shown!r}: {problem}")
        self.path = path
        self.problem = problem

    def __str__(self) -> str:  # KeyError would quote the message again
        return self.message


class BadRequest(RunctlError, ValueError):
    code = "bad_request"


class ValidationRejected(RunctlError, ValueError):
    """The change was refused by the model's validation; the state is unchanged."""

    code = "validation"

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)


class PayloadTooLarge(RunctlError):
    code = "too_large"

    def __init__(self, size: int, limit: int, message: str | None = None) -> None:
        super().__init__(message or f"payload of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class NotFound(RunctlError, LookupError):
    code = "not_found"

    def __init__(self, run: str, rank: str | None = None, message: str | None = None) -> None:
        where = f"run {run!r}" if rank is None else f"rank {rank!r} of run {run!r}"
        super().__init__(message or f"no live {where}")
        self.run = run
        self.rank = rank


class Unavailable(RunctlError, ConnectionError):
    code = "unavailable"


class ServerStartError(Unavailable):
    def __init__(self, message: str, log_line: str = "") -> None:
        super().__init__(f"{message}: {log_line}" if log_line else message)
        self.log_line = log_line


class Timeout(RunctlError, TimeoutError):
    code = "timeout"

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


class TooLate(RunctlError):
    """A change deferred to ``at_step`` reached a rank already past that step."""

    code = "too_late"


class RemoteError(RunctlError):
    code = "internal"


class CorruptArtifact(RunctlError):
    """A step result or file in the object store is missing, replaced, or fails its digest.

    The step that stored it counts as not done, so it runs again.
    """

    code = "corrupt_artifact"

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"stored object {name!r} {problem}")
        self.name = name


_BY_CODE: dict[str, type[RunctlError]] = {
    cls.code: cls for cls in (BadRequest, RemoteError, RunctlError, TooLate)
}


def from_code(code: str, message: str, detail: Sequence[dict[str, Any]] = ()) -> RunctlError:
    """Rebuild an error an agent sent back in a reply."""
    if code == ValidationRejected.code:
        return ValidationRejected(message, detail)
    if code == BadPath.code:
        return BadPath("", message, message)
    if code == BadToken.code:
        return BadRequest(message)
    if code == PayloadTooLarge.code:
        return PayloadTooLarge(0, 0, message)
    return _BY_CODE.get(code, RemoteError)(message)


def map_nats_error(exc: BaseException, *, run: str = "", rank: str | None = None) -> RunctlError:
    """The one place nats-py exceptions become runctl errors."""
    from nats import errors as nats_errors

    if isinstance(exc, RunctlError):
        return exc
    if isinstance(exc, nats_errors.NoRespondersError):
        return NotFound(run, rank)
    if isinstance(exc, nats_errors.MaxPayloadError):
        return RunctlError(f"message over the server's max_payload: {exc}")
    if isinstance(exc, nats_errors.TimeoutError | TimeoutError):
        who = [rank] if rank is not None else []
        return Timeout(f"no answer from {_where(run, rank)} in time", who)
    if isinstance(
        exc,
        nats_errors.ConnectionClosedError
        | nats_errors.NoServersError
        | nats_errors.ConnectionDrainingError
        | nats_errors.StaleConnectionError
        | OSError,
    ):
        return Unavailable(f"NATS is not reachable: {exc or type(exc).__name__}")
    return RunctlError(f"{type(exc).__name__}: {exc}")


def _where(run: str, rank: str | None) -> str:
    return f"rank {rank!r} of run {run!r}" if rank is not None else f"run {run!r}"
