"""Broadcast fan-out: the client waits for exactly the ranks the registry knows alive, stops
as soon as they all answered, names the ones that did not instead of hanging, reuses the
list of ranks for back-to-back broadcasts (stops too) without ever waiting for ranks that
left meanwhile, and many broadcasts leave no consumers behind on the server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from conftest import ROOT, spawn_python
from nats.js.kv import KeyValue
from pydantic import BaseModel

from runctl.agent import Agent
from runctl.bus import Client, Gathered
from runctl.bus import transport as bus_transport
from runctl.bus.errors import UnreadableRecord
from runctl.bus.messages import RankRecord, decode_record
from runctl.bus.registry import BUCKET, latest_records
from runctl.bus.server import NatsServer


class S(BaseModel):
    x: int = 0


@contextlib.asynccontextmanager
async def agents(url: str, run: str, n: int) -> AsyncIterator[list[Agent[S]]]:
    """``n`` ranks, each an agent with its own connection, in this process."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(Agent(S(), run=run, rank=i, url=url)) for i in range(n)
        ]


def rank_record(run: str, rank: str, version: int = 0, pid: int = 1) -> RankRecord:
    now = time.time()
    return RankRecord(
        run=run,
        rank=rank,
        host="h",
        pid=pid,
        started=now,
        heartbeat=now,
        heartbeat_interval=60.0,
        version=version,
        state={},
    )


def gathered(result: object) -> Gathered:
    assert isinstance(result, Gathered), result
    return result


@pytest.mark.anyio
async def test_a_broadcast_returns_once_every_live_rank_answered(
    nats_url: str, run_id: str
) -> None:
    async with agents(nats_url, run_id, 16) as ranks:
        # a deadline far beyond the hang guard: only "all answered" can end these in time
        async with await Client.connect(nats_url, timeout=60) as client:
            with anyio.fail_after(20):
                for _ in range(5):
                    res = gathered(await client.get(run_id, "all", fresh=True))
                    assert res.acknowledged == [str(i) for i in range(16)]
                    assert not res.missing
                res = gathered(await client.set(run_id, "all", "x", 3))
                assert len(res.results) == 16 and not res.missing
        assert all(a.state.x == 3 for a in ranks)


