"""The agent: runs inside each rank. ``ctl = control(state)`` is the one line to add."""

from runctl.agent.agent import Agent
from runctl.agent.control import Control, control
from runctl.agent.env import detect_rank, detect_run, detect_world_size
from runctl.agent.state import LiveState
from runctl.agent.steps import Step, Steps

__all__ = [
    "Agent",
    "Control",
    "LiveState",
    "Step",
    "Steps",
    "control",
    "detect_rank",
    "detect_run",
    "detect_world_size",
]
