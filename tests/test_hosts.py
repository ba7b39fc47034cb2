"""A cluster across hosts: three network namespaces (tests/netns.py) linked by a bridge, a
3-node nats-server cluster with TLS on client and route connections (runctl's nats.conf,
passwords required), rank 0 on host 1, rank 1 on host 2, the gateway (HTTPS, tokens) on
host 3. Every process is real and talks over the namespaces' links only.

Shown: a broadcast stop through the gateway reaches every rank; host 1's link goes down
while both ranks log steps: nothing acknowledged is lost, rank 1 and the gateway carry on
with hosts 2 and 3, and host 1 rejoins when its link is back (its node catches up, rank 0's
queued completions are stored). Figures go to docs/reliability.md (faultkit.figures).
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import ROOT
from faultkit import Rank, done_records, figures
from netns import Hosts, unavailable

from runctl.bus.cluster import NatsCluster, ensure_replicated
from runctl.bus.connection import close_quietly, connect
from runctl.bus.credentials import Credentials, ensure_credentials
from runctl.bus.registry import BUCKET
from runctl.bus.server import packaged_config
from runctl.bus.steps.records import RunLog
from runctl.bus.steps.store import STREAM, read_log
from runctl.bus.tls import CA_ENV, TlsFiles, ensure_tls

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WHY_NOT = unavailable()
if WHY_NOT is not None:
    if os.environ.get("RUNCTL_REQUIRE_NETNS"):  # CI: the machine allows them, so must run
        pytest.fail(f"RUNCTL_REQUIRE_NETNS is set, but: {WHY_NOT}", pytrace=False)
    pytest.skip(f"no network namespaces: {WHY_NOT}", allow_module_level=True)

HOSTS = ["h1", "h2", "h3"]
NATS_PORT, ROUTE_PORT, GATEWAY_PORT = 4222, 6222, 4444
N = 600  # steps per rank: enough to keep both logging through the cut and the rejoin
HOLD_S = 8.0  # the cut lasts at least this long
KV = f"KV_{BUCKET}"


class Topology:
    """What the test started: hosts, certificates, logins, the cluster, the gateway."""

    def __init__(self, hosts: Hosts, tls: TlsFiles, creds: Credentials, cluster: NatsCluster):
        self.hosts, self.tls, self.creds, self.cluster = hosts, tls, creds, cluster
        self.gateway: subprocess.Popen[bytes] | None = None
        self.admin_token = ""

    def url(self, host: str) -> str:
        """The node on ``host`` first: a process talks to its own host's node."""
        i = HOSTS.index(host)
        return self.cluster.urls[i]

    @property
    def gateway_url(self) -> str:
        return f"https://{self.hosts.address['h3']}:{GATEWAY_PORT}"

    def on(self, host: str, fn: Any) -> Any:
        return self.hosts.run(host, fn)

    def http(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTPS request to the gateway, from host 3 (verified with the private CA)."""

        async def go() -> httpx.Response:
            verify = ssl.create_default_context(cafile=str(self.tls.ca))
            headers = {"Authorization": f"Bearer {self.admin_token}"}
            async with httpx.AsyncClient(verify=verify, timeout=10, headers=headers) as http:
                return await http.request(method, f"{self.gateway_url}{path}", **kwargs)

        return self.on("h3", go)  # type: ignore[no-any-return]


@pytest.fixture
def topology(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Topology]:
    hosts = Hosts(HOSTS)
    with hosts.running():
        addresses = [hosts.address[h] for h in HOSTS]
        tls = ensure_tls(tmp_path / "tls", addresses)
        creds = ensure_credentials(tmp_path / "credentials", env={})
        for var in ("RUNCTL_NATS_URL", "RUNCTL_NATS_USER", "RUNCTL_NATS_PASSWORD"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("RUNCTL_NATS_CREDENTIALS_DIR", str(tmp_path / "no-role-files"))
        monkeypatch.setenv(CA_ENV, str(tls.ca))  # this process's own clients (hosts.run)
        cluster = NatsCluster(
            3,
            hosts=addresses,
            ports=[NATS_PORT] * 3,
            cluster_ports=[ROUTE_PORT] * 3,
            base_dir=tmp_path / "nodes",
            config_file=packaged_config(),
            prefixes=[hosts.prefix(h) for h in HOSTS],
            tls=tls,
        )
        topo = Topology(hosts, tls, creds, cluster)
        with pytest.MonkeyPatch.context() as mp:  # the passwords reach only the nodes
            for key, value in creds.server_env().items():
                mp.setenv(key, value)
            cluster.start(timeout=60, wait=False)
        try:
            agent = creds.auth("agent")
            topo.on("h3", lambda: ensure_replicated(topo.url("h3"), 3, timeout=60, **agent))
            yield topo
        finally:
            if topo.gateway is not None and topo.gateway.poll() is None:
                topo.gateway.terminate()
                try:
                    topo.gateway.wait(10)
                except subprocess.TimeoutExpired:
                    topo.gateway.kill()
                    topo.gateway.wait()
            cluster.stop()


def start_gateway(topo: Topology, tmp_path: Path) -> None:
    """``runctl gateway`` on host 3, on its own address: tokens and HTTPS (the CLI refuses
    one without the other there)."""
    tokens = tmp_path / "tokens"
    topo.admin_token = "admin-" + os.urandom(16).hex()
    tokens.write_text(f"admin {topo.admin_token}\n")
    tokens.chmod(0o600)
    log = tmp_path / "gateway.log"
    argv = [
        *topo.hosts.prefix("h3"),
        *(sys.executable, "-m", "runctl", "gateway", "--nats", topo.url("h3")),
        *("--host", topo.hosts.address["h3"], "--port", str(GATEWAY_PORT)),
        *("--tokens-file", str(tokens), "--timeout", "2", "--log-level", "warning"),
        *("--tls-cert", str(topo.tls.server_cert), "--tls-key", str(topo.tls.server_key)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **topo.creds.client_env("operator")}
    with log.open("ab") as out:
        topo.gateway = subprocess.Popen(argv, env=env, stdout=out, stderr=out, cwd=ROOT)
    deadline = time.monotonic() + 60
    while True:
        try:
            if topo.http("GET", "/runs").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if topo.gateway.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"gateway not serving: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def start_rank(topo: Topology, run: str, rank: str, host: str) -> Rank:
    env = {
        **topo.creds.client_env("agent"),
        CA_ENV: str(topo.tls.ca),
        "LINGER": "1",
        "PYTHONPATH": str(ROOT),
    }
    return Rank(run, rank, topo.url(host), N, pace=0.05, env=env, prefix=topo.hosts.prefix(host))


def stream_state(topo: Topology, host: str, stream: str) -> tuple[str | None, bool]:
    """The stream's leader, and whether every replica is current (seen from ``host``)."""

    async def go() -> tuple[str | None, bool]:
        nc = await connect(topo.url(host), **topo.creds.auth("operator"), connect_timeout=3)
        try:
            with anyio.fail_after(5):
                info = await nc.jetstream().stream_info(stream)
        finally:
            await close_quietly(nc)
        cluster = info.cluster
        peers = cluster.replicas if cluster and cluster.replicas else []
        current = len(peers) == 2 and all(p.current and not p.offline for p in peers)
        return (cluster.leader if cluster else None), current

    try:
        return topo.on(host, go)  # type: ignore[no-any-return]
    except Exception:  # no leader at the moment, or the node is still catching up
        return None, False


def local_last_seq(topo: Topology, host: str, stream: str) -> int:
    """The last sequence ``host``'s node holds of ``stream`` itself: its monitoring port
    (nats.conf: 127.0.0.1:8222, inside the host), not the leader's answer."""

    async def go() -> int:
        async with httpx.AsyncClient(timeout=5) as http:
            jsz = (await http.get("http://127.0.0.1:8222/jsz?accounts=true&streams=true")).json()
        for account in jsz.get("account_details", []):
            for detail in account.get("stream_detail", []):
                if detail["name"] == stream:
                    return int(detail["state"]["last_seq"])
        return 0

    return topo.on(host, go)  # type: ignore[no-any-return]


def leader_last_seq(topo: Topology, host: str, stream: str) -> int:
    async def go() -> int:
        nc = await connect(topo.url(host), **topo.creds.auth("operator"), connect_timeout=3)
        try:
            with anyio.fail_after(10):
                return int((await nc.jetstream().stream_info(stream)).state.last_seq)
        finally:
            await close_quietly(nc)

    return topo.on(host, go)  # type: ignore[no-any-return]


def run_log(topo: Topology, host: str, run: str) -> RunLog:
    async def go() -> RunLog:
        nc = await connect(topo.url(host), **topo.creds.auth("operator"), connect_timeout=5)
        try:
            with anyio.fail_after(30):
                return await read_log(nc, run)
        finally:
            await close_quietly(nc)

    return topo.on(host, go)  # type: ignore[no-any-return]


def reachable(topo: Topology, src: str, dst: str) -> bool:
    """A TCP connection from ``src`` to ``dst``'s NATS port opens within a second."""

    async def go() -> bool:
        try:
            with anyio.fail_after(1):
                stream = await anyio.connect_tcp(topo.hosts.address[dst], NATS_PORT)
        except (TimeoutError, OSError):
            return False
        await stream.aclose()
        return True

    return topo.on(src, go)  # type: ignore[no-any-return]


def nudge(topo: Topology, leading: str, leader: str) -> None:
    """Cut the leader's host until another node leads, then mend it and let it catch up."""
    other = next(h for h in HOSTS if h != leading)
    topo.hosts.cut(leading)
    try:
        moved = lambda: stream_state(topo, other, STREAM)[0] not in (None, leader)  # noqa: E731
        wait_for(moved, 30, "a new leader", [])
    finally:
        topo.hosts.mend(leading)
    wait_for(lambda: stream_state(topo, leading, STREAM)[1], 60, "caught up", [])


def move_leader_to(topo: Topology, host: str) -> int:
    """Make ``host``'s node the step stream's leader (the worst node to lose), by cutting
    whichever host leads until the election lands there (nats.conf gives no login the
    right to ask for a step-down). Returns how many cuts it took."""
    target = topo.cluster.server_name(HOSTS.index(host))
    names = [topo.cluster.server_name(i) for i in range(3)]
    nudges = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        leader, current = stream_state(topo, host, STREAM)
        if leader == target and current:
            return nudges
        if leader is None or not current:
            time.sleep(0.2)
            continue
        nudge(topo, HOSTS[names.index(leader)], leader)
        nudges += 1
    raise AssertionError(f"the step stream's leader did not move to {target} ({nudges} cuts)")


def wait_for(predicate: Any, timeout: float, what: str, ranks: list[Rank]) -> float:
    """Poll until ``predicate()``; returns how long it took, or fails with the ranks' output."""
    start = time.monotonic()
    while not predicate():
        for rank in ranks:
            if rank.proc.poll() is not None:
                raise AssertionError(f"rank {rank.rank} exited: {rank.stderr()[-2000:]}")
        if time.monotonic() - start > timeout:
            tails = {r.rank: r.lines[-3:] for r in ranks}
            raise AssertionError(f"{what}: not within {timeout}s; ranks {tails}")
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_cluster_across_hosts_with_tls(topology: Topology, tmp_path: Path, run_id: str) -> None:
    topo = topology
    nudges = move_leader_to(topo, "h1")
    start_gateway(topo, tmp_path)
    ranks = [start_rank(topo, run_id, "0", "h1"), start_rank(topo, run_id, "1", "h2")]
    rank0, rank1 = ranks
    try:
        wait_for(lambda: all(len(r.keys("acked")) >= 10 for r in ranks), 90, "first acks", ranks)
        listed = topo.http("GET", f"/runs/{run_id}")
        assert listed.status_code == 200, listed.text
        leader_before, _ = stream_state(topo, "h3", STREAM)
        assert leader_before == topo.cluster.server_name(0)
        assert len(rank1.keys("acked")) < N / 2, "rank 1 would finish during the cut"

        # --- host 1 cut off while both ranks log steps ------------------------------
        acked1 = len(rank1.keys("acked"))
        queued0, queued1 = len(rank0.keys("queued")), len(rank1.keys("queued"))
        assert reachable(topo, "h1", "h3") and reachable(topo, "h2", "h1")
        topo.hosts.cut("h1")
        cut_at = time.monotonic()
        # the leader was on host 1: rank 1's completions wait for a new one
        first_acks = wait_for(
            lambda: len(rank1.keys("acked")) >= acked1 + 5, 60, "rank 1 acks again", ranks
        )
        wait_for(lambda: len(rank1.keys("acked")) >= acked1 + 30, 60, "rank 1 carries on", ranks)
        assert not reachable(topo, "h1", "h3") and not reachable(topo, "h2", "h1")
        # the gateway (host 3) still controls rank 1 (host 2) ...
        changed = topo.http("PUT", f"/runs/{run_id}/ranks/1/set/lr", params={"value": "0.25"})
        assert changed.status_code == 200, changed.text
        # ... and host 1's rank cannot be reached, but nothing on it is lost: its
        # completions wait, unacknowledged, for the link
        unreachable = topo.http("GET", f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"})
        assert unreachable.status_code in (404, 504), unreachable.text
        wait_for(lambda: len(rank0.keys("queued")) > queued0, 30, "rank 0 queues", ranks)
        acked0_cut = len(rank0.keys("acked"))
        leader_during, _ = stream_state(topo, "h3", STREAM)
        assert leader_during not in (None, topo.cluster.server_name(0))
        time.sleep(max(0.0, HOLD_S - (time.monotonic() - cut_at)))
        cut_s = time.monotonic() - cut_at

        # --- the link is back: host 1 rejoins ----------------------------------------
        queued_during_cut = len(rank0.keys("queued")) - queued0
        acked1_during_cut = len(rank1.keys("acked")) - acked1
        rank1_queued = len(rank1.keys("queued")) - queued1
        behind = {s: local_last_seq(topo, "h1", s) for s in (STREAM, KV)}
        ahead = {s: leader_last_seq(topo, "h2", s) for s in (STREAM, KV)}
        assert all(behind[s] < ahead[s] for s in (STREAM, KV)), (behind, ahead)
        topo.hosts.mend("h1")
        mended = time.monotonic()
        seen: dict[str, float] = {}

        def rejoined() -> bool:
            # two clocks from the same moment: rank 0 acknowledged again; host 1's node
            # holds (on its own disk) everything both stores had when the link came back
            now = time.monotonic() - mended
            if "ack" not in seen and len(rank0.keys("acked")) > acked0_cut:
                seen["ack"] = now
            if "node" not in seen and all(
                local_last_seq(topo, "h1", s) >= ahead[s] for s in (STREAM, KV)
            ):
                seen["node"] = now
            return len(seen) == 2

        wait_for(rejoined, 90, "host 1 rejoins", ranks)
        rejoin_s, rank0_ack_s = seen["node"], seen["ack"]

        finals = [r.wait_final(180) for r in ranks]
        for final in finals:
            assert final["flushed"] and final["done"] == list(range(N)), final

        # --- a broadcast stop reaches every rank ---------------------------------------
        sent = time.monotonic()
        stopped = topo.http("POST", f"/runs/{run_id}/ranks/all/stop")
        stop_ms = (time.monotonic() - sent) * 1000
        assert stopped.status_code == 200, stopped.text
        body = stopped.json()
        assert body["acknowledged"] == ["0", "1"] and body["missing"] == [], body
        assert all(v["outcome"] == "applied" for v in body["ranks"].values()), body
        exits = [r.finish(60) for r in ranks]
        assert rank1.lines[-1]["exit_lr"] == 0.25
        assert all("exit_lr" in r.lines[-1] for r in ranks), exits

        # --- nothing acknowledged is lost: read back from host 1's node -------------------
        runlog = run_log(topo, "h1", run_id)
        checked = 0
        for rank in ranks:
            records = done_records(runlog, rank.rank)
            for key in rank.keys("acked"):
                assert len(records[key]) == 1 and records[key][0].status == "done", key
            assert sorted(records) == list(range(N)), rank.rank
            assert all(len(r) == 1 for r in records.values()), rank.rank
            checked += len(records)
        figures(
            "hosts_link_cut",
            hosts=3,
            nodes=3,
            replicas=3,
            tls="client+routes",
            cut_host="h1 (node runctl-1, rank 0)",
            leader_before=leader_before,
            leader_moves_before=nudges,
            leader_during=leader_during,
            cut_s=round(cut_s, 2),
            rank1_5_acks_after_cut_s=round(first_acks, 2),
            rank1_queued_during_cut=rank1_queued,
            rank1_acked_during_cut=acked1_during_cut,
            rank0_queued_during_cut=queued_during_cut,
            rejoin_s=round(rejoin_s, 2),
            node1_behind_at_mend={s: ahead[s] - behind[s] for s in (STREAM, KV)},
            rank0_first_ack_after_mend_s=round(rank0_ack_s, 2),
            broadcast_stop_ms=round(stop_ms, 1),
            stop_acked=2,
            steps_per_rank=N,
            records_checked=checked,
            lost=0,
        )
    finally:
        for rank in ranks:
            if rank.proc.poll() is None:
                rank.kill()
