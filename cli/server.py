"""``runctl up``: nats-server (JetStream on) in the foreground, with runctl's roles.

(``runctl gateway`` and ``runctl tokens`` are the gateway's own program: runctl.gateway.main.)"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Final

from runctl.bus.cluster import serve_cluster
from runctl.bus.credentials import DEFAULT_DIR, ensure_credentials
from runctl.bus.defaults import NATS_PORT
from runctl.bus.errors import BadRequest
from runctl.bus.server import find_binary, packaged_config, server_env
from runctl.bus.tls import DEFAULT_TLS_DIR, TlsFiles, ensure_tls, is_loopback, write_server_config
from runctl.cli.common import AddParser

__all__ = ["register", "tls_command", "up_argv", "up_command"]

DEFAULT_CONFIG: Final = "nats.conf"
DEFAULT_STORE: Final = Path(".runctl") / "nats"


def register(add: AddParser) -> None:
    """Add ``up``."""
    p = add(
        "up",
        "run nats-server (JetStream on) in the foreground",
        epilog=f"Uses ./{DEFAULT_CONFIG} if present, else the secured nats.conf that ships "
        f"with runctl (three roles, loopback only; their passwords are generated into "
        f"{DEFAULT_DIR} on first start). The server runs Go code on one core at a time "
        f"(GOMAXPROCS=1: a control plane's traffic needs no more, and idle threads would "
        f"take CPU from the programs on the machine); GOMAXPROCS=N runctl up gives it N. "
        f"The nodes of --cluster keep Go's default.",
        bus=False,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"nats-server config (default: ./{DEFAULT_CONFIG} if it exists, else runctl's own)",
    )
    p.add_argument(
        "--no-config",
        action="store_true",
        help="no config file: an open server on 127.0.0.1 with no logins (tests, experiments)",
    )
    p.add_argument(
        "--port", type=int, help=f"client port (default: the config's, else {NATS_PORT})"
    )
    p.add_argument(
        "--monitor-port",
        type=int,
        metavar="N",
        help="HTTP monitoring port (default: the config's, 8222; 0 turns it off, -1 picks one)",
    )
    p.add_argument(
        "--store-dir",
        default=str(DEFAULT_STORE),
        metavar="DIR",
        help=f"JetStream store (default: {DEFAULT_STORE})",
    )
    p.add_argument(
        "--cluster",
        type=int,
        metavar="N",
        help="a local N-node cluster instead (ports PORT..PORT+N-1, stores in "
        "STORE_DIR/node-*; step log, change journal and registry replicated R3): see "
        "docs/reliability.md",
    )
    p.add_argument(
        "--host",
        metavar="ADDR",
        help="address to listen on (default: the config's, else 127.0.0.1; another needs --tls)",
    )
    _tls_arguments(p)
    p.set_defaults(func=up_command)

    p = add(
        "tls",
        "write a private CA and certificates (what up --tls makes); start nothing",
        epilog="For servers started elsewhere (Kubernetes secrets, a batch job's first "
        "node): see docs/deploy.md.",
    )
    _tls_names(p)
    p.set_defaults(func=tls_command)


def _tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls",
        action="store_true",
        help="TLS on client and route connections: a private CA and certificates are "
        "written to TLS_DIR on first start; clients need RUNCTL_NATS_CA=TLS_DIR/ca.pem",
    )
    _tls_names(p)
    p.add_argument(
        "--tls-verify-clients",
        action="store_true",
        help="clients must also present a certificate from the CA (RUNCTL_NATS_CERT, "
        "RUNCTL_NATS_KEY: TLS_DIR/client.pem, client-key.pem)",
    )
    p.add_argument(
        "--allow-plain",
        action="store_true",
        help="listen beyond loopback without --tls (passwords cross the network readable)",
    )


def _tls_names(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address the server certificate must hold (repeat; localhost, "
        "127.0.0.1 and this machine's name are always in)",
    )
    p.add_argument(
        "--tls-dir",
        default=str(DEFAULT_TLS_DIR),
        metavar="DIR",
        help=f"where the CA and certificates are (default: {DEFAULT_TLS_DIR})",
    )


# --- up ----------------------------------------------------------------------------------


def up_argv(
    binary: str,
    *,
    config: str | None,
    port: int | None,
    store_dir: str,
    monitor_port: int | None = None,
    host: str | None = None,
) -> list[str]:
    """nats-server's command line. A config file brings its own listen address; without
    one, loopback only; ``host`` overrides either."""
    argv = [binary]
    if config is not None:
        argv += ["-c", config]
        if host is not None:
            argv += ["-a", host]
        if port is not None:
            argv += ["-p", str(port)]
    else:
        argv += ["-a", host or "127.0.0.1", "-p", str(NATS_PORT if port is None else port)]
    if monitor_port is not None:
        argv += ["-m", str(monitor_port)]
    return [*argv, "-js", "-sd", store_dir]


def _up_tls(args: argparse.Namespace) -> TlsFiles | None:
    """``--tls``: the certificates (made on first start), said where they are; and the
    listen address checked: beyond loopback, plain text needs ``--allow-plain``."""
    host = getattr(args, "host", None)
    if not getattr(args, "tls", False):
        if host is not None and not is_loopback(host) and not args.allow_plain:
            raise BadRequest(
                f"refusing to listen on {host} without TLS: NATS passwords would cross the "
                "network readable. Add --tls (and --tls-host NAME for the names clients use), "
                "or pass --allow-plain on a network you trust. See docs/security.md."
            )
        return None
    wildcard = host in ("0.0.0.0", "::")  # noqa: S104 - a check, not a bind
    if host is not None and not is_loopback(host) and not wildcard:
        args.tls_host.append(host)  # the address it listens on is a name clients use
    return _ensure_tls(args)


def _ensure_tls(args: argparse.Namespace) -> TlsFiles:
    files = ensure_tls(args.tls_dir, args.tls_host)
    verb = "wrote" if files.created else "using"
    print(
        f"runctl: TLS: {verb} {files.dir}/ (CA ca.pem; server certificate for "
        f"{', '.join(files.names())}); clients need RUNCTL_NATS_CA={files.ca.resolve()}",
        file=sys.stderr,
    )
    return files


def tls_command(args: argparse.Namespace) -> int:
    """``runctl tls``: the CA and certificates ``up --tls`` would make, and nothing else."""
    _ensure_tls(args)
    return 0


def up_command(args: argparse.Namespace) -> int:
    """Run nats-server in this process's place (exec), with runctl's config and roles."""
    config: str | None = args.config
    if config is None and not args.no_config:
        config = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else str(packaged_config())
    if config is not None and not Path(config).is_file():
        raise BadRequest(f"config file {config} not found")
    env = dict(os.environ)
    if config is not None and "$RUNCTL_" in Path(config).read_text():
        # the config reads passwords from the environment: bring (or make) them
        creds = ensure_credentials(DEFAULT_DIR)
        env.update(creds.server_env())
        if creds.created:
            print(
                f"runctl: generated NATS passwords in {creds.dir}/ (agent.env, "
                "operator.env, observer.env); programs and runctl started in this "
                "directory use them",
                file=sys.stderr,
            )
        elif creds.dir is not None:
            print(f"runctl: NATS passwords from {creds.dir}/", file=sys.stderr)
    Path(args.store_dir).mkdir(parents=True, exist_ok=True)
    tls = _up_tls(args)
    if getattr(args, "cluster", None):
        if args.host is not None:
            raise BadRequest("--host: a local cluster listens on 127.0.0.1 (docs/deploy.md)")
        return serve_cluster(
            args.cluster,
            port=args.port or NATS_PORT,
            store_dir=args.store_dir,
            config_file=config,
            env=env,
            say=lambda line: print(line, file=sys.stderr, flush=True),
            tls=tls,
            tls_verify_clients=args.tls_verify_clients,
        )
    binary = find_binary()
    host = args.host
    where = f"config {config}" if config else f"{host or '127.0.0.1'}:{args.port or NATS_PORT}"
    if tls is not None:
        # a config of its own that includes the base one and adds TLS
        base = config
        config = str(
            write_server_config(
                tls,
                tls.dir / "server.conf",
                include=base,
                verify_clients=args.tls_verify_clients,
                routes=False,
            )
        )
        if base is None:
            host = host or "127.0.0.1"  # the TLS config has no listen address of its own
        where += ", TLS"
    argv = up_argv(
        binary,
        config=config,
        port=args.port,
        store_dir=args.store_dir,
        monitor_port=args.monitor_port,
        host=host,
    )
    print(
        f"runctl: nats-server ({where}, JetStream in {args.store_dir}); Ctrl-C stops it",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    # exec: the server gets Ctrl-C and SIGTERM itself, and no runctl process is left over
    os.execve(binary, argv, server_env(env))  # noqa: S606 - argv list, our own binary
    return 0  # pragma: no cover - execve does not return
