"""Every error runctl raises on purpose derives from :class:`RunctlError` (one tree, kept in
one module on purpose: this file is the table every surface reads).

Each class carries what every surface needs: ``code`` (the stable name on the wire and in
HTTP bodies), ``http_status`` (the gateway's answer) and ``exit_code`` (the CLI's)::

    RunctlError                  code             HTTP exit
    ├── BadToken                 bad_token         400  2  a name that cannot be a subject token
    ├── BadPath                  bad_path          400  2  a dotted path that cannot name a field
    │   ├── UnknownPath          unknown_path      404  3  a path that names nothing in the state
    │   └── NotAnObject          not_an_object     405  2  a merge into a value that is no object
    ├── BadRequest               bad_request       400  2  a malformed command or request
    │   ├── InvalidRequest       bad_request       422  2  an HTTP request FastAPI refused
    │   ├── BadHost              bad_host          400  2  a Host name the gateway does not serve
    │   └── UnsupportedMediaType unsupported_m...  415  2  a state-changing body that is not JSON
    ├── ValidationRejected       validation        422  4  the model refused it; nothing changed
    ├── PayloadTooLarge          too_large         413  2  over the size limit (never echoed)
    ├── NotFound                 not_found         404  3  no such run or rank (no responders)
    ├── Unauthorized             unauthorized      401  2  no bearer token, or an unknown one
    ├── Forbidden                forbidden         403  2  the token's role is too low
    │   └── CrossSite            cross_site        403  2  a change sent by another site's page
    ├── MethodNotAllowed         method_not_al...  405  2  a route without that method
    ├── TooLate                  too_late          409  1  a deferred change came after its step
    ├── Conflict                 conflict          409  1  an undo of fields changed again since
    ├── AmbiguousRun             ambiguous_run     409  2  no run named, several live (``runs``)
    ├── Unavailable              unavailable       503  5  the bus cannot be reached
    │   ├── ServerStartError     unavailable       503  5  nats-server exited (``log_line``)
    │   └── TlsError             tls               503  5  TLS failed, or a plain server refused
    ├── Timeout                  timeout           504  5  a rank did not answer (``missing``)
    ├── RemoteError              internal          502  1  the agent failed handling a command
    ├── UnreadableRecord         unreadable_rec... 502  1  a registry record that cannot be decoded
    ├── CorruptArtifact          corrupt_artifact  500  1  a stored result fails its digest
    └── SetupError               setup             500  2  runctl's own setup is wrong
        ├── CredentialsError     credentials       500  2  NATS passwords, role files
        ├── TokenError           bad_tokens        500  2  the gateway's tokens setting
        └── InsecureBind         insecure_bind     500  2  an open gateway beyond loopback

The mapping to each surface is done once: the gateway's exception handler answers
``error.http_status`` with :func:`runctl.gateway.errors.error_body`; the CLI exits with
``error.exit_code`` and prints :meth:`RunctlError.describe`. nats-py's exceptions become
these errors in one place, :func:`map_nats_error`.

>>> NotFound("exp1", "3").http_status, NotFound("exp1", "3").exit_code
(404, 3)

Why one module of this size: the tree is one table (the diagram above), read by every
surface; split over files, a new class could no longer be checked against its siblings'
codes, statuses and exit codes at a glance.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from typing import Any, Final

from runctl.bus.tlserrors import describe_ssl_error

__all__ = [
    "EXIT_ERROR",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_REJECTED",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "AmbiguousRun",
    "BadHost",
    "BadPath",
    "BadRequest",
    "BadToken",
    "Conflict",
    "CorruptArtifact",
    "CredentialsError",
    "CrossSite",
    "Forbidden",
    "InsecureBind",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotAnObject",
    "NotFound",
    "PayloadTooLarge",
    "RemoteError",
    "RunctlError",
    "ServerStartError",
    "SetupError",
    "Timeout",
    "TlsError",
    "TokenError",
    "TooLate",
    "Unauthorized",
    "Unavailable",
    "UnknownPath",
    "UnreadableRecord",
    "UnsupportedMediaType",
    "ValidationRejected",
    "describe_validation",
    "from_code",
    "map_nats_error",
]

#: the CLI's exit codes (``runctl --help`` lists them)
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_REJECTED: Final = 4
EXIT_UNAVAILABLE: Final = 5


class RunctlError(Exception):
    """Root of runctl's errors: ``code`` is the stable name used on the wire,
    ``http_status`` the gateway's status for it and ``exit_code`` the CLI's.

    >>> err = RunctlError("something broke")
    >>> (err.code, err.http_status, err.exit_code, err.describe())
    ('error', 500, 1, 'something broke')
    """

    code: str = "error"
    http_status: int = 500
    exit_code: int = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def describe(self) -> str:
        """The error in one line, as the CLI prints it and HTTP bodies carry as ``message``."""
        return str(self)

    @property
    def detail(self) -> Any:
        """What an HTTP body carries as ``detail``: pydantic's error list where there is one,
        else the message (FastAPI's own ``{"detail": ...}`` keeps working for readers)."""
        return str(self)


class BadToken(RunctlError, ValueError):
    """A run id, rank, verb or step name that cannot be a NATS subject token."""

    code = "bad_token"
    http_status = 400
    exit_code = EXIT_USAGE

    def __init__(self, what: str, value: str, problem: str) -> None:
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid {what} {shown!r}: {problem}")
        self.what = what
        self.value = value
        self.problem = problem


class BadPath(RunctlError, KeyError):
    """A dotted path that does not name a declared field (or a dict key, a list index)."""

    code = "bad_path"
    http_status = 400
    exit_code = EXIT_USAGE

    def __init__(self, path: str, problem: str, message: str | None = None) -> None:
        shown = path if len(path) <= 200 else path[:197] + "..."
        super().__init__(message or f"invalid path {shown!r}: {problem}")
        self.path = path
        self.problem = problem

    def __str__(self) -> str:  # KeyError would quote the message again
        return self.message


class UnknownPath(BadPath):
    """A well-formed path that names nothing: no such field, key or index (HTTP 404, as
    Freak answered for a route that did not exist)."""

    code = "unknown_path"
    http_status = 404
    exit_code = EXIT_NOT_FOUND


class NotAnObject(BadPath):
    """A merge (patch) into a value that is not an object: a number, a string, a list.
    Set it instead (HTTP 405: Freak had no PATCH route for such a field, only PUT)."""

    code = "not_an_object"
    http_status = 405
    exit_code = EXIT_USAGE


class BadRequest(RunctlError, ValueError):
    """A malformed command or request (wrong JSON, wrong shape, options that conflict)."""

    code = "bad_request"
    http_status = 400
    exit_code = EXIT_USAGE


class InvalidRequest(BadRequest):
    """An HTTP request whose parameters did not validate (FastAPI's own check, before any
    route ran). ``errors`` is pydantic's list, each ``loc`` starting with where the input
    was (``query``, ``path``, ``body``), inputs summarised."""

    http_status = 422

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)

    @property
    def detail(self) -> Any:
        """pydantic's list, each ``loc`` starting with ``query``, ``path`` or ``body``."""
        return self.errors


