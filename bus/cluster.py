"""A local N-node nats-server cluster with JetStream: for ``runctl up --cluster N`` and the
fault tests (one node killed while a run logs steps).

Each node is a :class:`runctl.bus.server.NatsServer` with its own client port, cluster (route)
port, server name and store dir; every node lists every other node as a route. A cluster is
ready once JetStream has a meta leader, seen from every node.

Replication: the step log (stream ``RUNCTL_STEPS``) and the rank registry (KV
``RUNCTL_RANKS``) are created with ``RUNCTL_REPLICAS`` replicas (default 1), by whichever
process connects first. A process that does not set it never scales an existing stream
down. :func:`ensure_replicated` creates both with R3 up front (``runctl up --cluster``
does it), so ranks need no setting at all.

Why one module of this size: starting the nodes, waiting for a meta leader and creating the
replicated streams are one procedure that ``runctl up --cluster`` and the fault tests run;
the single-server code it reuses is in :mod:`runctl.bus.server`.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

import anyio
import nats
import structlog
from nats.js import errors as js_errors

from runctl.bus.connection import connect
from runctl.bus.credentials import role_auth
from runctl.bus.errors import BadRequest, ServerStartError, Unavailable
from runctl.bus.journalstore import ensure_journal
from runctl.bus.registry import BUCKET, allows_direct, create_bucket
from runctl.bus.replicas import REPLICAS_ENV, replicas_from_env
from runctl.bus.server import NatsServer
from runctl.bus.steps.store import ensure_stream

if TYPE_CHECKING:
    from runctl.bus.tls import TlsFiles

__all__ = [
    "CLUSTER_NAME",
    "REPLICAS_ENV",
    "NatsCluster",
    "ensure_replicated",
    "free_ports",
    "replicas_from_env",
    "run_sync",
    "serve_cluster",
]

CLUSTER_NAME: Final = "runctl"

T = TypeVar("T")
log = structlog.get_logger()


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free right now (held open together, so never the same one
    twice). A route port must be known before its server starts, unlike a client port."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


class NatsCluster:
    """``size`` nats-server processes on ``host`` forming cluster ``name``.

    ``ports``/``cluster_ports``: the nodes' client and route ports (default: free ones);
    ``base_dir``: node ``i`` stores JetStream in ``base_dir/node-i`` (default: a temporary
    directory each, removed on stop). A killed node restarts on the same ports and store.

    ``hosts``: node ``i`` listens (clients and routes) on ``hosts[i]`` instead of ``host``
    (ports must be given then); ``prefixes``: node ``i`` runs under ``prefixes[i]`` (e.g.
    ``ip netns exec h1``); ``tls``: TLS on every client and route connection, the nodes
    verifying each other's certificates (:mod:`runctl.bus.tls`).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        base_dir: str | os.PathLike[str] | None = None,
        ports: list[int] | None = None,
        cluster_ports: list[int] | None = None,
        http_ports: list[int] | None = None,
        config_file: str | os.PathLike[str] | None = None,
        name: str = CLUSTER_NAME,
        hosts: list[str] | None = None,
        prefixes: list[tuple[str, ...]] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        if size < 1:
            raise BadRequest(f"a cluster needs at least one node, not {size}")
        for given in (ports, cluster_ports, http_ports, hosts, prefixes):
            if given is not None and len(given) != size:
                raise BadRequest(f"{len(given)} ports, hosts or prefixes given for {size} nodes")
        if hosts is not None and not (ports and cluster_ports):
            raise BadRequest("nodes on their own hosts need their ports given")
        self.size = size
        self.host = host
        self.hosts = list(hosts) if hosts else [host] * size
        self.prefixes = list(prefixes) if prefixes else [()] * size
        self.tls = tls
        self.name = name
        picked = iter(free_ports((0 if ports else size) + (0 if cluster_ports else size), host))
        self.ports = list(ports) if ports else [next(picked) for _ in range(size)]
        self.cluster_ports = (
            list(cluster_ports) if cluster_ports else [next(picked) for _ in range(size)]
        )
        self.http_ports = list(http_ports) if http_ports else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if base_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="runctl-cluster-")
            base_dir = self._tmp.name
        self.base_dir = Path(base_dir)
        self.config_file = config_file
        self.nodes: list[NatsServer] = [self._node(i) for i in range(size)]

    # --- addresses ----------------------------------------------------------------------

    def server_name(self, i: int) -> str:
        """Node ``i``'s server name: ``<cluster>-<i+1>``."""
        return f"{self.name}-{i + 1}"

    @property
    def scheme(self) -> str:
        """``tls`` when the cluster was started with TLS, else ``nats``."""
        return "tls" if self.tls else "nats"

    @property
    def urls(self) -> list[str]:
        """Each node's client URL, in node order."""
        return [
            f"{self.scheme}://{_bracket(h)}:{port}"
            for h, port in zip(self.hosts, self.ports, strict=True)
        ]

    @property
    def url(self) -> str:
        """Every node's URL, comma separated: what a client connects with (any node will do,
        and it fails over to the others)."""
        return ",".join(self.urls)

    def _routes(self) -> str:
        # nats://, TLS or not: the cluster block's tls settings decide, not the scheme
        pairs = zip(self.hosts, self.cluster_ports, strict=True)
        return ",".join(f"nats://{_bracket(h)}:{p}" for h, p in pairs)

    def _node(self, i: int) -> NatsServer:
        args = [
            "--cluster_name",
            self.name,
            "--cluster",
            f"nats://{_bracket(self.hosts[i])}:{self.cluster_ports[i]}",
            # every node, itself included: nats-server ignores a route to itself
            "--routes",
            self._routes(),
        ]
        if self.http_ports is not None:
            args += ["-m", str(self.http_ports[i])]
        return NatsServer(
            host=self.hosts[i],
            port=self.ports[i],
            store_dir=self.base_dir / f"node-{i + 1}",
            config_file=self.config_file,
            name=self.server_name(i),
            extra_args=tuple(args),
            tls=self.tls,
            prefix=self.prefixes[i],
            one_core=False,  # raft's timers: see server_env
        )

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0, *, wait: bool = True) -> Self:
        """Start every node (together: a node waits for its routes before JetStream is up),
        then, with ``wait``, until JetStream has a meta leader (:meth:`wait_jetstream`)."""
        errors: list[BaseException] = []

        def start_one(node: NatsServer) -> None:
            try:
                node.start(timeout)
            except BaseException as exc:  # re-raised below, after every thread is done
                errors.append(exc)

        threads = [threading.Thread(target=start_one, args=(n,), daemon=True) for n in self.nodes]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            if wait:
                self.wait_jetstream(timeout)
        except BaseException:
            for thread in threads:
                thread.join()
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node, and remove the store dirs the cluster made itself."""
        for node in self.nodes:
            node.stop()
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (its store dir is kept)."""
        self.nodes[i].kill()

    def signal(self, i: int, signum: int) -> None:
        """Send ``signum`` to node ``i`` (SIGSTOP freezes it, for fault tests)."""
        self.nodes[i].signal(signum)

    def restart(self, i: int, timeout: float = 30.0) -> NatsServer:
        """Start node ``i`` again on its ports and store dir (after :meth:`kill`)."""
        old = self.nodes[i]
        if old.running:
            old.stop()
        node = self._node(i)
        # a new log file: the old one's "Server is ready" would pass start() at once
        node.log_path = node.store_dir / f"nats-server.{time.monotonic_ns()}.log"
        self.nodes[i] = node
        node.start(timeout)
        return node

    @property
    def running(self) -> list[bool]:
        """Per node, whether its process is alive."""
        return [n.running for n in self.nodes]

    def wait_jetstream(self, timeout: float = 30.0, **connect_options: Any) -> None:
        """Until every running node answers ``$JS.API.INFO`` (it knows a meta leader).
        ``connect_options``: nats-py login options when the nodes require one."""
        run_sync(lambda: self._await_jetstream(timeout, connect_options))

    async def _await_jetstream(self, timeout: float, options: dict[str, Any]) -> None:
        async def quiet(exc: Exception) -> None:
            pass  # nats-py would print a traceback for every refused early attempt

        if self.tls is not None and "tls" not in options:
            from runctl.bus.tls import client_tls

            tls = client_tls(self.urls, self.tls.client_env())
            options = {**options, **(tls.options() if tls else {})}
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.running:
                continue
            last = ""
            while True:
                try:
                    nc = await nats.connect(
                        node.url,
                        allow_reconnect=False,
                        connect_timeout=1,
                        error_cb=quiet,
                        **options,
                    )
                    try:
                        with anyio.fail_after(2):
                            await nc.jetstream().account_info()
                        break
                    finally:
                        await nc.close()
                except Exception as exc:  # not ready yet: 503 until a meta leader exists
                    last = str(exc) or type(exc).__name__
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"JetStream of cluster {self.name!r} not ready after {timeout:g}s", last
                    )
                await anyio.sleep(0.1)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.nodes)


