"""The agent's side of the step log: resumable steps, ``ctl.steps(...)`` & co.

- :mod:`~runctl.agent.steps.outbox`: the writer (completions re-sent until acknowledged);
- :mod:`~runctl.agent.steps.log`: one rank's done set in memory (:class:`StepLog`);
- :mod:`~runctl.agent.steps.core`: identities, one item's start/fail/finish, crossing to
  the agent's loop; :mod:`~runctl.agent.steps.step` (``with``),
  :mod:`~runctl.agent.steps.cached` (decorator) and :mod:`~runctl.agent.steps.api`
  (:class:`Steps`, everything else): the API a program calls.

What every side shares (records, the stream, explain) is :mod:`runctl.bus.steps`.
"""

from runctl.agent.steps.api import Steps
from runctl.agent.steps.cached import Cached
from runctl.agent.steps.core import RESULT_LIMIT, Scope, StepHost
from runctl.agent.steps.log import StepLog
from runctl.agent.steps.step import Step

__all__ = ["RESULT_LIMIT", "Cached", "Scope", "Step", "StepHost", "StepLog", "Steps"]
