"""``--then set``: the watcher changes the state of every rank of the run when a condition
fires, once per firing, as itself (the change journal names it), and says what happened."""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import pytest
from pydantic import BaseModel

from runctl.agent import Agent
from runctl.bus import Client
from runctl.bus.conditions import parse
from runctl.cli.watch import Watcher, WatchOptions, parse_action

pytestmark = pytest.mark.anyio


class Train(BaseModel):
    loss: float = 1.0
    lr: float = 0.1
    note: str = ""


class Collect:
    name = "collect"

    def __init__(self) -> None:
        self.notices: list[Any] = []

    async def send(self, notice: Any, watcher: str) -> None:
        self.notices.append(notice)

    def of(self, kind: str) -> list[Any]:
        return [n for n in self.notices if n.kind == kind]


async def _until(predicate: Any, timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.02)


async def test_then_set_changes_every_rank_once_as_the_watcher(nats_url: str, run_id: str) -> None:
    seen = Collect()
    options = WatchOptions(
        run=run_id,
        conditions=[parse("loss > 10")],
        action=parse_action("set lr=0.001 note=diverged"),
        name="lr-guard",
    )
    async with (
        Agent(Train(), run=run_id, rank=0, url=nats_url, heartbeat=0.1) as a0,
        Agent(Train(), run=run_id, rank=1, url=nats_url, heartbeat=0.1) as a1,
        await Client.connect(nats_url) as client,
        await Client.connect(nats_url, by="lr-guard") as watcher_client,
        anyio.create_task_group() as tasks,
    ):
        await tasks.start(Watcher(watcher_client, options, [seen]).run)
        await client.set(run_id, 1, "loss", 50.0)
        await _until(lambda: seen.of("action"))
        (action,) = seen.of("action")
        assert action.data["complete"] and action.data["acknowledged"] == ["0", "1"]
        assert action.summary == (
            f"run {run_id}: applied set lr=0.001 note=diverged after 'loss > 10': "
            "acknowledged by rank(s) 0, 1"
        )
        assert (a0.state.lr, a0.state.note) == (0.001, "diverged")  # "diverged": a string
        assert (a1.state.lr, a1.state.note) == (0.001, "diverged")
        # still true on later heartbeats: no second action
        await client.set(run_id, 1, "loss", 60.0)
        since = time.time()
        with anyio.fail_after(15):  # five more heartbeats, each one a chance to repeat
            while True:
                if (await client.rank(run_id, "1")).record.heartbeat > since + 0.5:
                    break
                await anyio.sleep(0.05)
        history = await client.history(run_id)
        mine = [e for e in history if _name(e.by) == "lr-guard"]
        assert [e.verb for e in mine] == ["patch"]
        tasks.cancel_scope.cancel()
    assert len(seen.of("condition")) == 1 and len(seen.of("action")) == 1


def _name(by: Any) -> str:
    value = by if isinstance(by, dict) else msgspec.to_builtins(by)
    return str((value or {}).get("name", ""))
