"""How many copies the step stream and the registry bucket keep: ``RUNCTL_REPLICAS``.

Read by whichever process creates them (:mod:`runctl.bus.registry`,
:mod:`runctl.bus.steps.store`) and by ``runctl up --cluster`` (:mod:`runctl.bus.cluster`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

from runctl.bus.errors import BadRequest

__all__ = ["MAX_REPLICAS", "REPLICAS_ENV", "replicas_from_env"]

#: replica count of the step stream and the registry bucket when a process creates them
REPLICAS_ENV: Final = "RUNCTL_REPLICAS"
MAX_REPLICAS: Final = 5  # JetStream's own limit


def replicas_from_env(env: Mapping[str, str] | None = None) -> int | None:
    """``RUNCTL_REPLICAS`` as an int (1..5), or None when unset.

    >>> replicas_from_env({"RUNCTL_REPLICAS": "3"})
    3
    """
    text = (os.environ if env is None else env).get(REPLICAS_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{REPLICAS_ENV}={text[:20]!r} is not a number") from None
    if not 1 <= value <= MAX_REPLICAS:
        raise BadRequest(f"{REPLICAS_ENV} must be between 1 and {MAX_REPLICAS}, not {value}")
    return value
