"""A 3-node NATS cluster on loopback (bus/cluster.py) with the step log and the registry
replicated R3: one node is SIGKILLed during a run; control and step logging carry on with
the other two, no acknowledged completion is lost, and the node rejoins."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import pytest
from conftest import process_env, wait_for
from faultkit import Rank, done_records, figures, log_of
from nats.js import api

from runctl.bus.client import Client, Result
from runctl.bus.cluster import NatsCluster, ensure_replicated, replicas_from_env, run_sync
from runctl.bus.errors import BadRequest, RunctlError
from runctl.bus.journalstore import STREAM as JOURNAL
from runctl.bus.registry import BUCKET, Registry
from runctl.bus.steps.store import STREAM, ensure_stream

KV = f"KV_{BUCKET}"

N = 60


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One cluster for the module (3 nodes take seconds to start); each test leaves every
    node running."""
    with NatsCluster(3, base_dir=tmp_path_factory.mktemp("cluster")) as started:
        run_sync(lambda: ensure_replicated(started.url, 3))
        yield started


def stream_info(url: str, stream: str) -> api.StreamInfo:
    async def go() -> api.StreamInfo:
        nc = await nats.connect(url.split(","), connect_timeout=2)
        try:
            with anyio.fail_after(10):
                return await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()

    return anyio.run(go)


def all_current(url: str, stream: str, replicas: int) -> bool:
    """The stream has a leader and every other replica is current (caught up)."""
    try:
        cluster = stream_info(url, stream).cluster
    except Exception:  # no leader yet, or the node asked is still starting
        return False
    peers = cluster.replicas if cluster and cluster.replicas else []
    return (
        bool(cluster and cluster.leader)
        and len(peers) == replicas - 1
        and all(p.current and not p.offline for p in peers)
    )


class Control(threading.Thread):
    """Sets ``lr`` on rank 0 in a loop through the bus (any node), counting outcomes."""

    def __init__(self, url: str, run: str) -> None:
        super().__init__(daemon=True)
        self.url, self.run_id = url, run
        self.outcomes: Counter[str] = Counter()
        self.applied: list[tuple[float, float]] = []  # (time, value)
        self.stopping = threading.Event()

    def run(self) -> None:
        anyio.run(self._loop)

    async def _loop(self) -> None:
        async with await Client.connect(self.url, timeout=2) as client:
            value = 0.1
            while not self.stopping.is_set():
                value = round(value + 0.001, 6)
                try:
                    result = await client.set(self.run_id, 0, "lr", value)
                    assert isinstance(result, Result)
                    self.outcomes["applied"] += 1
                    self.applied.append((time.monotonic(), value))
                except RunctlError as exc:
                    self.outcomes[exc.code] += 1
                    await anyio.sleep(0.05)
                await anyio.sleep(0.01)


def test_cluster_nodes_keep_gos_own_cores(cluster: NatsCluster) -> None:
    # a single server runs Go on one core (tests/test_server.py); a node does not: its raft
    # groups elect and catch up against timers
    assert cluster.nodes and not any(node.one_core for node in cluster.nodes)
    for node in cluster.nodes:
        assert node.process is not None
        # exactly the environment's own, none of runctl's
        assert process_env(node.process.pid).get("GOMAXPROCS") == os.environ.get("GOMAXPROCS")


def test_replicas_come_from_the_environment() -> None:
    assert replicas_from_env({}) is None
    assert replicas_from_env({"RUNCTL_REPLICAS": "3"}) == 3
    for bad in ("0", "6", "three"):
        with pytest.raises(BadRequest, match="RUNCTL_REPLICAS"):
            replicas_from_env({"RUNCTL_REPLICAS": bad})


