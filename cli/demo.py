"""``runctl demo``: a nats-server, N ranks of a training-like loop, and the HTTP gateway.

Everything it starts, it stops: on Ctrl-C, at the end of ``--duration`` (counted from the
moment every rank is ready), or when every rank has stopped (``runctl stop demo``). The
ranks run in their own session, so Ctrl-C reaches the demo only and it stops them
gracefully; they also exit on their own if the demo dies.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Final

import anyio

from runctl.bus.client import Client
from runctl.bus.defaults import GATEWAY_HOST, GATEWAY_PORT, NATS_PORT, NATS_URL
from runctl.bus.errors import BadRequest, RunctlError, Unavailable
from runctl.bus.registry import ANSWERING
from runctl.bus.server import NatsServer, die_with_parent, port_free
from runctl.bus.shell import runctl_command
from runctl.bus.steps.store import forget
from runctl.bus.subjects import ALL, check_token
from runctl.cli.common import AddParser, seconds

__all__ = ["demo_command", "instructions", "register"]

DEFAULT_STORE: Final = Path(".runctl") / "demo"
MAX_RANKS: Final = 32


def register(add: AddParser) -> None:
    """Add ``demo``."""
    p = add(
        "demo",
        "run a nats-server, N ranks of a training-like loop and the gateway",
        epilog="Stops everything it started on Ctrl-C, after --duration, or once every "
        "rank has stopped.",
        bus=False,
    )
    p.add_argument("--ranks", type=int, default=2, help="how many ranks (default: 2)")
    p.add_argument(
        "--port", type=int, default=GATEWAY_PORT, help=f"gateway port (default: {GATEWAY_PORT})"
    )
    p.add_argument(
        "--nats-port",
        type=int,
        default=None,
        metavar="PORT",
        help=f"nats-server port (default: {NATS_PORT} if free, else any; 0: any)",
    )
    p.add_argument(
        "--duration",
        type=seconds,
        metavar="SECONDS",
        help="stop after this long once the ranks are ready (default: Ctrl-C)",
    )
    p.add_argument(
        "--store-dir",
        default=None,
        metavar="DIR",
        help=f"nats-server data (default: {DEFAULT_STORE}, or {DEFAULT_STORE}-PORT with "
        "another --port: each demo its own; one in use by a running demo is refused)",
    )
    p.add_argument("--run", default="demo", help="run id (default: demo)")
    p.add_argument(
        "--step-time",
        type=seconds,
        default=0.2,
        metavar="SECONDS",
        help="seconds per training step (default: 0.2)",
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=demo_command)


def _say(line: str = "") -> None:
    print(line, flush=True)


def demo_command(args: argparse.Namespace) -> int:
    """Start everything, print how to try it, wait, stop everything (see the module doc)."""
    run = check_token(args.run, "run")
    if not 1 <= args.ranks <= MAX_RANKS:
        raise BadRequest(f"--ranks must be between 1 and {MAX_RANKS}")
    if args.duration is not None and args.duration < 0:
        raise BadRequest("--duration must not be negative")
    nats_port = args.nats_port
    if nats_port is None:
        nats_port = NATS_PORT if port_free(NATS_PORT) else -1
    elif nats_port == 0:
        nats_port = -1
    if args.port == 0:
        args.port = _free_port()
    elif not port_free(args.port):
        raise Unavailable(f"port {args.port} is in use: pick another with --port")

    store = _store_dir(args.store_dir, args.port)
    lock = _lock_store(store)  # held until the demo ends
    server = NatsServer(port=nats_port, store_dir=store, die_with_parent=True)
    ranks: list[subprocess.Popen[bytes]] = []
    gateway: subprocess.Popen[bytes] | None = None
    try:
        server.start()
        anyio.run(_forget_previous, server.url, run)
        env = {
            **os.environ,
            "RUNCTL_NATS_URL": server.url,
            "PYTHONUNBUFFERED": "1",
            "RUNCTL_WORLD_SIZE": str(args.ranks),
        }
        for rank in range(args.ranks):
            ranks.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "runctl.cli.demo_train",
                        "--run",
                        run,
                        "--rank",
                        str(rank),
                        "--url",
                        server.url,
                        "--step-time",
                        str(args.step_time),
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C is the demo's to handle, not theirs
                )
            )
        _wait_ready(server.url, run, args.ranks, ranks)
        gateway = _start_gateway(server.url, run, args.port, args.log_level, env)
        gateway_url = f"http://{GATEWAY_HOST}:{args.port}"
        _say(instructions(run, gateway_url, server.url, args.ranks))
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while deadline is None or time.monotonic() < deadline:
            if all(p.poll() is not None for p in ranks):
                _say("runctl demo: every rank has stopped; shutting down")
                break
            time.sleep(0.1)
        else:
            _say(f"runctl demo: {args.duration:g}s are up; stopping the ranks")
    except KeyboardInterrupt:
        _say("\nrunctl demo: stopping")
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            _stop_ranks(server.url if server.running else None, run, ranks)
        if gateway is not None:
            _stop([gateway])
        server.stop()
        lock.close()
    return 0


def _store_dir(given: str | None, port: int) -> Path:
    """The demo's store: ``--store-dir``, else one per gateway port (two demos side by
    side never share a JetStream store)."""
    if given is not None:
        return Path(given)
    return DEFAULT_STORE if port == GATEWAY_PORT else DEFAULT_STORE.with_name(f"demo-{port}")


def _lock_store(store: Path) -> IO[bytes]:
    """Hold ``store`` for this demo (a lock the system drops when the demo dies); refuse a
    store another running demo holds: two servers on one store corrupt it."""
    store.mkdir(parents=True, exist_ok=True)
    handle = (store / "demo.lock").open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise Unavailable(
            f"{store} is the store of another runctl demo that is still running: stop it, "
            "or give this one its own --store-dir"
        ) from None
    return handle


def _start_gateway(
    url: str, run: str, port: int, log_level: str, env: dict[str, str], timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """The gateway's own program (``runctl gateway``), answering once it accepts
    connections; it dies with the demo."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runctl.gateway",
            "--nats",
            url,
            "--port",
            str(port),
            "--run",
            run,
            "--rank",
            "0",
            "--log-level",
            log_level,
            "--no-access-log",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C is the demo's to handle
        preexec_fn=die_with_parent,
    )
    deadline = time.monotonic() + timeout
    while not _accepts(GATEWAY_HOST, port):
        if proc.poll() is not None:
            raise Unavailable("the gateway exited during start (see its output above)")
        if time.monotonic() > deadline:
            _stop([proc])
            raise Unavailable(f"the gateway did not start within {timeout:g}s")
        time.sleep(0.05)
    return proc


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((GATEWAY_HOST, 0))
        return int(sock.getsockname()[1])


