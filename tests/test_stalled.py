"""A rank whose program stops advancing while its agent thread keeps heartbeating is
``stalled`` (not ``alive``), everywhere ranks are shown, and ``alive`` again when the
program resumes; events say when each happened; the run shows which rank lags."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import anyio
import msgspec
import pytest
from conftest import GatewayFactory
from nats.aio.msg import Msg
from test_agent_processes import Ranks

from runctl.bus import Client
from runctl.bus import messages as m
from runctl.bus.subjects import events_wildcard

pytestmark = pytest.mark.anyio

#: a training-like loop (also tests/test_watch.py): freezes while ``hang`` (no step, no
#: tick: its agent keeps running, as when a program is stuck in a collective), raises
#: when ``crash``, and lets its loss diverge to NaN when ``diverge``
LOOP = """
    import os, time
    from pydantic import BaseModel
    from runctl import control

    class S(BaseModel):
        hang: bool = False
        crash: bool = False
        diverge: bool = False
        loss: float = 1.0

    state = S()
    ctl = control(state, heartbeat=float(os.environ["HEARTBEAT"]))
    ctl.wait_ready()
    say("READY", ctl.run, ctl.rank)
    step = 0
    while not ctl.stop_requested:
        while state.hang and not ctl.stop_requested:
            time.sleep(0.005)
        if state.crash:
            raise RuntimeError(f"boom at step {step}")
        if state.diverge:
            state.loss = float("nan")
        ctl.sync(step)
        step += 1
        time.sleep(0.01)
    say("STOPPED", ctl.stop_reason)
    ctl.close()
"""
STALL_ENV = {"RUNCTL_STALL_AFTER": "1.0", "RUNCTL_STALL_FACTOR": "10"}


@pytest.fixture
def ranks() -> Iterator[Ranks]:
    handle = Ranks()
    yield handle
    handle.cleanup()


async def _status(client: Client, run: str, rank: str) -> str:
    return (await client.rank(run, rank)).liveness


async def _wait_status(client: Client, run: str, rank: str, want: str, timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            if await _status(client, run, rank) == want:
                return
            await anyio.sleep(0.05)


async def _wait_event(events: list[m.Event], kind: str, timeout: float = 10) -> m.Event:
    with anyio.fail_after(timeout):
        while True:
            found = [e for e in events if e.kind == kind]
            if found:
                return found[0]
            await anyio.sleep(0.02)


async def advancing(client: Client, run: str, *ranks: int, timeout: float = 20) -> None:
    """Wait until each rank's agent has seen its program advance: only from then on can a
    freeze count as a stall (a program that never advanced is never stalled)."""
    with anyio.fail_after(timeout):
        for rank in ranks:
            while True:
                if (await client.rank(run, rank)).record.progress_ts is not None:
                    break
                await anyio.sleep(0.05)


async def test_frozen_loop_is_stalled_then_alive_again(
    nats_url: str, run_id: str, ranks: Ranks, gateway: GatewayFactory
) -> None:
    for rank in (0, 1):
        ranks.start(run_id, rank, nats_url, code=LOOP, heartbeat=0.2, env=STALL_ENV)
    await ranks.ready(0, 1)
    http = gateway()
    events: list[m.Event] = []

    async def on_event(msg: Msg) -> None:
        events.append(m.decode_event(msg.data))

    async with await Client.connect(nats_url) as client:
        sub = await client.nc.subscribe(events_wildcard(run_id), cb=on_event)
        # both advance: alive (the threshold is known once steps were seen)
        with anyio.fail_after(15):
            while True:
                infos = await client.ranks(run_id)
                if all(i.liveness == "alive" and (i.record.step or 0) > 5 for i in infos):
                    break
                await anyio.sleep(0.05)
        # the floor when steps are fast (more if a loaded machine slowed them down)
        assert all(i.record.stall_after >= 1.0 for i in infos)

        await client.set(run_id, 0, "hang", True)
        await _wait_status(client, run_id, "0", "stalled", timeout=15)
        # the frozen rank is still heartbeating: stalled is not stale
        info = await client.rank(run_id, "0")
        assert info.age < 1.5
        assert await _status(client, run_id, "1") == "alive"
        stalled = await _wait_event(events, "stalled")
        assert stalled.rank == "0"
        # the threshold may have grown past the floor if steps slowed down under load
        assert stalled.data["idle_s"] > stalled.data["stall_after_s"] >= 1.0

        # shown everywhere ranks are shown: GET /runs, GET /runs/RUN, runctl ls
        listing = await anyio.to_thread.run_sync(lambda: http.get("/runs").json())
        run = next(r for r in listing["runs"] if r["run"] == run_id)
        assert run["counts"]["stalled"] == 1
        by_rank = {r["rank"]: r for r in run["ranks"]}
        assert by_rank["0"]["status"] == "stalled"
        assert by_rank["0"]["idle_s"] > 1.0
        one = await anyio.to_thread.run_sync(lambda: http.get(f"/runs/{run_id}").json())
        # rank 1 kept stepping while rank 0 is frozen: the spread says who lags
        with anyio.fail_after(10):
            while "0" not in one["spread"]["behind"]:
                await anyio.sleep(0.1)
                one = await anyio.to_thread.run_sync(lambda: http.get(f"/runs/{run_id}").json())
        assert one["spread"]["summary"].startswith("rank 0 is ")
        ls = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "runctl", "ls", run_id, "--nats", nats_url],
                capture_output=True,
                text=True,
                timeout=30,
            )
        )
        assert ls.returncode == 0, ls.stderr
        line0 = next(ln for ln in ls.stdout.splitlines() if ln.split()[:2] == [run_id, "0"])
        assert line0.split()[2] == "stalled", ls.stdout
        assert f"{run_id}: rank 0 is " in ls.stdout
        as_json = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "runctl", "ls", run_id, "--json", "--nats", nats_url],
                capture_output=True,
                text=True,
                timeout=30,
            )
        )
        assert {r["rank"]: r["status"] for r in json.loads(as_json.stdout)}["0"] == "stalled"
        # the registry record itself carries what every reader decides from
        record = msgspec.to_builtins((await client.rank(run_id, "0")).record)
        assert record["progress_ts"] is not None and record["stall_after"] >= 1.0

        # it resumes: alive again, and an event says so
        await client.set(run_id, 0, "hang", False)
        await _wait_status(client, run_id, "0", "alive", timeout=15)
        await _wait_event(events, "recovered")
        assert [e.rank for e in events if e.kind in ("stalled", "recovered")] == ["0", "0"]
        await sub.unsubscribe()
        await client.stop(run_id, "all")
    for rank in (0, 1):
        assert await ranks.exit_code(rank) == 0


async def test_a_program_that_never_reports_progress_is_never_stalled(
    nats_url: str, run_id: str, ranks: Ranks
) -> None:
    code = LOOP.replace("ctl.sync(step)", "pass")  # no step, no tick: nothing to judge
    ranks.start(run_id, 0, nats_url, code=code, heartbeat=0.2, env=STALL_ENV)
    await ranks.ready(0)
    async with await Client.connect(nats_url) as client:
        await client.set(run_id, 0, "hang", True)
        # several thresholds later the agent has sampled it many times: still alive
        with anyio.fail_after(15):
            while True:
                info = await client.rank(run_id, "0")
                if info.record.heartbeat - info.record.started > 3.0:
                    break
                await anyio.sleep(0.1)
        assert info.liveness == "alive"
        assert info.record.progress_ts is None
        await client.stop(run_id, "all")
    assert await ranks.exit_code(0) == 0
