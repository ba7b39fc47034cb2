"""Every rank, as real processes: four plain agents (no torch) stepping independently.

Broadcast stop with acknowledgement, synchronised changes and stops applied at the same step
(asserted from each rank's own log of (step, lr)), liveness with a SIGKILLed rank, stop
escalation (only when asked for), and the recorded run-wide stop seen by a late rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from conftest import ROOT, spawn_python, wait_exit

from runctl.bus import Client, Gathered, RankInfo, Result
from runctl.bus import messages as m
from runctl.bus.subjects import events_wildcard

#: a training-like loop: one ``ctl.sync(step)`` per step, its (step, lr, flag) logged to a
#: file (a pipe could fill up and block the rank), stdout only for a few markers
RANK_CODE = """
    import json, os, signal, sys, time
    from pydantic import BaseModel, Field
    from runctl.agent import control

    def say(*words):
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())

    class Cfg(BaseModel):
        lr: float = Field(0.1, gt=0)
        flag: bool = False
        quit: bool = False

    behaviour = os.environ.get("BEHAVIOUR", "obey")   # obey | ignore | ignore-sigterm
    if behaviour == "ignore-sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    state = Cfg()
    ctl = control(state)  # run, rank and url from the environment; 1 s heartbeat
    ctl.wait_ready()
    log = open(os.environ["STEP_LOG"], "w")
    say("READY", ctl.run, ctl.rank, os.getpid(), ctl.stop_requested)
    step = 0
    while not state.quit:
        ctl.sync(step)
        if ctl.stop_requested and behaviour == "obey":
            break
        log.write(json.dumps([step, state.lr, state.flag]) + "\\n")
        log.flush()
        step += 1
        time.sleep(0.005)
    say("STOPPED", step, ctl.stop_reason)
    ctl.close()
    sys.exit(0)