def test_replicas_are_kept_and_scaled_up_never_down(
    cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RUNCTL_REPLICAS", raising=False)

    async def go() -> tuple[int | None, ...]:
        nc = await nats.connect(cluster.urls)
        try:
            js = nc.jetstream()
            # a process that does not ask (a rank without RUNCTL_REPLICAS) keeps R3
            await ensure_stream(js)
            await Registry.open(nc)
            kept = [(await js.stream_info(s)).config.num_replicas for s in (STREAM, KV)]
            # stores created with one replica are scaled up, not recreated
            await js.delete_stream(STREAM)
            await js.delete_key_value(BUCKET)
            await ensure_stream(js, replicas=1)
            monkeypatch.setenv("RUNCTL_REPLICAS", "1")
            await Registry.open(nc)
            monkeypatch.delenv("RUNCTL_REPLICAS")
            one = [(await js.stream_info(s)).config.num_replicas for s in (STREAM, KV)]
        finally:
            await nc.close()
        await ensure_replicated(cluster.url, 3)
        nc = await nats.connect(cluster.urls)
        try:
            js = nc.jetstream()
            three = [(await js.stream_info(s)).config.num_replicas for s in (STREAM, KV)]
        finally:
            await nc.close()
        return (*kept, *one, *three)

    assert anyio.run(go) == (3, 3, 1, 1, 3, 3)


def test_a_node_killed_during_a_run(cluster: NatsCluster, run_id: str) -> None:
    for stream in (STREAM, f"KV_{BUCKET}", JOURNAL):
        assert stream_info(cluster.url, stream).config.num_replicas == 3
    # a follower must not answer registry reads: it may be behind the leader
    assert not stream_info(cluster.url, f"KV_{BUCKET}").config.allow_direct
    rank = Rank(run_id, "0", cluster.url, N, env={"LINGER": "1"})
    control = Control(cluster.url, run_id)
    try:
        rank.wait_until(lambda: len(rank.keys("acked")) >= 10)
        control.start()
        wait_for(lambda: control.outcomes["applied"] >= 5, timeout=30)
        # the worst node to lose: the step stream's leader
        leader = stream_info(cluster.url, STREAM).cluster.leader  # type: ignore[union-attr]
        victim = next(i for i in range(3) if cluster.server_name(i) == leader)
        acked_before = len(rank.keys("acked"))
        applied_before = control.outcomes["applied"]
        cluster.kill(victim)
        killed = time.monotonic()
        # with two of three nodes: a new leader, and both planes carry on
        rank.wait_until(lambda: len(rank.keys("acked")) >= acked_before + 5, timeout=40)
        first_ack_after = time.monotonic() - killed
        wait_for(lambda: control.outcomes["applied"] >= applied_before + 5, timeout=40)
        assert not cluster.nodes[victim].running
        new_leader = stream_info(cluster.url, STREAM).cluster.leader  # type: ignore[union-attr]
        assert new_leader != leader

        cluster.restart(victim)
        restarted = time.monotonic()
        wait_for(lambda: all_current(cluster.urls[victim], STREAM, 3), timeout=40, interval=0.2)
        wait_for(
            lambda: all_current(cluster.urls[victim], f"KV_{BUCKET}", 3), timeout=40, interval=0.2
        )
        rejoined = time.monotonic() - restarted

        final = rank.wait_final()
        control.stopping.set()
        control.join(30)
        assert final["flushed"] and final["done"] == list(range(N))
        records = done_records(log_of(cluster.url, run_id), "0")
        for key in rank.keys("acked"):
            assert len(records[key]) == 1 and records[key][0].status == "done", key
        assert sorted(records) == list(range(N))
        assert all(len(r) == 1 and r[0].attempt == 1 for r in records.values())

        async def last_value_and_stop() -> float:
            async with await Client.connect(cluster.url) as client:
                fresh = await client.get(run_id, 0, "lr", fresh=True)
                assert isinstance(fresh, Result)
                await client.stop(run_id, 0)
                return float(fresh.value)

        last = anyio.run(last_value_and_stop)
        assert last == control.applied[-1][1]  # the last acknowledged set holds
        rank.finish()
        assert rank.lines[-1]["exit_lr"] == last
        figures(
            "cluster_node_sigkill",
            nodes=3,
            replicas=3,
            faults=1,
            killed=leader,
            new_leader=new_leader,
            first_ack_after_kill_s=round(first_ack_after, 2),
            rejoin_s=round(rejoined, 2),
            steps=N,
            acked=len(rank.keys("acked")),
            queued=len(rank.keys("queued")),
            records_checked=len(records),
            sets=dict(control.outcomes),
            lost=0,
        )
    finally:
        control.stopping.set()
        if rank.proc.poll() is None:
            rank.kill()


def _free_block(size: int) -> int:
    """A port P with P..P+size-1 and P+2000.. free (what `up --cluster` uses)."""
    import random

    for _ in range(50):
        base = random.randrange(20000, 28000)
        try:
            with contextlib.ExitStack() as stack:
                for port in [*range(base, base + size), *range(base + 2000, base + 2000 + size)]:
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no free block of ports")


def test_runctl_up_cluster_starts_a_replicated_cluster_and_stops_it(tmp_path: Path) -> None:
    port = _free_block(3)
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runctl",
            "up",
            "--cluster",
            "3",
            "--no-config",
            "--port",
            str(port),
            "--store-dir",
            str(store),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if "RUNCTL_NATS_URL=" in line:
                break
        url = lines[-1].split("RUNCTL_NATS_URL=", 1)[1].strip()
        assert url == ",".join(f"nats://127.0.0.1:{port + i}" for i in range(3)), lines
        assert "R3" in "".join(lines)
        for stream in (STREAM, f"KV_{BUCKET}"):
            assert stream_info(url, stream).config.num_replicas == 3
        assert sorted(p.name for p in store.iterdir()) == ["node-1", "node-2", "node-3"]
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops every node
        assert proc.wait(30) == 0
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 1).close()
    finally:
        if proc.poll() is None:
            proc.terminate()  # it stops its nodes (SIGKILL would orphan them)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