def _client_cert_env(tls: TlsFiles) -> dict[str, str]:
    from runctl.bus.tls import CERT_ENV, KEY_ENV

    return {CERT_ENV: str(tls.client_cert), KEY_ENV: str(tls.client_key)}


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run_sync(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await fn(*args)`` on a fresh event loop in a helper thread: callable from sync
    code and from inside a running loop alike (which it blocks meanwhile)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append((True, anyio.run(fn, *args)))
        except BaseException as exc:  # handed to the caller
            box.append((False, exc))

    thread = threading.Thread(target=target, name="runctl-cluster", daemon=True)
    thread.start()
    thread.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


async def ensure_replicated(
    url: str, replicas: int, *, timeout: float = 30.0, **connect_options: Any
) -> None:
    """Create (or scale) the step stream, the change journal and the registry bucket to
    ``replicas`` replicas.
    Retried until ``timeout``: right after a cluster starts, its peers may not all be
    known to the meta leader yet."""
    nc = await connect(url, name="runctl-cluster", **connect_options)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with anyio.fail_after(5):
                    await ensure_stream(js, replicas=replicas)
                    await ensure_journal(js, replicas=replicas)
                    try:
                        kv = await js.key_value(BUCKET)
                        status = await kv.status()
                        config = status.stream_info.config
                        direct = allows_direct(replicas)
                        if (
                            (config.num_replicas or 1) != replicas
                            or bool(config.allow_direct) != direct
                            or config.allow_rollup_hdrs  # made by an older version
                        ):
                            config.num_replicas = replicas
                            config.allow_direct = direct
                            config.allow_rollup_hdrs = False  # see registry.bucket_config
                            config.deny_delete = True
                            await js.update_stream(config)
                    except js_errors.BucketNotFoundError:
                        await create_bucket(js, replicas)
                return
            except Exception as exc:  # e.g. "insufficient resources" until peers are known
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"could not create the {replicas}-replica step log, journal and registry: "
                        f"{exc or type(exc).__name__}"
                    ) from exc
                await anyio.sleep(0.25)
    finally:
        await nc.close()