"""


class Ranks:
    """Rank processes of one run; whatever is still running at the end is killed."""

    def __init__(self, run: str, url: str, logs: Path) -> None:
        self.run, self.url, self.logs = run, url, logs
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, rank: int, behaviour: str = "obey") -> subprocess.Popen[str]:
        proc = spawn_python(
            RANK_CODE,
            env={
                "RUNCTL_RUN": self.run,
                "RUNCTL_RANK": str(rank),
                "RUNCTL_NATS_URL": self.url,
                "STEP_LOG": str(self.logs / f"rank{rank}.jsonl"),
                "BEHAVIOUR": behaviour,
                "PYTHONPATH": str(ROOT),
            },
        )
        self.procs[str(rank)] = proc
        return proc

    async def line(self, rank: int | str, prefix: str, timeout: float = 30) -> list[str]:
        proc = self.procs[str(rank)]
        assert proc.stdout is not None
        with anyio.fail_after(timeout):
            while True:
                text = await anyio.to_thread.run_sync(proc.stdout.readline)
                if not text:
                    _, err = await anyio.to_thread.run_sync(proc.communicate)
                    raise AssertionError(f"rank {rank} exited ({proc.returncode}): {err}")
                if prefix in text:  # the agent thread's log lines may share the line
                    return text[text.index(prefix) :].split()[1:]

    async def ready(self, *ranks: int) -> None:
        for rank in ranks:
            await self.line(rank, "READY")

    async def exit_code(self, rank: int | str, timeout: float = 20) -> int:
        return await wait_exit(self.procs[str(rank)], timeout, f"rank {rank}")

    def steps(self, rank: int | str) -> list[tuple[int, float, bool]]:
        lines = (self.logs / f"rank{rank}.jsonl").read_text().splitlines()
        return [tuple(json.loads(line)) for line in lines]

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def ranks(run_id: str, nats_url: str, tmp_path: Path) -> Iterator[Ranks]:
    handle = Ranks(run_id, nats_url, tmp_path)
    yield handle
    handle.cleanup()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    async with await Client.connect(nats_url) as c:
        yield c


def gathered(result: Result | Gathered) -> Gathered:
    assert isinstance(result, Gathered), result
    return result


async def liveness(client: Client, run: str) -> dict[str, str]:
    return {i.record.rank: i.liveness for i in await client.ranks(run)}


async def until(predicate: object, timeout: float = 15) -> None:
    assert callable(predicate)
    with anyio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 -- polling the registry, not an event
            await anyio.sleep(0.05)


async def stepping(client: Client, run: str, n: int) -> None:
    """Until ``n`` ranks have reported a step (a synchronised change needs every rank's)."""

    async def ok() -> bool:
        infos = await client.ranks(run)
        return len(infos) == n and all(i.record.step is not None for i in infos)

    await until(ok)


FOUR = ["0", "1", "2", "3"]


# --- liveness and broadcast stop ---------------------------------------------------------------


@pytest.mark.anyio
async def test_four_ranks_are_listed_then_all_acknowledge_a_stop_and_exit(
    ranks: Ranks, client: Client, run_id: str
) -> None:
    for n in range(4):
        ranks.start(n)
    await ranks.ready(0, 1, 2, 3)
    infos = await client.ranks(run_id)
    assert [i.record.rank for i in infos] == FOUR
    pids = {str(r): p.pid for r, p in ranks.procs.items()}
    for info in infos:
        summary = info.summary()
        assert summary["status"] == "alive" and summary["pid"] == pids[info.record.rank]
        assert summary["host"] and summary["version"] == 0 and summary["heartbeat_age_s"] < 5

    stop = gathered(await client.stop(run_id, "all", reason="maintenance"))
    assert stop.acknowledged == FOUR and not stop.missing and not stop.errors
    report = stop.to_json()
    assert report["missing"] == [] and {r["outcome"] for r in report["ranks"].values()} == {
        "applied"
    }
    for rank in FOUR:
        assert (await ranks.line(rank, "STOPPED"))[1:] == ["maintenance"]
        assert await ranks.exit_code(rank) == 0
    # each said goodbye: exited, not stale
    assert await liveness(client, run_id) == dict.fromkeys(FOUR, "exited")

    # the stop was recorded for the run: a rank starting later stops at once
    ranks.start(4)
    ready = await ranks.line(4, "READY")
    assert ready[1:] == ["4", str(ranks.procs["4"].pid), "True"]
    assert await ranks.line(4, "STOPPED") == ["0", "maintenance"]
    assert await ranks.exit_code(4) == 0


@pytest.mark.anyio
async def test_a_sigkilled_rank_is_stale_in_ls_while_the_others_keep_serving(
    ranks: Ranks, client: Client, run_id: str, nats_url: str
) -> None:
    for n in range(4):
        ranks.start(n)
    await ranks.ready(0, 1, 2, 3)
    ranks.procs["2"].send_signal(signal.SIGKILL)
    assert await ranks.exit_code(2) == -signal.SIGKILL

    async def two_is_stale() -> bool:
        return (await liveness(client, run_id)).get("2") == "stale"

    await until(two_is_stale)
    infos: list[RankInfo] = [i for i in await client.runs() if i.record.run == run_id]
    assert {i.record.rank: i.liveness for i in infos} == {
        "0": "alive",
        "1": "alive",
        "2": "stale",
        "3": "alive",
    }
    # the others keep serving; a broadcast gives the stale rank a short grace, then names
    # it stale (not missing: a dead rank does not make every answer a partial one)
    res = gathered(await client.set(run_id, "all", "flag", True))
    assert res.acknowledged == ["0", "1", "3"] and not res.missing and res.stale == ["2"]
    printed = await anyio.run_process(
        [sys.executable, "-m", "runctl", "get", run_id, "flag", "--fresh"],
        cwd=ROOT,
        check=False,
        env={**os.environ, "RUNCTL_NATS_URL": nats_url, "PYTHONPATH": str(ROOT)},
    )
    assert printed.returncode == 0, printed.stderr.decode()
    assert "rank 2: no answer (stale: no heartbeat for three intervals)" in printed.stderr.decode()
    fresh = gathered(await client.get(run_id, "all", "flag", fresh=True))
    assert {r: x.value for r, x in fresh.results.items()} == dict.fromkeys(["0", "1", "3"], True)
    # the stale rank's last state stays readable from the registry
    cached = gathered(await client.get(run_id, "all", "flag"))
    assert cached.to_json()["ranks"]["2"]["status"] == "stale"
    assert cached.results["2"].value is False

    stop = gathered(await client.stop(run_id, "all"))
    assert stop.acknowledged == ["0", "1", "3"] and stop.stale == ["2"]
    for rank in ("0", "1", "3"):
        assert await ranks.exit_code(rank) == 0


# --- synchronised changes --------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_synchronised_lr_change_and_stop_apply_at_the_same_step_on_four_ranks(
    ranks: Ranks, client: Client, run_id: str
) -> None:
    for n in range(4):
        ranks.start(n)
    await ranks.ready(0, 1, 2, 3)
    await stepping(client, run_id, 4)

    change = gathered(await client.set(run_id, "all", "lr", 0.5, sync=True))
    assert change.acknowledged == FOUR and not change.errors and change.at_step is not None
    assert all(
        r.value["pending"] and r.value["at_step"] == change.at_step for r in change.results.values()
    )

    async def applied() -> bool:
        versions = {i.record.version for i in await client.ranks(run_id)}
        return versions == {1}  # each rank reports the state version it runs

    await until(applied)

    stop = gathered(await client.stop(run_id, "all", reason="enough", sync=True))
    assert stop.acknowledged == FOUR and stop.at_step is not None
    assert stop.at_step > change.at_step
    for rank in FOUR:
        assert await ranks.line(rank, "STOPPED") == [str(stop.at_step), "enough"]
        assert await ranks.exit_code(rank) == 0

    for rank in FOUR:
        log = ranks.steps(rank)
        steps = [s for s, _, _ in log]
        assert steps == list(range(stop.at_step))  # every step, none after the stop step
        # the rank ran its steps with the old lr up to at_step, the new one from at_step
        assert {lr for s, lr, _ in log if s < change.at_step} == {0.1}
        assert {lr for s, lr, _ in log if s >= change.at_step} == {0.5}