#: how processes are stopped: (signal or None to only wait, seconds to wait), in turn
GENTLY: Final = ((None, 5.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0))
FIRMLY: Final = ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0))


def _stop(
    procs: list[subprocess.Popen[bytes]],
    steps: tuple[tuple[signal.Signals | None, float], ...] = FIRMLY,
) -> None:
    """Escalate through ``steps`` until every one of ``procs`` has exited."""
    for sig, wait in steps:
        if sig is not None:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.05)
        if all(p.poll() is not None for p in procs):
            return


async def _forget_previous(url: str, run: str) -> None:
    """A stop recorded for the run by an earlier demo would stop these ranks at once, its
    logged epochs would be skipped and its changes replayed: each demo starts afresh."""
    async with await Client.connect(url, name="runctl-demo") as client:
        registry = await client.registry()
        with contextlib.suppress(Exception):
            await registry.delete_run(run)
        for record in await registry.records(run):
            await registry.delete(run, record.rank)
        with contextlib.suppress(RunctlError):
            await forget(client.nc, run, None, by="runctl demo")
        with contextlib.suppress(RunctlError):
            await client.forget_history(run)


def _wait_ready(
    url: str, run: str, count: int, procs: list[subprocess.Popen[bytes]], timeout: float = 60.0
) -> None:
    async def alive() -> int:
        async with await Client.connect(url, name="runctl-demo") as client:
            try:
                infos = await client.ranks(run)
            except RunctlError:
                return 0
            return sum(1 for i in infos if i.liveness in ANSWERING)

    deadline = time.monotonic() + timeout
    while anyio.run(alive) < count:
        if any(p.poll() is not None for p in procs):
            raise Unavailable("a demo rank exited during start (see its output above)")
        if time.monotonic() > deadline:
            raise Unavailable(f"the demo ranks were not ready after {timeout:g}s")
        time.sleep(0.1)


def _stop_ranks(url: str | None, run: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """Ask nicely over the bus, then SIGTERM, then SIGKILL: nothing is left behind."""
    running = [p for p in procs if p.poll() is None]
    if not running:
        return
    if url is not None:

        async def stop() -> None:
            async with await Client.connect(url, name="runctl-demo", timeout=2.0) as client:
                await client.stop(run, ALL, "the demo is ending")

        with contextlib.suppress(RunctlError, OSError):
            anyio.run(stop)
    _stop(running, GENTLY)


def instructions(run: str, gateway_url: str, nats_url: str, ranks: int) -> str:
    """What the demo prints once everything is up: the addresses and lines to try, each
    runnable as printed (``runctl`` by the path the shell finds it at, see bus.shell)."""
    host = gateway_url.removeprefix("http://")
    env = "" if nats_url == NATS_URL else f"RUNCTL_NATS_URL={nats_url} "
    cli = env + runctl_command()
    return f"""
runctl demo: {ranks} rank(s) of run '{run}' are training.
  NATS     {nats_url}
  gateway  {gateway_url}   (API docs: {gateway_url}/docs)
  console  {gateway_url}/console/{run}   (open it in a browser: curves, changes, stop)
  typed    {gateway_url}/runs/{run}/docs   (forms typed from the demo's model)

Try, from another terminal:
  curl -s {host}/get
  curl -s {host}/runs/{run}/ranks/0/get
  curl -s -X PUT '{host}/runs/{run}/ranks/all/set/optimizer.lr?value=0.05'
  curl -s -X PATCH {host}/runs/{run}/ranks/0/set -d '{{"optimizer": {{"kind": "adam"}}}}'
  curl -s -X PUT '{host}/runs/{run}/ranks/0/set/optimizer.kind?value=rmsprop'   # refused: 422

or with the CLI:
  {cli} ls
  {cli} get {run}/0 optimizer
  {cli} set {run} optimizer.lr=0.02 optimizer.kind=adam
  {cli} set {run} batch_size=64 --sync      # every rank at the same step
  {cli} tail {run}                          # changes and events (Ctrl-C ends it)
  {cli} steps {run} --explain               # the epochs logged done, what a restart skips
  {cli} forget {run} 'epoch:3+'             # epoch 3 and after run again next time
  {cli} history {run}                       # every change: who, when, what, on which rank
  {cli} undo {run}                          # take back the latest change
  {cli} stop {run} --sync                   # every rank stops before the same step

Ctrl-C stops everything.
"""
