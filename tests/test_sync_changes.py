"""Synchronised changes and run-wide stop through the real bus (ranks as threads here, each
with its own agent, connection and loop; tests/test_distributed*.py uses processes)."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
from pydantic import BaseModel, Field

from runctl.agent import control
from runctl.bus import BadRequest, Client, Gathered


class Cfg(BaseModel):
    lr: float = Field(0.1, gt=0)
    flag: bool = False


class Ranks:
    """N ranks stepping at different speeds, each logging (step, lr) after sync()."""

    def __init__(self, url: str, run: str, n: int = 2, steps: int = 2000) -> None:
        self.logs: dict[int, list[tuple[int, float]]] = {i: [] for i in range(n)}
        self.ready = threading.Barrier(n + 1)
        self.threads = [
            threading.Thread(target=self._rank, args=(url, run, i, steps), daemon=True)
            for i in range(n)
        ]
        for t in self.threads:
            t.start()
        self.ready.wait(timeout=20)

    def _rank(self, url: str, run: str, i: int, steps: int) -> None:
        state = Cfg()
        with control(state, run=run, rank=i, url=url, heartbeat=0.2) as ctl:
            ctl.wait_ready()
            ctl.sync(0)
            self.ready.wait(timeout=20)
            for step in range(steps):
                ctl.sync(step)
                self.logs[i].append((step, state.lr))
                if ctl.stop_requested:
                    break
                time.sleep(0.004 * (i + 1))  # unequal speeds: no barrier between ranks

    def join(self) -> None:
        for t in self.threads:
            t.join(timeout=30)
            assert not t.is_alive()


def first_step_with(log: list[tuple[int, float]], lr: float) -> int:
    return next(step for step, value in log if value == lr)


@pytest.mark.anyio
async def test_synchronised_change_applies_at_the_same_step_on_every_rank(
    nats_url: str, run_id: str
) -> None:
    ranks = await anyio.to_thread.run_sync(lambda: Ranks(nats_url, run_id))
    async with await Client.connect(nats_url) as client:
        await anyio.sleep(0.3)
        result = await client.set(run_id, "all", "lr", 0.5, sync=True)
        assert isinstance(result, Gathered)
        assert result.acknowledged == ["0", "1"] and not result.errors
        assert result.at_step is not None
        report = result.to_json()
        assert report["cancelled"] is False
        assert {r["outcome"] for r in report["ranks"].values()} == {"pending"}
        stop = await client.stop(run_id, "all", "done", sync=True)
        assert isinstance(stop, Gathered) and stop.acknowledged == ["0", "1"]
    await anyio.to_thread.run_sync(ranks.join)
    switch = {i: first_step_with(log, 0.5) for i, log in ranks.logs.items()}
    assert switch == {0: result.at_step, 1: result.at_step}
    # before at_step every rank still ran with the old value
    assert all(lr == 0.1 for log in ranks.logs.values() for s, lr in log if s < result.at_step)
    # the synchronised stop ended both ranks at the same step
    assert ranks.logs[0][-1][0] == ranks.logs[1][-1][0] == stop.at_step


@pytest.mark.anyio
async def test_invalid_synchronised_change_is_refused_by_every_rank(
    nats_url: str, run_id: str
) -> None:
    ranks = await anyio.to_thread.run_sync(lambda: Ranks(nats_url, run_id, steps=400))
    async with await Client.connect(nats_url) as client:
        result = await client.set(run_id, "all", "lr", -1.0, sync=True)
        assert isinstance(result, Gathered)
        assert sorted(result.errors) == ["0", "1"] and not result.results
        assert all(err.code == "validation" for err in result.errors.values())
        await client.stop(run_id, "all")
    await anyio.to_thread.run_sync(ranks.join)
    assert all(lr == 0.1 for log in ranks.logs.values() for _, lr in log)


@pytest.mark.anyio
async def test_a_rank_past_the_step_makes_the_change_cancelled_everywhere(
    nats_url: str, run_id: str
) -> None:
    ranks = await anyio.to_thread.run_sync(lambda: Ranks(nats_url, run_id, steps=3000))
    async with await Client.connect(nats_url) as client:
        await anyio.sleep(0.3)
        # margin 0: at_step == the fastest rank's last reported step, which it has passed
        result = await client.set(run_id, "all", "flag", True, sync=True, margin=0)
        assert isinstance(result, Gathered)
        assert any(err.code == "too_late" for err in result.errors.values())
        report = result.to_json()
        assert report["cancelled"] is True
        outcomes = {r["outcome"] for r in report["ranks"].values()}
        assert "applied" not in outcomes and outcomes <= {"cancelled", "rejected"}
        await anyio.sleep(0.5)
        pings = await client.ping(run_id, "all")
        assert isinstance(pings, Gathered)
        assert all(r.value["pending"] == [] for r in pings.results.values())
        states = await client.get(run_id, "all", fresh=True)
        assert isinstance(states, Gathered)
        assert {rank: r.value["flag"] for rank, r in states.results.items()} == {
            "0": False,
            "1": False,
        }
        await client.stop(run_id, "all")
    await anyio.to_thread.run_sync(ranks.join)


@pytest.mark.anyio
async def test_sync_needs_ranks_that_report_steps(nats_url: str, run_id: str) -> None:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        ctl.wait_ready()
        async with await Client.connect(nats_url) as client:
            with pytest.raises(BadRequest, match=r"ctl\.sync"):
                await client.set(run_id, "all", "lr", 0.2, sync=True)


@pytest.mark.anyio
async def test_a_rank_starting_after_a_run_wide_stop_sees_it(nats_url: str, run_id: str) -> None:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as first:
        first.wait_ready()
        async with await Client.connect(nats_url) as client:
            await client.stop(run_id, "all", "preempted")
        assert first.stop_requested
        with control(Cfg(), run=run_id, rank=1, url=nats_url) as late:
            late.wait_ready()
            assert late.stop_requested
            assert late.stop_reason == "preempted"


@pytest.mark.anyio
async def test_a_single_rank_stop_is_not_recorded_for_the_run(nats_url: str, run_id: str) -> None:
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as first:
        first.wait_ready()
        async with await Client.connect(nats_url) as client:
            await client.stop(run_id, 0)
        assert first.stop_requested
        with control(Cfg(), run=run_id, rank=1, url=nats_url) as other:
            other.wait_ready()
            assert not other.stop_requested
