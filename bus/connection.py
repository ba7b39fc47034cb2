"""Connect to NATS the way every runctl process should: reconnect forever, quiet errors.

Credentials come from the URL (``nats://user:pass@host``, ``nats://token@host``) or from
the environment: ``RUNCTL_NATS_CREDS`` (a .creds file), ``RUNCTL_NATS_NKEY`` (an nkey
seed file), ``RUNCTL_NATS_TOKEN``, ``RUNCTL_NATS_USER`` + ``RUNCTL_NATS_PASSWORD``; with
none of these, from the caller's role file written by ``runctl up`` (bus/credentials.py).
URLs are logged with their password masked.

TLS (bus/tls.py): with a ``tls://`` URL or ``RUNCTL_NATS_CA`` set, the server's certificate
is verified and a connection that is not encrypted is refused before the login is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import structlog
from nats.aio.client import Client as NATS

from runctl.bus.credentials import NatsRole, login_hint, redact_url, role_auth
from runctl.bus.defaults import NATS_URL
from runctl.bus.direct import read_now
from runctl.bus.errors import TlsError, Unavailable, map_nats_error
from runctl.bus.tls import (
    CLIENT_CERT_HINT,
    ClientTls,
    check_encrypted,
    client_tls,
    describe_ssl_error,
)

__all__ = ["DEFAULT_URL", "close_quietly", "connect", "env_url"]

DEFAULT_URL: Final = NATS_URL
log = structlog.get_logger()


def _not_eof_noise(record: logging.LogRecord) -> bool:
    """asyncio warns "returning true from eof_received() has no effect when using ssl"
    whenever a TLS server closes a connection that nats-py upgraded (its stream protocol
    returns True there): harmless, and not worth a line on the user's terminal."""
    return "eof_received()" not in str(record.msg)


logging.getLogger("asyncio").addFilter(_not_eof_noise)


def env_url(default: str | None = DEFAULT_URL) -> str | None:
    """The NATS URL from ``RUNCTL_NATS_URL``, or None when it is not set."""
    return os.environ.get("RUNCTL_NATS_URL") or default


def _auth_from_env() -> dict[str, Any]:
    env = os.environ
    options: dict[str, Any] = {}
    if creds := env.get("RUNCTL_NATS_CREDS"):
        options["user_credentials"] = creds
    if nkey := env.get("RUNCTL_NATS_NKEY"):
        options["nkeys_seed"] = nkey
    if token := env.get("RUNCTL_NATS_TOKEN"):
        options["token"] = token
    if (user := env.get("RUNCTL_NATS_USER")) is not None:
        options["user"] = user
        options["password"] = env.get("RUNCTL_NATS_PASSWORD", "")
    return options


def _has_login(servers: list[str], options: dict[str, Any]) -> bool:
    """A login given in a URL or as an argument: no role file is looked for then."""
    keys = ("user", "token", "user_credentials", "nkeys_seed")
    return any("@" in s for s in servers) or any(options.get(k) for k in keys)


async def connect(
    url: str | None = None,
    *,
    name: str = "runctl",
    retry_initial: bool = False,
    connect_timeout: float = 2.0,
    reconnect_wait: float = 0.25,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    role: NatsRole | None = None,
    on_error: Callable[[str], object] | None = None,
    **options: Any,
) -> NATS:
    """Connect and keep reconnecting forever (with nats-py's jittered backoff).

    ``retry_initial=True`` also retries the first connection until it succeeds (agents
    start before the server sometimes); otherwise a failed first connect raises
    :class:`~bus.errors.Unavailable` at once.

    ``role`` (agent, operator): with no credentials in the URL or the environment, log in
    with that role's file from ``runctl up``'s credentials directory, if there is one.
    ``on_error(why)`` hears each failed attempt, described (a refused login names where
    logins come from), e.g. for an agent that keeps retrying to say why it is not ready.
    """
    servers = [s.strip() for s in (url or env_url() or DEFAULT_URL).split(",") if s.strip()]
    given = options.get("tls")
    tls = ClientTls(given, None) if isinstance(given, ssl.SSLContext) else client_tls(servers)
    seen: set[str] = set()
    holder: list[NATS] = []

    last_error: list[Exception] = []
    first_scope: list[anyio.CancelScope] = []  # set while a bounded first connect runs

    async def error_cb(exc: Exception) -> None:
        last_error[:] = [*last_error[-len(servers) :], exc]  # bounded: reconnects run forever
        if first_scope and len(last_error) >= len(servers):
            first_scope[0].cancel()  # every server refused once: fail now, not in seconds
        # One line per distinct error kind, no tracebacks: a restarting server is not news.
        key = type(exc).__name__
        why = _describe(exc, tls, role)
        if isinstance(exc, OSError) and len(last_error) > 1 and _refused(last_error[-2]):
            why = _describe(last_error[-2], tls, role)  # it hung up on a refused login
        if on_error is not None:
            on_error(why)
        if key not in seen:
            seen.add(key)
            log.warning("nats error", error=why, kind=key)

    async def disconnected_cb() -> None:
        if holder and (holder[0].is_closed or holder[0].is_draining):
            return  # our own close(): not worth a log line
        log.info("nats disconnected", servers=redact_url(",".join(servers)))

    async def reconnected_cb() -> None:
        seen.clear()
        log.info("nats reconnected")
        if on_reconnected is not None:
            await on_reconnected()

    params: dict[str, Any] = {
        "servers": servers,
        "name": name,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": reconnect_wait,
        "connect_timeout": connect_timeout,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        **_auth_from_env(),
        **(role_auth(role) if role and not _has_login(servers, options) else {}),
        **(tls.options() if tls else {}),
        **options,
    }
    delay = reconnect_wait
    while True:
        try:
            # nats-py retries a failed *first* connect forever when max_reconnect_attempts
            # is -1: without retry_initial, bound it to about one pass over the servers.
            limit = math.inf if retry_initial else connect_timeout * len(servers) + 1.0
            with anyio.fail_after(limit) as first_pass:
                first_scope[:] = [] if retry_initial else [first_pass]
                nc = await _connect_or_close(params, tls)
            first_scope.clear()
            if first_pass.cancel_called:  # error_cb saw every server refuse
                raise last_error[-1]
            holder.append(nc)
            return nc
        except Exception as exc:  # nats-py raises many kinds on a failed first connect
            first_scope.clear()
            if not retry_initial:
                cause = last_error[-1] if isinstance(exc, TimeoutError) and last_error else exc
                why = (
                    "timed out" if isinstance(cause, TimeoutError) else _describe(cause, tls, role)
                )
                where = redact_url(",".join(servers))  # never a password in a message
                kind = TlsError if _is_tls_failure(cause) else Unavailable
                raise kind(f"cannot connect to NATS at {where}: {why}") from exc
            await error_cb(exc)
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _refused(exc: BaseException) -> bool:
    """The server refused the login."""
    return "authorization violation" in str(exc).lower()


