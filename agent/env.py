"""Where am I? Run id, rank and world size from the launcher's environment.

Order (first that is set wins):
- run:   ``RUNCTL_RUN``, ``TORCHELASTIC_RUN_ID`` (torchrun), ``SLURM_JOB_ID`` (+ ``_<step>``),
         else a generated id shared by the process tree through ``RUNCTL_RUN``.
- rank:  ``RUNCTL_RANK``, ``RANK`` (torchrun, Lightning), ``SLURM_PROCID``, ``PMI_RANK``,
         ``OMPI_COMM_WORLD_RANK``, else 0.
- world: ``RUNCTL_WORLD_SIZE``, ``WORLD_SIZE``, ``SLURM_NTASKS``, ``PMI_SIZE``,
         ``OMPI_COMM_WORLD_SIZE``.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Mapping

__all__ = ["detect_rank", "detect_run", "detect_world_size", "generate_run_id"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def generate_run_id() -> str:
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _token(value: str) -> str:
    """Launcher ids may hold dots or colons; make them subject-safe, keep them readable."""
    return _UNSAFE.sub("-", value).strip("-") or "run"


def detect_run(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if run := env.get("RUNCTL_RUN"):
        return run  # explicit: validated as given, never rewritten
    # torchrun's default run id is "none" when --rdzv-id is not given
    if (run := env.get("TORCHELASTIC_RUN_ID")) and run != "none":
        return _token(run)
    if job := env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        return _token(f"slurm-{job}" + (f"-{step}" if step else ""))
    run = generate_run_id()
    if isinstance(env, os._Environ):
        # children (DDP workers spawned by this process) join the same run
        os.environ["RUNCTL_RUN"] = run
    return run


def detect_rank(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    for key in ("RUNCTL_RANK", "RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if (value := env.get(key)) not in (None, ""):
            return str(value)
    return "0"


def detect_world_size(env: Mapping[str, str] | None = None) -> int | None:
    env = os.environ if env is None else env
    for key in ("RUNCTL_WORLD_SIZE", "WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE",
                "OMPI_COMM_WORLD_SIZE"):
        value = env.get(key)
        if value and value.isdigit():
            return int(value)
    return None
