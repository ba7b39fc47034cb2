"""The step log as every side sees it, bottom up:

- :mod:`~runctl.bus.steps.records`: records, forget markers and the step id (pure);
- :mod:`~runctl.bus.steps.forget`: which records a forget covers (pure);
- :mod:`~runctl.bus.steps.explain`: records as listed, and what a restart would do (pure);
- :mod:`~runctl.bus.steps.store`: the JetStream stream: config, read-back, forget.

The agent's side (its writer and the ``ctl.steps(...)`` API) is :mod:`runctl.agent.steps`.
"""

from runctl.bus.steps.explain import Explained, explain, record_row
from runctl.bus.steps.forget import Selector, parse_selector, plan_forget
from runctl.bus.steps.records import (
    ForgetMarker,
    RunLog,
    StepRecord,
    decode_entry,
    encode_entry,
    step_id,
    step_label,
)
from runctl.bus.steps.store import STREAM, ForgetReport, ensure_stream, forget, read_log

__all__ = [
    "STREAM",
    "Explained",
    "ForgetMarker",
    "ForgetReport",
    "RunLog",
    "Selector",
    "StepRecord",
    "decode_entry",
    "encode_entry",
    "ensure_stream",
    "explain",
    "forget",
    "parse_selector",
    "plan_forget",
    "read_log",
    "record_row",
    "step_id",
    "step_label",
]