def serve_cluster(
    size: int,
    *,
    port: int,
    store_dir: str | os.PathLike[str],
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    say: Callable[[str], None] = print,
    tls: TlsFiles | None = None,
    tls_verify_clients: bool = False,
) -> int:
    """``runctl up --cluster N``: a local cluster in the foreground until Ctrl-C/SIGTERM.

    Node ``i`` listens on ``port + i`` (routes on ``port + 2000 + i``, monitoring on
    ``8222 + i`` when the config enables it) and stores in ``store_dir/node-i``."""
    if env is not None:
        os.environ.update(env)  # passwords the config reads, inherited by every node
    http = None
    if config_file is not None and re.search(
        r"^\s*http\s*[:=]", Path(config_file).read_text(), re.MULTILINE
    ):
        http = [8222 + i for i in range(size)]
    cluster = NatsCluster(
        size,
        base_dir=store_dir,
        ports=[port + i for i in range(size)],
        cluster_ports=[port + 2000 + i for i in range(size)],
        http_ports=http,
        config_file=config_file,
        tls=tls,
    )
    for node in cluster.nodes:
        node.tls_verify_clients = tls_verify_clients
    connect_tls: dict[str, Any] = {}
    if tls is not None:
        from runctl.bus.tls import client_tls

        # the nodes' own client certificate: it passes --tls-verify-clients too
        client = client_tls(cluster.urls, {**tls.client_env(), **_client_cert_env(tls)})
        connect_tls = client.options() if client else {}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        # readiness is the replicated stores' creation itself (retried until the JetStream
        # meta group has every peer): it logs in as a rank would, with `runctl up`'s files
        cluster.start(wait=False)
        replicas = min(3, size)
        try:
            run_sync(
                lambda: ensure_replicated(
                    cluster.url, replicas, **role_auth("agent"), **connect_tls
                )
            )
            how = f"step log, change journal and registry R{replicas}"
        except Unavailable as exc:
            say(f"runctl: {exc}")
            how = f"set {REPLICAS_ENV}={replicas} for the ranks to replicate the step log"
        say(
            f"runctl: {size}-node cluster {cluster.name!r} up ({how}); stores in "
            f"{store_dir}/node-*; Ctrl-C stops it"
        )
        ca = f" RUNCTL_NATS_CA={tls.ca.resolve()}" if tls else ""
        say(f"runctl: connect with RUNCTL_NATS_URL={cluster.url}{ca}")
        while True:
            time.sleep(0.5)
            for i, node in enumerate(cluster.nodes):
                if not node.running:  # a node died by itself: say so, bring it back
                    say(f"runctl: node {cluster.server_name(i)} exited; restarting it")
                    cluster.restart(i)
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in previous:  # a second Ctrl-C must not cut the nodes' stop short
            signal.signal(signum, signal.SIG_IGN)
        cluster.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
