"""The gateway as a program: ``python -m runctl.gateway [OPTIONS]`` serves it in the
foreground, ``python -m runctl.gateway tokens [--file FILE]`` writes a tokens file.

``runctl gateway ...`` and ``runctl tokens ...`` run this program (the CLI never imports
the gateway: FastAPI and uvicorn are loaded only by the process that serves). Errors are
one line on stderr with the error's own exit code, as for every ``runctl`` command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from runctl.bus.connection import DEFAULT_URL, env_url
from runctl.bus.credentials import redact_url
from runctl.bus.errors import EXIT_OK, BadRequest, RunctlError
from runctl.bus.logs import configure_logging
from runctl.bus.shell import runctl_command
from runctl.gateway.auth import TokenTable, check_bind, generate_tokens_file, load_tokens
from runctl.gateway.serve import serve
from runctl.gateway.settings import DEFAULT_HOST, DEFAULT_MAX_BODY, DEFAULT_PORT, Settings

__all__ = ["DEFAULT_TOKENS_FILE", "main", "serve_parser", "tokens_parser"]

DEFAULT_TOKENS_FILE: Final = Path(".runctl") / "gateway-tokens"


def serve_parser() -> argparse.ArgumentParser:
    """``runctl gateway``'s options (also accepted before the word ``gateway``)."""
    p = argparse.ArgumentParser(
        prog="runctl gateway", description="Serve the HTTP gateway (FastAPI; docs at /docs)."
    )
    p.add_argument(
        "--nats",
        "--url",
        dest="url",
        metavar="URL",
        help=f"NATS URL (default: $RUNCTL_NATS_URL or {DEFAULT_URL})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long to wait for ranks to answer (default: 2)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default: {DEFAULT_HOST}; another needs tokens)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    p.add_argument(
        "--run",
        help="run of the Freak-compatible root routes (/get ...); default: the only live run",
    )
    p.add_argument(
        "--rank",
        help="rank of the root routes (default: reads from rank 0, writes to every rank)",
    )
    p.add_argument(
        "--max-body",
        type=int,
        default=DEFAULT_MAX_BODY,
        metavar="BYTES",
        help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY})",
    )
    p.add_argument(
        "--tokens-file",
        metavar="FILE",
        help="bearer tokens, 'role token' per line (also $RUNCTL_GATEWAY_TOKENS)",
    )
    p.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("RUNCTL_GATEWAY_TLS_CERT"),
        help="serve HTTPS with this certificate (PEM; also $RUNCTL_GATEWAY_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("RUNCTL_GATEWAY_TLS_KEY"),
        help="the certificate's private key (PEM; also $RUNCTL_GATEWAY_TLS_KEY)",
    )
    p.add_argument(
        "--allow-plain-http",
        action="store_true",
        help="take tokens over plain HTTP beyond loopback (only behind a proxy that ends TLS)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=_env_list("RUNCTL_GATEWAY_HOSTS"),
        metavar="NAME",
        help="a Host name to serve besides loopback and --host (repeatable, '*': any; "
        "also $RUNCTL_GATEWAY_HOSTS, comma separated): other names are refused (DNS rebinding)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=_env_list("RUNCTL_GATEWAY_ORIGINS"),
        metavar="URL",
        help="scheme://host[:port] of pages that may change state besides the gateway's own "
        "(repeatable; also $RUNCTL_GATEWAY_ORIGINS)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-access-log", action="store_true")
    return p


def tokens_parser() -> argparse.ArgumentParser:
    """``runctl tokens``' options."""
    p = argparse.ArgumentParser(
        prog="runctl tokens", description="Write a gateway tokens file: one random token per role."
    )
    p.add_argument(
        "--file", default=str(DEFAULT_TOKENS_FILE), help=f"default: {DEFAULT_TOKENS_FILE}"
    )
    return p


def gateway_command(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; refuses an open gateway beyond loopback, and tokens over
    plain HTTP there."""
    configure_logging(args.log_level)
    url = args.url or env_url()
    tokens = load_tokens(args.tokens_file)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise BadRequest("--tls-cert and --tls-key go together: give both or neither")
    for given in (args.tls_cert, args.tls_key):
        if given is not None and not Path(given).is_file():
            raise BadRequest(f"{given}: no such file")
    check_bind(args.host, tokens, tls=args.tls_cert is not None, allow_plain=args.allow_plain_http)
    if not 0 <= args.port <= 65535:
        raise BadRequest(f"--port {args.port} is not a port number")
    if args.max_body < 1:
        raise BadRequest("--max-body must be at least 1 byte")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise BadRequest(
            f"--timeout must be a positive, finite number of seconds, not {args.timeout}"
        )
    try:
        settings = _settings(args, url, tokens)
    except ValueError as exc:  # an origin or host name that is not one
        raise BadRequest(str(exc)) from None
    host = f"[{args.host}]" if ":" in args.host else args.host
    scheme = "https" if args.tls_cert else "http"
    print(
        f"runctl: gateway on {scheme}://{host}:{args.port} (docs /docs) for NATS "
        f"{redact_url(url or '')}" + ("" if tokens else ", no tokens: loopback only"),
        file=sys.stderr,
        flush=True,
    )
    serve(settings, log_level=args.log_level, access_log=not args.no_access_log)
    return EXIT_OK


def _settings(args: argparse.Namespace, url: str | None, tokens: TokenTable) -> Settings:
    return Settings(
        nats_url=url,
        host=args.host,
        port=args.port,
        default_run=args.run,
        default_rank=args.rank,
        timeout=args.timeout,
        max_body=args.max_body,
        tokens=tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        allowed_hosts=tuple(args.allow_host),
        allowed_origins=tuple(args.allow_origin),
    )


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def tokens_command(args: argparse.Namespace) -> int:
    """Write a tokens file (mode 0600) unless one exists, and say how to use it."""
    path = Path(args.file)
    existed = path.exists()
    generate_tokens_file(path)
    if existed:
        print(f"runctl: {path} exists: kept as it is")
    else:
        print(f"runctl: wrote {path} (mode 0600): one token per role (read, write, admin)")
    print(f"  serve with:   {runctl_command()} gateway --tokens-file {path}")
    print("  call with:    curl -H 'Authorization: Bearer <token>' ...")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m runctl.gateway [OPTIONS]`` or ``python -m runctl.gateway tokens ...``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["tokens"]:
            return tokens_command(tokens_parser().parse_args(argv[1:]))
        return gateway_command(serve_parser().parse_args(argv))
    except RunctlError as exc:  # a bad tokens file, an open public bind, a bad option
        print(f"runctl: {exc.describe()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("RUNCTL_DEBUG"):
            raise
        print(f"runctl: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
