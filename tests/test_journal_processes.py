"""Changes that last, with real rank processes: a rank SIGKILLed and restarted comes back
with the changes it was told were applied, also when the nats-server was SIGKILLed right
after the answer; a change scheduled at a step applies there on every rank although one
rank restarted before that step."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_processes import Ranks

from runctl.bus import Client, Gathered
from runctl.bus.server import NatsServer

pytestmark = pytest.mark.anyio

#: a rank that reports what it replayed, then runs steps as the test tells it (a file
#: holds the step to run up to) and prints its state at every step it is asked to show
RANK = """
    import json, os, sys, time
    from pathlib import Path
    from pydantic import BaseModel, Field
    from runctl import control

    class Opt(BaseModel):
        lr: float = Field(0.1, gt=0)
        momentum: float = 0.9

    class S(BaseModel):
        epochs: int = 3
        opt: Opt = Opt()

    class Renamed(BaseModel):  # the next version of the code: epochs became max_epochs
        max_epochs: int = 3
        opt: Opt = Opt()

    state = Renamed() if os.environ.get("RENAMED") else S()
    ctl = control(state, heartbeat=0.2)
    ctl.wait_ready(30)
    say("READY", json.dumps([c.id for c in ctl.replayed], separators=(",", ":")),
        state.model_dump_json())
    if ctl.replay_skipped:
        say("SKIPPED", json.dumps([s.id for s in ctl.replay_skipped], separators=(",", ":")))
    goal = Path(os.environ["GOAL"])
    step = int(os.environ.get("START", "0"))
    ctl.sync(step)
    while not ctl.stop_requested:
        target = int(goal.read_text() or 0) if goal.exists() else step
        if step < target:
            step += 1
            ctl.sync(step)
            say("STEP", step, state.model_dump_json())
        else:
            time.sleep(0.01)
    ctl.close()