class ValidationRejected(RunctlError, ValueError):
    """The change was refused by the model's validation; the state is unchanged.

    ``errors`` is pydantic's error list (``loc``, ``msg``, ``type``).
    """

    code = "validation"
    http_status = 422
    exit_code = EXIT_REJECTED

    def __init__(self, message: str, errors: Sequence[dict[str, Any]] = ()) -> None:
        super().__init__(message)
        self.errors = list(errors)

    def describe(self) -> str:
        """Each refused field in one line: ``invalid value for opt.kind: Input should be
        'sgd' or 'adam'``."""
        return describe_validation(self.errors) if self.errors else str(self)

    @property
    def detail(self) -> Any:
        """pydantic's error list (the message when there is none)."""
        return self.errors or str(self)


class PayloadTooLarge(RunctlError):
    """A message over the size limit; its content is never read into an answer."""

    code = "too_large"
    http_status = 413
    exit_code = EXIT_USAGE

    def __init__(self, size: int, limit: int, message: str | None = None) -> None:
        super().__init__(message or f"payload of {size} bytes is over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class NotFound(RunctlError, LookupError):
    """No such run or rank: NATS said nobody listens (known in milliseconds, no timeout)."""

    code = "not_found"
    http_status = 404
    exit_code = EXIT_NOT_FOUND

    def __init__(self, run: str, rank: str | None = None, message: str | None = None) -> None:
        where = f"run {run!r}" if rank is None else f"rank {rank!r} of run {run!r}"
        super().__init__(message or f"no live {where}")
        self.run = run
        self.rank = rank


class BadHost(BadRequest):
    """The ``Host`` of an HTTP request is not a name the gateway serves: what a DNS
    rebinding page sends (its own name, now pointing at the gateway's address)."""

    code = "bad_host"


class UnsupportedMediaType(BadRequest):
    """A state-changing request whose body is not JSON (``text/plain`` and forms are what a
    page on another site can send without asking the browser first)."""

    code = "unsupported_media_type"
    http_status = 415


class Unauthorized(RunctlError):
    """The gateway needs a bearer token and got none, or one it does not know."""

    code = "unauthorized"
    http_status = 401
    exit_code = EXIT_USAGE


class Forbidden(RunctlError):
    """The bearer token's role is below what the route needs."""

    code = "forbidden"
    http_status = 403
    exit_code = EXIT_USAGE


class CrossSite(Forbidden):
    """A state-changing request from a page of another origin (``Origin``, or the
    browser's ``Sec-Fetch-Site``): refused whatever token it carries."""

    code = "cross_site"


class MethodNotAllowed(RunctlError):
    """An HTTP route that exists, asked with a method it does not have."""

    code = "method_not_allowed"
    http_status = 405
    exit_code = EXIT_USAGE


class AmbiguousRun(RunctlError):
    """A request that names no run while several are live; ``runs`` names them."""

    code = "ambiguous_run"
    http_status = 409
    exit_code = EXIT_USAGE

    def __init__(self, runs: Sequence[str]) -> None:
        shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
        super().__init__(
            f"{len(runs)} live runs ({shown}): name one (/runs/RUN/ranks/RANK/..., or start "
            "the gateway with --run RUN)"
        )
        self.runs = list(runs)


class Unavailable(RunctlError, ConnectionError):
    """The bus (NATS, JetStream) cannot be reached, or the server could not start."""

    code = "unavailable"
    http_status = 503
    exit_code = EXIT_UNAVAILABLE


class ServerStartError(Unavailable):
    """nats-server exited during start; ``log_line`` is its own fatal line."""

    def __init__(self, message: str, log_line: str = "") -> None:
        super().__init__(f"{message}: {log_line}" if log_line else message)
        self.log_line = log_line


class TlsError(Unavailable):
    """The server's certificate did not verify (wrong CA, expired, wrong host name), the
    handshake failed, or TLS is configured and the server offered a plain connection
    (refused before any password is sent)."""

    code = "tls"


class Timeout(RunctlError, TimeoutError):
    """A rank did not answer in time; ``missing`` names the ranks that stayed silent."""

    code = "timeout"
    http_status = 504
    exit_code = EXIT_UNAVAILABLE

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


class TooLate(RunctlError):
    """A change deferred to ``at_step`` reached a rank already past that step (retry)."""

    code = "too_late"
    http_status = 409


class Conflict(RunctlError):
    """An undo refused: a later change touched the same fields (``force`` overrides)."""

    code = "conflict"
    http_status = 409


class RemoteError(RunctlError):
    """The agent failed unexpectedly while handling a command."""

    code = "internal"
    http_status = 502


class UnreadableRecord(RunctlError):
    """A registry record that cannot be decoded (written by another version, by hand, or
    by a bug). Reported where it is read; a listing skips it and names it instead."""

    code = "unreadable_record"
    http_status = 502

    def __init__(self, key: str, problem: str) -> None:
        shown = problem if len(problem) <= 200 else problem[:197] + "..."
        super().__init__(f"the registry's record {key!r} cannot be read: {shown}")
        self.key = key
        self.problem = shown


class SetupError(RunctlError):
    """runctl's own setup is wrong (a file, a setting): fix it and start again."""

    code = "setup"
    exit_code = EXIT_USAGE


class CredentialsError(SetupError, RuntimeError):
    """Missing or unreadable NATS credentials (``runctl up``'s role files, environment)."""

    code = "credentials"


class TokenError(SetupError, ValueError):
    """A malformed gateway tokens setting. The message names the place, never the token."""

    code = "bad_tokens"


class InsecureBind(SetupError, RuntimeError):
    """The gateway was asked to listen beyond loopback with no token configured, or with
    tokens but neither TLS nor --allow-plain-http."""

    code = "insecure_bind"


def describe_validation(errors: Sequence[dict[str, Any]]) -> str:
    """``invalid value for opt.kind: Input should be 'sgd' or 'adam'`` (joined by ``; ``).
    An error's ``field`` (its place in the state, where ``loc`` says where in an HTTP
    request the input was) names it when present.

    >>> describe_validation([{"loc": ["opt", "kind"], "msg": "Input should be 'sgd'"}])
    "invalid value for opt.kind: Input should be 'sgd'"
    """
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("field", err.get("loc", ()))) or "the state"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc}: {msg}")
        else:
            parts.append(f"invalid value for {loc}: {msg}")
    return "; ".join(parts)


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
    """Rebuild an error an agent sent back in a reply (``code``, ``message``, ``detail``)."""
    if code == ValidationRejected.code:
        return ValidationRejected(message, detail)
    for path_error in (BadPath, UnknownPath, NotAnObject):
        if code == path_error.code:
            return path_error("", message, message)
    if code == BadToken.code:
        return BadRequest(message)
    if code == PayloadTooLarge.code:
        return PayloadTooLarge(0, 0, message)
    return _BY_CODE.get(code, RemoteError)(message)


def map_nats_error(exc: BaseException, *, run: str = "", rank: str | None = None) -> RunctlError:
    """The one place nats-py exceptions become runctl errors (a runctl error is returned
    as it is)."""
    from nats import errors as nats_errors

    if isinstance(exc, RunctlError):
        return exc
    if isinstance(exc, ssl.SSLError):  # before OSError: it is one
        return TlsError(describe_ssl_error(exc))
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
