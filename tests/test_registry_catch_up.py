"""Read-your-writes after a write to many ranks (bus.registry.caught_up): the writer waits
until the registry shows every rank's new version with one batched read per attempt, not
one rank after another; a rank whose record is gone is not waited for. Counts reads, never
times them."""

from __future__ import annotations

import time

import anyio
import msgspec
import nats
import pytest

from runctl.bus.messages import RankRecord
from runctl.bus.registry import Registry, caught_up

RANKS = 64


def record(run: str, rank: int, version: int) -> RankRecord:
    now = time.time()
    return RankRecord(
        run=run,
        rank=str(rank),
        host="h",
        pid=1,
        started=now,
        heartbeat=now,
        heartbeat_interval=60.0,
        version=version,
        state={"x": version},
    )


@pytest.mark.anyio
async def test_64_ranks_already_caught_up_take_one_read(nats_url: str, run_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        registry = await Registry.open(nc)
        for rank in range(RANKS):
            await registry.put(record(run_id, rank, 3))
        with anyio.fail_after(10):
            reads = await caught_up(registry, run_id, {str(r): 3 for r in range(RANKS)})
        assert reads == 1
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_the_wait_ends_when_the_last_rank_shows_its_version(
    nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        registry = await Registry.open(nc)
        for rank in range(RANKS):
            await registry.put(record(run_id, rank, 1))
        wanted = {str(r): 2 for r in range(RANKS)}
        reads: list[int] = []

        async def wait() -> None:
            reads.append(await caught_up(registry, run_id, wanted, every=0.005))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                for rank in range(RANKS):  # the ranks' writes land one after another
                    await registry.put(record(run_id, rank, 2))
                    assert not reads or rank == RANKS - 1
        records = {r.rank: r.version for r in await registry.records(run_id)}
        assert all(records[rank] >= 2 for rank in wanted)
        assert len(reads) == 1 and reads[0] >= 1
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_rank_whose_record_is_gone_is_not_waited_for(nats_url: str, run_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        registry = await Registry.open(nc)
        await registry.put(record(run_id, 0, 5))
        with anyio.fail_after(10):
            assert await caught_up(registry, run_id, {"0": 5, "1": 9}) == 1
            assert await caught_up(registry, run_id, {"7": 9}) == 1
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_read_without_states_gives_the_same_records_with_the_state_left_raw(
    nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        registry = await Registry.open(nc)
        for rank in range(3):
            await registry.put(record(run_id, rank, rank + 1))
        with anyio.fail_after(10):
            full = await registry.records(run_id)
            heads = await registry.records(run_id, states=False)
        assert [(r.rank, r.version, r.status, r.heartbeat) for r in heads] == [
            (r.rank, r.version, r.status, r.heartbeat) for r in full
        ]
        assert [r.state for r in full] == [{"x": 1}, {"x": 2}, {"x": 3}]
        assert [msgspec.json.decode(r.state) for r in heads] == [r.state for r in full]
    finally:
        await nc.close()