"""


@pytest.fixture
def ranks() -> Iterator[Ranks]:
    handle = Ranks()
    yield handle
    handle.cleanup()


def start(
    ranks: Ranks,
    run: str,
    rank: int,
    url: str,
    goal: Path,
    start: int = 0,
    env: dict[str, str] | None = None,
) -> None:
    old = ranks.procs.get(str(rank))
    if old is not None:  # a restart: the killed process's pipes are closed first
        old.wait(10)
        for stream in (old.stdout, old.stderr):
            if stream is not None:
                stream.close()
    ranks.start(
        run, rank, url, code=RANK, env={"GOAL": str(goal), "START": str(start), **(env or {})}
    )


async def ready(ranks: Ranks, rank: int) -> tuple[list[str], dict[str, object]]:
    line = await ranks.line(rank, "READY", timeout=40)
    _, replayed, state = line.split(" ", 2)
    return json.loads(replayed), json.loads(state)


async def three_changes(url: str, run: str) -> list[str]:
    async with await Client.connect(url, by="ops") as client:
        ids = []
        for res in (
            await client.set(run, 0, "opt.lr", 0.05),
            await client.patch(run, 0, {"epochs": 10, "opt": {"momentum": 0.8}}),
            await client.set(run, 0, "opt.lr", 0.02),
        ):
            assert res.journaled is True  # answered as applied: the journal holds it
            ids.append(res.change_id)
        return ids


async def test_three_changes_survive_kill_9_of_the_rank(
    nats_url: str, run_id: str, ranks: Ranks, tmp_path: Path
) -> None:
    goal = tmp_path / "goal"
    start(ranks, run_id, 0, nats_url, goal)
    assert (await ready(ranks, 0))[0] == []
    ids = await three_changes(nats_url, run_id)
    ranks.procs["0"].send_signal(signal.SIGKILL)
    await ranks.exit_code(0)
    start(ranks, run_id, 0, nats_url, goal)
    replayed, state = await ready(ranks, 0)
    assert replayed == ids
    assert state == {"epochs": 10, "opt": {"lr": 0.02, "momentum": 0.8}}


async def test_changes_survive_kill_9_of_the_rank_and_the_server(
    run_id: str, ranks: Ranks, tmp_path: Path
) -> None:
    store = tmp_path / "nats"
    server = NatsServer(store_dir=store).start()
    try:
        goal = tmp_path / "goal"
        start(ranks, run_id, 0, server.url, goal)
        await ready(ranks, 0)
        ids = await three_changes(server.url, run_id)
        # right after the last answer: both die at once, nothing flushed on the way out
        ranks.procs["0"].send_signal(signal.SIGKILL)
        server.kill()
        await ranks.exit_code(0)
        server = NatsServer(store_dir=store, port=server.port).start()
        start(ranks, run_id, 0, server.url, goal)
        replayed, state = await ready(ranks, 0)
        assert replayed == ids
        assert state == {"epochs": 10, "opt": {"lr": 0.02, "momentum": 0.8}}
    finally:
        server.stop()


async def test_a_scheduled_change_applies_at_its_step_on_every_rank(
    nats_url: str, run_id: str, ranks: Ranks, tmp_path: Path
) -> None:
    goal = tmp_path / "goal"
    goal.write_text("5")
    for rank in (0, 1):
        start(ranks, run_id, rank, nats_url, goal)
        await ready(ranks, rank)
    for rank in (0, 1):
        while not (await ranks.line(rank, "STEP")).startswith("STEP 5 "):
            pass
    async with await Client.connect(nats_url) as client:
        sched = await client.set(run_id, "all", "opt.lr", 0.001, at_step=20)
        assert isinstance(sched, Gathered)
        assert sched.journaled and not sched.cancelled
    # rank 1 dies at step 5 and comes back (resuming at step 5): the schedule comes back too
    ranks.procs["1"].send_signal(signal.SIGKILL)
    await ranks.exit_code(1)
    start(ranks, run_id, 1, nats_url, goal, start=5)
    replayed, state = await ready(ranks, 1)
    assert replayed == [] and state["opt"] == {"lr": 0.1, "momentum": 0.9}
    goal.write_text("25")
    for rank in (0, 1):
        seen: dict[int, float] = {}
        while len(seen) < 20:
            _, step, body = (await ranks.line(rank, "STEP")).split(" ", 2)
            seen[int(step)] = json.loads(body)["opt"]["lr"]
            if int(step) == 25:
                break
        assert seen[19] == 0.1 and seen[20] == 0.001, (rank, seen)


async def test_a_run_wide_change_reaches_a_rank_that_joins_later(
    nats_url: str, run_id: str, ranks: Ranks, tmp_path: Path
) -> None:
    goal = tmp_path / "goal"
    for rank in (0, 1):
        start(ranks, run_id, rank, nats_url, goal)
        await ready(ranks, rank)
    async with await Client.connect(nats_url) as client:
        every = await client.set(run_id, "all", "opt.lr", 0.03)
        await client.set(run_id, 1, "epochs", 9)  # rank 1's own: not for the new rank
    start(ranks, run_id, 2, nats_url, goal)  # an elastic scale-up: rank 2 of a run of 2
    replayed, state = await ready(ranks, 2)
    assert replayed == [every.change_id]
    assert state == {"epochs": 3, "opt": {"lr": 0.03, "momentum": 0.9}}


async def test_a_renamed_field_is_skipped_and_reported_and_the_rank_starts(
    nats_url: str, run_id: str, ranks: Ranks, tmp_path: Path
) -> None:
    goal = tmp_path / "goal"
    start(ranks, run_id, 0, nats_url, goal)
    await ready(ranks, 0)
    async with await Client.connect(nats_url) as client:
        gone = await client.set(run_id, 0, "epochs", 12)
        kept = await client.set(run_id, 0, "opt.lr", 0.04)
    ranks.procs["0"].send_signal(signal.SIGKILL)
    await ranks.exit_code(0)
    start(ranks, run_id, 0, nats_url, goal, env={"RENAMED": "1"})  # the new code
    replayed, state = await ready(ranks, 0)
    assert replayed == [kept.change_id]
    assert state == {"max_epochs": 3, "opt": {"lr": 0.04, "momentum": 0.9}}
    assert json.loads((await ranks.line(0, "SKIPPED")).split(" ", 1)[1]) == [gone.change_id]
    async with await Client.connect(nats_url) as client:
        (entry,) = [e for e in await client.history(run_id) if e.id == gone.change_id]
        assert entry.to_json()["replay_skipped"][0]["rank"] == "0"