def _is_tls_failure(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLError | TlsError)


def _describe(exc: BaseException, tls: ClientTls | None, role: NatsRole | None = None) -> str:
    """One line for a failed connection; TLS failures say which CA was used, a refused
    login where logins come from."""
    if _refused(exc):
        return f"{str(exc).strip() or 'Authorization Violation'}: {login_hint(role)}"
    if isinstance(exc, ssl.SSLError):
        return describe_ssl_error(exc, tls.ca if tls else None)
    if isinstance(exc, TlsError):
        return exc.message
    if isinstance(exc, ConnectionResetError | BrokenPipeError) and tls and tls.cert is None:
        # TLS 1.3: a server that verifies clients may hang up before its alert is read (a
        # reset while reading, a broken pipe while writing CONNECT): one message for both
        return f"{map_nats_error(ConnectionResetError('Connection lost'))} ({CLIENT_CERT_HINT})"
    return str(map_nats_error(exc)) or type(exc).__name__


class _Client(NATS):
    """nats-py's client, refusing to send CONNECT (the login) over a plain connection
    when TLS is configured (nats-py itself switches to TLS only if the server asks)."""

    runctl_tls: ClientTls | None = None

    def _connect_command(self) -> bytes:
        check_encrypted(self, self.runctl_tls)
        command: bytes = super()._connect_command()
        return command

    async def _read_loop(self) -> None:
        # nats-py starts this task on each (re)connection: from its start, the bytes that
        # arrive are parsed as they do (bus/direct.py), one turn of the loop sooner
        await read_now(self)
        await super()._read_loop()


async def _connect_or_close(params: dict[str, Any], tls: ClientTls | None = None) -> NATS:
    """``nats.connect``, but a failed or cancelled attempt closes its half-open socket
    (nats-py leaves it to the garbage collector, on a loop that may be gone by then)."""
    nc = _Client()
    nc.runctl_tls = tls
    try:
        await nc.connect(**params)
    except BaseException:
        try:
            with anyio.move_on_after(1, shield=True):
                await close_quietly(nc)
        finally:
            # a cancel that lands inside nats-py's own _close() leaves the client marked
            # closed with its socket still open: close() above then does nothing
            transport = getattr(nc, "_transport", None)
            if transport:
                transport.close()
                # the socket closes on the loop's next turns: wait for it, or a loop that
                # ends right after (an agent closed while connecting) leaves it open
                with anyio.move_on_after(1, shield=True), contextlib.suppress(Exception):
                    await transport.wait_closed()
        raise
    return nc


async def close_quietly(nc: NATS) -> None:
    """Close ``nc`` as cleanup: shielded, and a connection that is already lost does not
    turn into an error of the caller's.

    nats-py's ``close()`` on a dead socket can raise what its own internals hit: a
    ``ConnectionResetError`` from flushing, or a ``CancelledError`` from one of its
    cancelled futures although nobody cancelled the caller. A cancellation that *was*
    requested of the calling task still propagates.
    """
    with anyio.CancelScope(shield=True):
        if nc.is_closed:
            return
        try:
            await nc.close()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            log.debug("nats close: stray cancellation from nats-py ignored")
        except Exception as exc:
            log.debug("nats close failed", error=str(exc) or type(exc).__name__)