# --- stop modes --------------------------------------------------------------------------------


async def escalations(client: Client, run: str, into: list[m.Event]) -> None:
    sub = await client.nc.subscribe(events_wildcard(run))
    try:
        async for msg in sub.messages:
            event = m.decode_event(msg.data)
            if event.kind == "escalated":
                into.append(event)
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()


@pytest.mark.anyio
async def test_terminate_escalates_only_on_ranks_that_do_not_stop(
    ranks: Ranks, client: Client, run_id: str
) -> None:
    ranks.start(0)
    ranks.start(1)
    ranks.start(2, behaviour="ignore")
    ranks.start(3, behaviour="ignore-sigterm")
    await ranks.ready(0, 1, 2, 3)
    events: list[m.Event] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(escalations, client, run_id, events)
        await client.nc.flush()
        stop = gathered(await client.stop(run_id, "all", mode="terminate", grace=0.5))
        assert stop.acknowledged == FOUR
        assert all(
            r.value == {"stop_requested": True, "mode": "terminate"} for r in stop.results.values()
        )
        # ranks that stop by themselves exit normally: their escalation ends with them
        assert await ranks.exit_code(0) == 0
        assert await ranks.exit_code(1) == 0
        # a rank that ignores stop_requested gets SIGTERM after the grace period
        assert await ranks.exit_code(2) == -signal.SIGTERM
        # one that ignores SIGTERM too gets SIGKILL after twice the grace period
        assert await ranks.exit_code(3) == -signal.SIGKILL
        await anyio.sleep(0.2)
        tg.cancel_scope.cancel()
    signalled = sorted((e.rank, e.data["signal"]) for e in events)
    assert signalled == [("2", "SIGTERM"), ("3", "SIGKILL"), ("3", "SIGTERM")]


@pytest.mark.anyio
async def test_a_graceful_stop_never_signals_a_rank(
    ranks: Ranks, client: Client, run_id: str
) -> None:
    ranks.start(0)
    ranks.start(1, behaviour="ignore")
    await ranks.ready(0, 1)
    events: list[m.Event] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(escalations, client, run_id, events)
        await client.nc.flush()
        stop = gathered(await client.stop(run_id, "all", mode="graceful", grace=0.2))
        assert stop.acknowledged == ["0", "1"]
        assert await ranks.exit_code(0) == 0
        await anyio.sleep(1.5)  # well past grace, and past 2 x grace
        assert ranks.procs["1"].poll() is None  # still running: nobody signalled it
        pong = await client.ping(run_id, 1)
        assert isinstance(pong, Result)
        record = await client.rank(run_id, 1)
        assert record.record.stop_requested and record.liveness == "alive"
        await client.set(run_id, 1, "quit", True)  # the program's own way out
        assert await ranks.exit_code(1) == 0
        tg.cancel_scope.cancel()
    assert events == []
