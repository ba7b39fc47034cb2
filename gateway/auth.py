"""Bearer tokens for the HTTP gateway: who may read, change, or stop (docs/security.md).

Roles are ordered ``read < write < admin``; a route needs one of them:

* ``read``  every ``GET`` (state, ranks, schema, step log)
* ``write`` changes a program can take back: set, patch, reset (also synchronised)
* ``admin`` what cannot be taken back: stop (a stopped training does not restart itself)
  and forgetting steps (``DELETE .../steps``: their work is recomputed)

Tokens come from ``RUNCTL_GATEWAY_TOKENS`` (``admin:TOKEN,read:TOKEN2``) and/or a tokens
file (one ``role token`` per line). Only SHA-256 digests are kept; a presented token is
compared with every configured digest by :func:`hmac.compare_digest`, without stopping at
the first match, so neither the timing nor the outcome says which token (or how much of one)
matched. No token ever appears in a log line, an error message or a ``repr``.

With no token configured the gateway is open, which is allowed only on a loopback address:
:func:`check_bind` refuses anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast

import structlog
from starlette.requests import HTTPConnection

# the classes live in the one error tree; importable from here too, where they are raised
from runctl.bus.client import ACTING_AS
from runctl.bus.errors import Forbidden, InsecureBind, TokenError, Unauthorized
from runctl.bus.messages import Author
from runctl.bus.tls import is_loopback

__all__ = [
    "MIN_TOKEN_LENGTH",
    "ROLES",
    "TOKENS_ENV",
    "InsecureBind",
    "Role",
    "TokenError",
    "TokenTable",
    "authorize",
    "check_bind",
    "generate_tokens_file",
    "is_loopback",
    "load_tokens",
    "parse_env",
    "parse_file",
    "require",
    "required_role",
    "tokens_of",
]

Role = Literal["read", "write", "admin"]
ROLES: Final[tuple[Role, ...]] = ("read", "write", "admin")
_RANK: Final[Mapping[str, int]] = {role: i for i, role in enumerate(ROLES)}
#: configured tokens shorter than this are refused: a guessable token is no token
MIN_TOKEN_LENGTH: Final = 16
#: the tokens the gateway accepts
TOKENS_ENV: Final = "RUNCTL_GATEWAY_TOKENS"
#: ``role token [name]`` or ``role:token [name]``: the role ends at the first blank or colon
_FILE_LINE: Final = re.compile(r"([A-Za-z]+)(?:\s*:\s*|\s+)(\S+)(?:\s+(.+))?")
#: a token's name: who holds it, shown in the change journal (never the token itself)
_NAME: Final = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")

log = structlog.get_logger()


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class TokenTable:
    """The configured tokens as (digest, role) pairs. Empty means authentication is off.
    ``names``: each digest's name (who holds the token: the change journal records it)."""

    entries: tuple[tuple[bytes, Role], ...] = ()
    names: tuple[tuple[bytes, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __repr__(self) -> str:  # never the digests either: they identify tokens
        counts = {role: sum(1 for _, r in self.entries if r == role) for role in ROLES}
        return f"TokenTable({', '.join(f'{r}={n}' for r, n in counts.items() if n)})"

    @classmethod
    def of(
        cls,
        entries: Iterable[tuple[str, str, str] | tuple[str, str, str, str]],
        *,
        where: str = "tokens",
    ) -> TokenTable:
        """``entries``: (label, role, token[, name]) tuples; the label ("line 3") names a bad
        one. A token without a name is called ``<role>-<label>`` (``admin-line-3``)."""
        roles: dict[bytes, Role] = {}
        names: dict[bytes, str] = {}
        for label, role, token, *named in entries:
            if role not in _RANK:
                raise TokenError(
                    f"{where}: {label}: unknown role {role!r} (roles: {', '.join(ROLES)})"
                )
            if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
                raise TokenError(
                    f"{where}: {label} ({role}): a token must be at least "
                    f"{MIN_TOKEN_LENGTH} characters without spaces "
                    "(generate one: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            name = named[0].strip() if named and named[0] else f"{role}-{label.replace(' ', '-')}"
            if not _NAME.fullmatch(name):
                raise TokenError(
                    f"{where}: {label}: a token's name is up to 64 letters, digits or _.@+-"
                )
            digest = _digest(token)
            if roles.setdefault(digest, cast(Role, role)) != role:
                raise TokenError(f"{where}: {label}: the same token is given two roles")
            names.setdefault(digest, name)
        return cls(tuple(roles.items()), tuple(names.items()))

    def role_of(self, token: str | None) -> Role | None:
        """The role of ``token``, or None. Compares with every entry (no early exit)."""
        found = self.identify(token)
        return found[0] if found is not None else None

    def identify(self, token: str | None) -> tuple[Role, str] | None:
        """The role and name of ``token``, or None. Compares with every entry (no early
        exit), so the timing does not say which token matched."""
        if not token:
            return None
        presented = _digest(token)
        found: bytes | None = None
        for digest, _ in self.entries:
            if hmac.compare_digest(presented, digest):
                found = digest
        if found is None:
            return None
        return dict(self.entries)[found], dict(self.names).get(found, "")

    def merged(self, other: TokenTable) -> TokenTable:
        """Both tables in one (``TokenError`` if a token has a different role in each)."""
        roles: dict[bytes, Role] = {}
        for digest, role in (*self.entries, *other.entries):
            if roles.setdefault(digest, role) != role:
                raise TokenError("the same token is given two roles (environment and file)")
        names = dict(other.names) | dict(self.names)
        return TokenTable(tuple(roles.items()), tuple(names.items()))


def parse_env(value: str) -> TokenTable:
    """``admin:TOKEN1,read:TOKEN2``, each optionally named ``alice=admin:TOKEN1`` (spaces
    around entries are ignored)."""
    entries: list[tuple[str, str, str, str]] = []
    for i, item in enumerate((p.strip() for p in value.split(",")), 1):
        if not item:
            continue
        role, sep, token = item.partition(":")
        if not sep:
            raise TokenError(f"{TOKENS_ENV}: entry {i}: expected role:token (or name=role:token)")
        name, eq, role = role.rpartition("=")
        entries.append((f"entry {i}", role.strip(), token.strip(), name.strip() if eq else ""))
    return TokenTable.of(entries, where=TOKENS_ENV)


def parse_file(path: str | os.PathLike[str]) -> TokenTable:
    """One ``role token [name]`` (or ``role:token [name]``) per line; ``#`` starts a
    comment. The name says who holds the token (the change journal records it)."""
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise TokenError(f"tokens file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "tokens file is readable by other users: chmod 600 it",
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
        )
    entries: list[tuple[str, str, str, str]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _FILE_LINE.fullmatch(line)
        if match is None:
            raise TokenError(f"tokens file {path}: line {n}: expected 'role token [name]'")
        entries.append((f"line {n}", match.group(1), match.group(2), match.group(3) or ""))
    return TokenTable.of(entries, where=f"tokens file {path}")


def load_tokens(
    tokens_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> TokenTable:
    """Tokens from ``RUNCTL_GATEWAY_TOKENS`` and ``tokens_file`` together."""
    env = os.environ if env is None else env
    table = parse_env(env.get(TOKENS_ENV, ""))
    if tokens_file:
        table = table.merged(parse_file(tokens_file))
    return table


def check_bind(
    host: str, tokens: TokenTable, *, tls: bool = False, allow_plain: bool = False
) -> None:
    """Refuse to serve an unauthenticated gateway beyond loopback, and bearer tokens over
    plain HTTP beyond loopback unless ``allow_plain`` (TLS ends in a proxy in front)."""
    if is_loopback(host):
        return
    if not tokens:
        raise InsecureBind(
            f"refusing to listen on {host} without authentication: anyone who can reach it "
            f"could change or stop your runs. Configure tokens ({TOKENS_ENV}=admin:<token> "
            "or --tokens-file FILE; `runctl tokens` generates a file), or listen on "
            "127.0.0.1. See docs/security.md."
        )
    if not tls and not allow_plain:
        raise InsecureBind(
            f"refusing to take bearer tokens over plain HTTP on {host}: anyone on the way "
            "reads them. Serve HTTPS (--tls-cert FILE --tls-key FILE; `runctl up --tls` "
            "writes .runctl/tls/server.pem and server-key.pem), or, when a proxy in front "
            "terminates TLS, pass --allow-plain-http. See docs/security.md."
        )


# --- which role a request needs ---------------------------------------------------------

_READ_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
#: a change on these cannot be taken back: stop, and forgetting steps (DELETE .../steps)
_ADMIN_SEGMENTS: Final = frozenset({"stop", "steps"})
#: the DELETE routes that are ordinary changes (Freak's ``DELETE /reset``)
_WRITE_DELETES: Final = frozenset({"reset"})


def required_role(method: str, path: str) -> Role:
    """The least role for ``method`` on ``path``: a route template (``/runs/{run}/...``, so
    a run or a field named "stop" is not mistaken for the route) or a concrete path.

    Reads need ``read``; stop and anything on the step log but reading it need ``admin``;
    other changes ``write``. Deny by default: a ``DELETE`` not known to be a reset needs
    ``admin``, any other method ``write``.
    """
    method = method.upper()
    if method in _READ_METHODS:
        return "read"
    segments = [s for s in path.split("/") if s]
    if set(segments) & _ADMIN_SEGMENTS:
        return "admin"
    if method == "DELETE" and (not segments or segments[-1] not in _WRITE_DELETES):
        return "admin"
    return "write"


def _bearer(conn: HTTPConnection) -> str | None:
    header = conn.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def authorize(tokens: TokenTable, conn: HTTPConnection, needed: Role) -> Role:
    """The caller's role if it may do ``needed``; else 401 (who are you) or 403 (not you).

    With no tokens configured (loopback only, see :func:`check_bind`) everyone is admin.
    The caller's identity (token name and role) is what the changes it sends are by, in
    the change journal (:data:`runctl.bus.client.ACTING_AS`, for this request only).
    """
    if not tokens:
        _acting_as(conn, "anonymous", "admin")
        return "admin"
    token = _bearer(conn)
    if token is None:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    found = tokens.identify(token)
    if found is None:
        raise Unauthorized("unknown bearer token")
    role, name = found
    if _RANK[role] < _RANK[needed]:
        raise Forbidden(f"this needs the {needed} role; the token has {role}")
    _acting_as(conn, name, role)
    return role


def _acting_as(conn: HTTPConnection, name: str, role: Role) -> None:
    client = conn.client
    ACTING_AS.set(Author(name=name, via="http", role=role, addr=client.host if client else ""))


def tokens_of(conn: HTTPConnection) -> TokenTable:
    """The app's bearer tokens (``app.state.tokens``; none configured: an empty table)."""
    tokens = getattr(conn.app.state, "tokens", None)
    return tokens if isinstance(tokens, TokenTable) else TokenTable()


def require(
    role: Role | None = None,
) -> Callable[[HTTPConnection], Awaitable[Role]]:
    """A FastAPI dependency. ``require("write")`` pins the role; ``require()`` derives it
    from the method and the matched route (:func:`required_role`), so it can guard a whole
    app: ``FastAPI(dependencies=[Depends(require())])``. Tokens: ``app.state.tokens``."""

    async def dependency(conn: HTTPConnection) -> Role:
        needed = role
        if needed is None:
            route = conn.scope.get("route")
            path = getattr(route, "path_format", None) or conn.url.path
            needed = required_role(conn.scope.get("method", "GET"), path)
        return authorize(tokens_of(conn), conn, needed)

    return dependency


# --- a tokens file ----------------------------------------------------------------------


def generate_tokens_file(path: str | os.PathLike[str]) -> Path:
    """Write a new tokens file (one random token per role, mode 0600) unless one exists."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lines = [
        "# runctl gateway tokens: `role token [name]` per line (roles: read < write < admin).",
        "# Keep this file private (mode 0600). Give each person the least role they need, and",
        "# a token of their own: its name is who the change journal says a change is by.",
        *(f"{role} {secrets.token_urlsafe(32)} {role}" for role in ROLES),
    ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
