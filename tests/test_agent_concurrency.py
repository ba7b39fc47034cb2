"""Commands arriving at once on a rank's own subject and on its run's ``all`` subject: the
two subscriptions deliver concurrently, so nothing a command needs may live on the agent
between its awaits (a shared per-call list once lost registry acks and raised
``TypeError: 'NoneType' object is not iterable`` in the middle of a burst)."""

from __future__ import annotations

import random
from typing import Any

import anyio
import msgspec
import nats
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from runctl.agent import Agent
from runctl.bus import messages as m
from runctl.bus.client import Client
from runctl.bus.subjects import command_subject


class Cfg(BaseModel):
    x: int = 0
    y: int = 0
    name: str = ""


COMMANDS = 600


def _command(i: int) -> tuple[str, bytes]:
    """A mixed bag: changes that take effect, no-op changes, reads, refusals, pings."""
    kind = i % 6
    if kind == 0:
        return "set", m.encode(m.Set(path="x", value=i))
    if kind == 1:
        return "patch", m.encode(m.Patch(value={"y": i, "name": f"n{i}"}))
    if kind == 2:
        return "get", m.encode(m.Get(path="x"))
    if kind == 3:
        return "set", m.encode(m.Set(path="x", value="not a number"))  # rejected
    if kind == 4:
        return "ping", m.encode(m.Ping())
    return "set", m.encode(m.Set(path="y", value=0))


@pytest.mark.anyio
async def test_hundreds_of_concurrent_commands_on_the_rank_and_all_subjects(
    nats_url: str, run_id: str
) -> None:
    random.seed(7)
    replies: list[m.Reply] = []
    with capture_logs() as logs:
        async with Agent(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=0.05) as agent:
            nc = await nats.connect(nats_url)
            try:

                async def send(i: int) -> None:
                    verb, payload = _command(i)
                    target: Any = 0 if random.random() < 0.5 else "all"
                    msg = await nc.request(
                        command_subject(run_id, target, verb), payload, timeout=20
                    )
                    replies.append(m.decode_reply(msg.data))

                with anyio.fail_after(50):
                    async with anyio.create_task_group() as tasks:
                        for i in range(COMMANDS):
                            tasks.start_soon(send, i)
            finally:
                await nc.close()
            assert agent.version > 0
            async with await Client.connect(nats_url) as client:
                # every registry write was sent and acknowledged in order: the last
                # record is the agent's current version, with its current state
                with anyio.fail_after(10):
                    info = await client.rank(run_id, 0)
                assert info.record.version == agent.version
                record_state = msgspec.json.decode(msgspec.json.encode(info.record.state))
                assert record_state == agent.state.model_dump()

    assert len(replies) == COMMANDS
    errors = [r for r in replies if isinstance(r, m.Err)]
    assert errors and {e.code for e in errors} == {"validation"}
    assert len(errors) == COMMANDS // 6
    problems = [e for e in logs if e["log_level"] in ("warning", "error", "critical")]
    assert problems == []
    failed_acks = [e for e in logs if e["event"] == "registry write failed"]
    assert failed_acks == []
