"""The step log as every side sees it, bottom up:

- :mod:`~runctl.bus.steps.records`: records, forget markers and the step id (pure);
- :mod:`~runctl.bus.steps.forget`: which records a forget covers (pure);
- :mod:`~runctl.bus.steps.explain`: records as listed, and what a restart would do (pure);
- :mod:`~runctl.bus.steps.store`: the JetStream stream: config, read-back, forget.

The package exports the pure names only, so a pure module importing one of them loads no
NATS code; the store is :mod:`runctl.bus.steps.store`. The agent's side (its writer and the
``ctl.steps(...)`` API) is :mod:`runctl.agent.steps`.
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

__all__ = [
    "Explained",
    "ForgetMarker",
    "RunLog",
    "Selector",
    "StepRecord",
    "decode_entry",
    "encode_entry",
    "explain",
    "parse_selector",
    "plan_forget",
    "record_row",
    "step_id",
    "step_label",
]
