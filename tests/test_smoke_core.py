"""End to end through the real bus: one sync program, controlled by the Python client."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from runctl.agent import control
from runctl.bus import Client, NotFound, Result, ValidationRejected


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    kind: Literal["sgd", "adam"] = "sgd"


class Cfg(BaseModel):
    epochs: int = 3
    seed: int | None = None
    opt: Opt = Opt()


@pytest.mark.anyio
async def test_set_get_and_reject_through_the_bus(nats_url: str, run_id: str) -> None:
    state = Cfg()
    held = state.opt
    with control(state, run=run_id, rank=0, url=nats_url) as ctl:
        ctl.wait_ready()
        async with await Client.connect(nats_url) as client:
            result = await client.set(run_id, 0, "opt.lr", 0.5)
            assert isinstance(result, Result)
            assert result.changed and result.version == 1
            assert held.lr == 0.5  # the program's reference sees it
            read = await client.get(run_id, 0, "opt.lr")
            assert isinstance(read, Result) and read.value == 0.5
            with pytest.raises(ValidationRejected) as info:
                await client.set(run_id, 0, "opt.kind", "bogus")
            assert info.value.errors[0]["loc"] == ["opt", "kind"]
            assert state.opt.kind == "sgd"
            with pytest.raises(NotFound):
                await client.get(run_id + "-nope", 0, fresh=True)
