"""`nats sub 'runctl.>'` is a debugging tool: it must not turn "no such rank" into a timeout.

Any subscriber matching a command subject suppresses the server's no-responders status, so
the client falls back to the registry; these tests keep such an observer subscribed."""

from __future__ import annotations

import nats
import pytest
from pydantic import BaseModel

from runctl.agent import control
from runctl.bus import Client, NotFound, Result


class Cfg(BaseModel):
    lr: float = 0.1


@pytest.mark.anyio
@pytest.mark.parametrize("rank", ["0", "all"])
async def test_unknown_rank_is_not_found_while_an_observer_listens(
    nats_url: str, run_id: str, rank: str
) -> None:
    observer = await nats.connect(nats_url)
    try:
        await observer.subscribe("runctl.>")
        await observer.flush()
        # a deadline far longer than the registry check: a Timeout would be the old bug
        async with await Client.connect(nats_url, timeout=10.0) as client:
            with pytest.raises(NotFound):
                await client.get(run_id, rank, fresh=True)
            with pytest.raises(NotFound):
                await client.set(run_id, rank, "lr", 0.2)
    finally:
        await observer.close()


@pytest.mark.anyio
async def test_exited_rank_is_not_found_and_live_rank_answers_while_observed(
    nats_url: str, run_id: str
) -> None:
    observer = await nats.connect(nats_url)
    try:
        await observer.subscribe("runctl.>")
        async with await Client.connect(nats_url, timeout=10.0) as client:
            with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
                ctl.wait_ready()
                result = await client.set(run_id, 0, "lr", 0.3)
                assert isinstance(result, Result) and result.value["lr"] == 0.3
            with pytest.raises(NotFound):
                await client.get(run_id, 0, fresh=True)
    finally:
        await observer.close()