@pytest.mark.anyio
async def test_a_stop_after_a_stop_reuses_the_ranks_yet_ranks_that_left_are_not_waited_for(
    nats_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the list of ranks is reused for as long as this test takes; only a fresh read of the
    # registry can end the last broadcast before the client's 30 s deadline
    monkeypatch.setattr(bus_transport, "EXPECTED_TTL", 60.0)
    async with await Client.connect(nats_url, timeout=30) as client:
        registry = await client.registry()
        reads = 0
        read_records = registry.records

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal reads
            reads += 1
            return await read_records(*args, **kwargs)

        monkeypatch.setattr(registry, "records", counted)
        async with agents(nats_url, run_id, 2):
            async with contextlib.AsyncExitStack() as leaving:
                for rank in (2, 3):
                    await leaving.enter_async_context(
                        Agent(S(), run=run_id, rank=rank, url=nats_url)
                    )
                with anyio.fail_after(20):
                    first = gathered(await client.stop(run_id, "all", reason="one"))
                    second = gathered(await client.stop(run_id, "all", reason="two"))
                assert first.acknowledged == second.acknowledged == ["0", "1", "2", "3"]
                assert reads == 1  # the second stop reused what the first read
            # ranks 2 and 3 have left; the list still names them
            with anyio.fail_after(10):
                res = gathered(await client.get(run_id, "all", fresh=True))
            assert res.acknowledged == ["0", "1"] and not res.missing
            assert reads == 2  # read afresh once the two stayed silent


@pytest.mark.anyio
async def test_a_rank_that_stops_answering_is_reported_missing_not_waited_for_forever(
    nats_url: str, run_id: str
) -> None:
    frozen = spawn_python(
        textwrap.dedent("""
            import os, time
            from pydantic import BaseModel
            from runctl.agent import control
            class S(BaseModel):
                x: int = 0
            ctl = control(S(), heartbeat=5.0).wait_ready()
            os.write(1, b"READY\\n")
            time.sleep(60)
        """),
        env={
            "RUNCTL_RUN": run_id,
            "RUNCTL_RANK": "9",
            "RUNCTL_NATS_URL": nats_url,
            "PYTHONPATH": str(ROOT),
        },
    )
    try:
        assert frozen.stdout is not None
        with anyio.fail_after(20):  # the agent's own log lines share this stdout
            while "READY" not in await anyio.to_thread.run_sync(frozen.stdout.readline):
                assert frozen.poll() is None, frozen.stderr and frozen.stderr.read()
        os.kill(frozen.pid, signal.SIGSTOP)  # alive in the registry, silent on the bus
        async with (
            agents(nats_url, run_id, 3),
            await Client.connect(nats_url, timeout=0.5) as client,
        ):
            with anyio.fail_after(10):
                res = gathered(await client.get(run_id, "all", fresh=True))
            assert res.acknowledged == ["0", "1", "2"] and res.missing == ["9"]
            assert res.to_json()["ranks"]["9"] == {"outcome": "no_answer"}
    finally:
        frozen.kill()
        frozen.wait(10)
        for stream in (frozen.stdout, frozen.stderr):
            if stream is not None:
                stream.close()


async def registry_read_by(url: str, kind: str) -> None:
    """Create the registry bucket as a single server does (``direct``: reads are one
    batched direct get) or as a replicated bucket or an older runctl did (``consumer``:
    reads go through an ordered consumer)."""
    if kind == "consumer":
        async with await Client.connect(url) as c:
            await c.nc.jetstream().create_key_value(bucket=BUCKET, history=1, direct=False)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["direct", "consumer"])
async def test_many_broadcasts_leave_no_consumers_on_the_server(
    nats_server: NatsServer, run_id: str, kind: str
) -> None:
    await registry_read_by(nats_server.url, kind)
    async with (
        agents(nats_server.url, run_id, 2),
        await Client.connect(nats_server.url) as client,
    ):
        js = client.nc.jetstream()
        for _ in range(10):
            assert len(await client.ranks(run_id)) == 2  # one registry read each
            await anyio.sleep(0.3)  # past the client's reuse of the last read
            await client.get(run_id, "all", fresh=True)
        info = await js.stream_info(f"KV_{BUCKET}")
        if kind == "direct":
            assert info.config.allow_direct
            assert info.state.consumer_count == 0  # a direct get creates none
            return
        assert not info.config.allow_direct
        assert info.state.consumer_count > 0  # the reads did create consumers ...
        with anyio.fail_after(10):
            while True:  # ... which the server drops soon after each read
                info = await js.stream_info(f"KV_{BUCKET}")
                if info.state.consumer_count == 0:
                    break
                await anyio.sleep(0.2)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["direct", "consumer"])
async def test_the_registry_lists_every_rank_while_they_rewrite_their_records(
    nats_server: NatsServer, run_id: str, kind: str
) -> None:
    # A broadcast write makes every rank rewrite its record; a registry read at that
    # moment used to leave out a rank now and then (nats-server's last-per-subject start).
    url = nats_server.url
    await registry_read_by(url, kind)
    async with (
        agents(url, run_id, 8),
        await Client.connect(url) as writer,
        await Client.connect(url) as reader,
    ):
        listed: list[int] = []

        async def read() -> None:
            listed.append(len(await reader.ranks(run_id)))

        for value in range(200):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.set, run_id, "all", "x", value)
                tg.start_soon(read)
        assert listed == [8] * 200


