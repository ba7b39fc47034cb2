"""Faults with real processes: nats-server SIGKILLed and restarted, stalled (SIGSTOP/SIGCONT),
the gateway SIGKILLed and restarted, a rank SIGKILLed inside a step.

Each test asserts that nothing acknowledged is lost (every completion the step API reported
done is in the stream exactly once; every set the gateway answered 200 holds until a later
one) and that the system recovers on its own, with no 5xx other than 503/504 on the way.
Figures go to docs/reliability.md (see faultkit.figures).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from conftest import wait_for
from faultkit import GatewayProcess, Rank, Traffic, done_records, figures, log_of

from runctl.bus.client import Client
from runctl.bus.server import NatsServer

#: what an HTTP client may see while NATS is away or stalled: 503 (the gateway is
#: reconnecting), 504 (a rank did not answer in time), 404 (no responder yet: the rank's
#: subscription is back a moment after the gateway's)
DURING_OUTAGE = {"200", "404", "503", "504"}
N = 50


@pytest.fixture
def restarts() -> Iterator[list[NatsServer]]:
    """Servers a test restarted; stopped at the end."""
    started: list[NatsServer] = []
    yield started
    for server in started:
        server.stop()


def restart(server: NatsServer, restarts: list[NatsServer]) -> NatsServer:
    """The same port and store dir: clients reconnect to the URL they know."""
    again = NatsServer(port=server.port, store_dir=server.store_dir).start()
    restarts.append(again)
    return again


def check_no_acknowledged_completion_lost(url: str, run: str, ranks: list[Rank], n: int) -> int:
    """Every step a rank saw acknowledged is stored exactly once, done, never re-run; every
    step ended up done. Returns how many records were checked."""
    runlog = log_of(url, run)
    checked = 0
    for rank in ranks:
        records = done_records(runlog, rank.rank)
        acked = rank.keys("acked")
        assert acked, f"rank {rank.rank} saw no acknowledgement at all"
        for key in acked:
            assert len(records[key]) == 1, (rank.rank, key, records[key])
            assert records[key][0].status == "done", (rank.rank, key, records[key])
        assert sorted(records) == list(range(n)), sorted(records)
        assert all(
            len(recs) == 1 and recs[0].status == "done" and recs[0].attempt == 1
            for recs in records.values()
        )
        checked += len(records)
    return checked


def failed(traffic: Traffic) -> int:
    """HTTP answers that said the bus is away or slow (503, 504)."""
    return traffic.statuses["503"] + traffic.statuses["504"]


def noticed(before: tuple[int, list[int]], traffic: Traffic, ranks: list[Rank]) -> bool:
    """Since ``before``, HTTP got a 503/504 and every rank had a completion not
    acknowledged in time: every party has met the outage."""
    failures, queued = before
    return failed(traffic) > failures and all(
        len(rank.keys("queued")) > count for rank, count in zip(ranks, queued, strict=True)
    )


def http_status(url: str, method: str = "GET", **kwargs: object) -> int:
    with httpx.Client(timeout=10) as http:
        return http.request(method, url, **kwargs).status_code  # type: ignore[arg-type]


def test_server_killed_while_ranks_log_steps_and_the_gateway_serves(
    nats_server: NatsServer, restarts: list[NatsServer], run_id: str, tmp_path: Path
) -> None:
    url = nats_server.url
    gateway = GatewayProcess(url, log=tmp_path / "gateway.log").start()
    # paced so that both ranks are still stepping when the server dies
    ranks = [Rank(run_id, str(r), url, N, pace=0.08, env={"LINGER": "1"}) for r in range(2)]
    traffic = Traffic(gateway.url, run_id)
    try:
        for rank in ranks:
            rank.wait_until(lambda rank=rank: len(rank.keys("acked")) >= 10)
        traffic.start()
        wait_for(lambda: traffic.statuses["200"] >= 6, timeout=30)
        assert not any(rank.final for rank in ranks), "too slow a machine: ranks finished"
        seen = failed(traffic), [len(r.keys("queued")) for r in ranks]
        nats_server.kill()  # SIGKILL while both ranks log steps and HTTP traffic flows
        down = time.monotonic()
        # down until every party has noticed: HTTP answers 503/504, ranks queue completions
        wait_for(lambda: noticed(seen, traffic, ranks), timeout=20)
        time.sleep(max(0.0, down + 1.0 - time.monotonic()))  # down for a second at least
        restart(nats_server, restarts)
        downtime = time.monotonic() - down  # until the new server is ready
        finals = [rank.wait_final() for rank in ranks]
        ok_after = traffic.statuses["200"]
        wait_for(lambda: traffic.statuses["200"] >= ok_after + 9, timeout=30)
        traffic.stop()

        for final in finals:
            assert final["flushed"] and final["pending"] == 0
            assert final["done"] == list(range(N))
        records = check_no_acknowledged_completion_lost(url, run_id, ranks, N)

        assert set(traffic.statuses) <= DURING_OUTAGE, traffic.statuses
        # an acknowledged set is never lost: the rank holds it (or a later attempt)
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            fresh = http.get(f"/runs/{run_id}/ranks/0/get/lr", params={"fresh": "true"})
            assert fresh.status_code == 200
            assert fresh.json() in traffic.last_possible_values()
            assert (
                http.put(f"/runs/{run_id}/ranks/0/set/lr", params={"value": "0.5"}).status_code
                == 200
            )
            # the registry (KV) is written again after the restart: reads see the change
            wait_for(lambda: http.get(f"/runs/{run_id}/ranks/0/get/lr").json() == 0.5)
            listed = http.get(f"/runs/{run_id}").json()
            assert listed["counts"] == {"alive": 2, "stalled": 0, "stale": 0, "exited": 0}
            stop = http.post(f"/runs/{run_id}/ranks/all/stop")
            assert stop.status_code == 200, stop.text
        exits = [rank.finish() and rank.lines[-1] for rank in ranks]
        assert exits[0]["exit_lr"] == 0.5
        assert gateway.alive and gateway.starts == 1  # the gateway rode it out itself
        figures(
            "server_sigkill",
            faults=1,
            downtime_s=round(downtime, 2),
            ranks=2,
            steps_per_rank=N,
            acked=sum(len(r.keys("acked")) for r in ranks),
            queued_during_outage=sum(len(r.keys("queued")) for r in ranks),
            records_checked=records,
            http_requests=traffic.requests,
            http_statuses=dict(traffic.statuses),
            lost=0,
        )
    finally:
        traffic.stopping.set()
        for rank in ranks:
            if rank.proc.poll() is None:
                rank.kill()
        gateway.stop()


def test_server_stalled_by_sigstop_then_resumed(
    nats_server: NatsServer, run_id: str, tmp_path: Path
) -> None:
    url = nats_server.url
    gateway = GatewayProcess(url, log=tmp_path / "gateway.log").start()
    rank = Rank(run_id, "0", url, N, env={"LINGER": "1"})
    traffic = Traffic(gateway.url, run_id)
    try:
        rank.wait_until(lambda: len(rank.keys("acked")) >= 10)
        traffic.start()
        wait_for(lambda: traffic.statuses["200"] >= 6, timeout=30)
        # a stall, not a crash: connections stay open, nothing answers for 2+ s (shorter
        # than the clients' ping timeout, so nobody reconnects: they just wait)
        seen = failed(traffic), [len(rank.keys("queued"))]
        nats_server.signal(signal.SIGSTOP)
        stalled = time.monotonic()
        try:
            time.sleep(2.0)
            wait_for(lambda: noticed(seen, traffic, [rank]), timeout=10)
        finally:
            nats_server.signal(signal.SIGCONT)
        stall = time.monotonic() - stalled
        final = rank.wait_final()
        ok_after = traffic.statuses["200"]
        wait_for(lambda: traffic.statuses["200"] >= ok_after + 9, timeout=30)
        traffic.stop()

        assert final["flushed"] and final["done"] == list(range(N))
        records = check_no_acknowledged_completion_lost(url, run_id, [rank], N)
        assert set(traffic.statuses) <= DURING_OUTAGE, traffic.statuses
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            fresh = http.get(f"/runs/{run_id}/ranks/0/get/lr", params={"fresh": "true"})
            assert fresh.json() in traffic.last_possible_values()
            assert http.post(f"/runs/{run_id}/ranks/0/stop").status_code == 200
        rank.finish()
        figures(
            "server_sigstop",
            faults=1,
            stall_s=round(stall, 2),
            steps=N,
            acked=len(rank.keys("acked")),
            queued_during_stall=len(rank.keys("queued")),
            records_checked=records,
            http_requests=traffic.requests,
            http_statuses=dict(traffic.statuses),
            lost=0,
        )
    finally:
        nats_server.signal(signal.SIGCONT)
        traffic.stopping.set()
        if rank.proc.poll() is None:
            rank.kill()
        gateway.stop()


def test_gateway_killed_and_restarted_serves_the_same_state(
    nats_url: str, run_id: str, tmp_path: Path
) -> None:
    gateway = GatewayProcess(nats_url, log=tmp_path / "gateway.log").start()
    rank = Rank(run_id, "0", nats_url, 20, env={"LINGER": "1"})
    base = f"{gateway.url}/runs/{run_id}/ranks/0"
    kills = 2
    try:
        rank.wait_until(lambda: bool(rank.keys("acked")))
        for k in range(kills):
            value = 0.2 + k / 10
            assert http_status(f"{base}/set/lr", "PUT", params={"value": str(value)}) == 200
            gateway.kill()  # SIGKILL: no goodbye to NATS, no socket closed cleanly
            with pytest.raises(httpx.TransportError):
                http_status(f"{base}/get")
            gateway.start()  # same port
            # the gateway keeps nothing: the acknowledged set is still there, from the rank
            # itself and from the registry
            with httpx.Client(timeout=10) as http:
                assert http.get(f"{base}/get/lr", params={"fresh": "true"}).json() == value
                assert http.get(f"{base}/get/lr").json() == value
        final = rank.wait_final()
        assert final["done"] == list(range(20))
        assert http_status(f"{base}/stop", "POST") == 200
        rank.finish()
        assert rank.lines[-1]["exit_lr"] == 0.2 + (kills - 1) / 10
        figures("gateway_sigkill", faults=kills, sets_acknowledged=kills, lost=0)
    finally:
        if rank.proc.poll() is None:
            rank.kill()
        gateway.stop()


def test_rank_killed_mid_step_is_interrupted_on_resume(nats_url: str, run_id: str) -> None:
    n, hang = 20, 12
    first = Rank(run_id, "0", nats_url, n, pace=0.01, env={"HANG_AT": str(hang), "HB": "0.2"})
    second: Rank | None = None
    try:
        first.wait_until(lambda: hang in first.keys("started"))
        time.sleep(0.3)  # the "started" record is sent without waiting: let it leave
        first.kill()
        acked_first = first.keys("acked")

        async def liveness() -> str:
            async with await Client.connect(nats_url) as client:
                return (await client.rank(run_id, "0")).liveness

        # the registry shows the killed rank stale (its last state still readable)
        wait_for(lambda: anyio.run(liveness) == "stale", timeout=15, interval=0.2)
        second = Rank(run_id, "0", nats_url, n, pace=0.01)
        final = second.finish()
        ready = next(o for o in second.lines if "ready" in o)
        assert ready["interrupted"] == [hang]
        assert set(acked_first) <= set(second.keys("skipped"))  # acknowledged: not redone
        assert not set(acked_first) & set(second.keys("started"))
        assert hang in second.keys("started")
        assert final["done"] == list(range(n))
        records = done_records(log_of(nats_url, run_id), "0")
        assert sorted(records) == list(range(n))
        assert all(len(recs) == 1 and recs[0].status == "done" for recs in records.values())
        assert records[hang][0].attempt == 2
        assert {recs[0].attempt for k, recs in records.items() if k != hang} == {1}
        figures(
            "rank_sigkill_mid_step",
            faults=1,
            steps=n,
            acked_before_kill=len(acked_first),
            redone=len(second.keys("started")),
            interrupted_reported=1,
            lost=0,
        )
    finally:
        for rank in (first, second):
            if rank is not None and rank.proc.poll() is None:
                rank.kill()
