"""Which event loop the agent's thread runs (agent/control.py): the standard loop unless
uvloop is asked for, and a clear error for anything else."""

from __future__ import annotations

import pytest

from runctl.agent.control import _loop_options
from runctl.agent.eventloop import agent_loop
from runctl.bus.errors import BadRequest


def test_the_standard_loop_by_default() -> None:
    assert _loop_options({}) == {"loop_factory": agent_loop}
    assert _loop_options({"RUNCTL_LOOP": "asyncio"}) == {"loop_factory": agent_loop}


def test_uvloop_on_request() -> None:
    pytest.importorskip("uvloop")  # a dependency off Windows
    assert _loop_options({"RUNCTL_LOOP": " UVLOOP "}) == {"use_uvloop": True}


def test_anything_else_is_refused_by_name() -> None:
    with pytest.raises(BadRequest, match="RUNCTL_LOOP must be 'uvloop' or 'asyncio'"):
        _loop_options({"RUNCTL_LOOP": "trio"})