def test_a_key_rewritten_during_a_watchers_initial_values_is_listed_once_with_its_last_value(
    run_id: str,
) -> None:
    # What an ordered consumer delivers when rank 0 rewrites its record while the initial
    # values are on their way: the rewrite is counted as pending, so it comes before the end
    # (a registry read under a broadcast once listed 10 of 8 ranks this way).
    def entry(rank: str, version: int, delta: int, value: bytes | None = None) -> KeyValue.Entry:
        data = (
            value if value is not None else msgspec.json.encode(rank_record(run_id, rank, version))
        )
        key = f"{run_id}.{rank}"
        return KeyValue.Entry(BUCKET, key, data, version, delta, None, None)

    entries = [
        entry("0", 1, 3),
        entry("1", 1, 2),
        entry("all", 1, 2),  # the run-wide record is not a rank
        entry("2", 1, 1, value=b"{not json"),
        entry("0", 2, 1),  # rank 0's rewrite, delivered before the end
        entry("2", 2, 0),  # rank 2's rewrite makes it readable again
    ]
    unreadable: list[UnreadableRecord] = []
    records = latest_records(entries, unreadable, decode_record)
    assert [(r.rank, r.version) for r in records] == [("1", 1), ("0", 2), ("2", 2)]
    assert unreadable == []

    unreadable = []
    records = latest_records([*entries, entry("1", 3, 0, value=b"[]")], unreadable, decode_record)
    assert [(r.rank, r.version) for r in records] == [("0", 2), ("2", 2)]
    assert [u.key for u in unreadable] == [f"{run_id}.1"]


@pytest.mark.anyio
async def test_a_run_with_more_ranks_than_one_direct_batch_is_listed_whole(
    nats_server: NatsServer, run_id: str
) -> None:
    # nats-server caps what one batched direct get returns (1,024 keys): past that the
    # read must fall back to a consumer, never return a cut-short list
    ranks = 1100
    async with await Client.connect(nats_server.url) as client:
        registry = await client.registry()
        acks = [await registry.put_nowait(rank_record(run_id, str(i), pid=i)) for i in range(ranks)]
        await asyncio.gather(*acks)
        listed = await registry.records(run_id)
        assert [r.rank for r in listed] == [str(i) for i in range(ranks)]


@pytest.mark.timeout(150)  # eight rank processes started in turn (two sizes, two loops)
def test_the_fanout_benchmark_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    # no timing asserted: numbers from a shared 2-core machine mean nothing here
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_fanout",
            "--sizes",
            "1,2",
            "--iterations",
            "5",
            "--warmup",
            "1",
            "--floor",
            "2",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "| 2 | uvloop |" in out.stdout
    (result,) = tmp_path.glob("fanout-*.json")
    report = json.loads(result.read_text())
    # every size once per agent loop, side by side
    assert [(row["ranks"], row["loop"]) for row in report["results"]] == [
        (1, "asyncio"),
        (1, "uvloop"),
        (2, "asyncio"),
        (2, "uvloop"),
    ]
    assert all(row[verb]["samples"] == 5 for row in report["results"] for verb in ("get", "stop"))
    # the floor of the same run: two bare nats-py responders, every broadcast answered by both
    assert report["floor"]["processes"] == 2 and report["floor"]["samples"] == 5
    assert "floor, same run: 2 bare nats-py processes" in out.stdout
    assert report["machine"]["cpus"] >= 1 and report["machine"]["nats_server"]


@pytest.mark.anyio
async def test_the_fanout_floor_says_when_its_processes_exit_instead_of_waiting(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.bench_fanout as bench_fanout

    # a floor process that cannot start (a missing module, say) ends the floor at once
    monkeypatch.setattr(bench_fanout, "FLOOR_PROGRAM", "raise SystemExit(3)\n")
    args = bench_fanout.parse(["--sizes", "1", "--floor", "2"])
    with anyio.fail_after(20), pytest.raises(RuntimeError, match=r"floor processes exited \(3\)"):
        await bench_fanout._run_floor(args, nats_url, None)
