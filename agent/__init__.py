"""The agent: runs inside each rank. ``ctl = control(state)`` is the one line to add."""

from agent.agent import Agent
from agent.control import Control, control
from agent.env import detect_rank, detect_run, detect_world_size
from agent.state import LiveState
from agent.steps import Step, Steps

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
