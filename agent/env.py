"""Where am I? Run id, rank and world size from the launcher's environment.

Order (first that is set wins):
- run:   ``RUNCTL_RUN``, ``TORCHELASTIC_RUN_ID`` (torchrun), ``SLURM_JOB_ID`` (+ ``_<step>``),
         ``torchrun-<MASTER_ADDR>-<MASTER_PORT>`` (torchrun without ``--rdzv-id``),
         else a generated id shared by the process tree through ``RUNCTL_RUN``.
- rank:  ``RUNCTL_RANK``, ``RANK`` (torchrun), ``LOCAL_RANK`` with ``NODE_RANK`` (ranks
         started by Lightning's DDP launcher), ``SLURM_PROCID``, ``PMI_RANK``,
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
    """A fresh run id: ``run-<date>-<time>-<4 hex digits>``."""
    return time.strftime("run-%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _token(value: str) -> str:
    """Launcher ids may hold dots or colons; make them subject-safe, keep them readable."""
    return _UNSAFE.sub("-", value).strip("-") or "run"


def detect_run(env: Mapping[str, str] | None = None) -> str:
    """The run id: ``RUNCTL_RUN``, else the launcher's job id (torchrun, SLURM), else a
    generated one (exported, so child processes join the same run)."""
    env = os.environ if env is None else env
    if run := env.get("RUNCTL_RUN"):
        return run  # explicit: validated as given, never rewritten
    # torchrun's default run id is "none" when --rdzv-id is not given
    if (run := env.get("TORCHELASTIC_RUN_ID")) and run != "none":
        return _token(run)
    if job := env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        return _token(f"slurm-{job}" + (f"-{step}" if step else ""))
    if (
        "TORCHELASTIC_RUN_ID" in env
        and (addr := env.get("MASTER_ADDR"))
        and (port := env.get("MASTER_PORT"))
    ):
        # torchrun without --rdzv-id: its workers are not our children, so a generated id
        # would differ per rank; the rendezvous address is what they all share
        return _token(f"torchrun-{addr}-{port}")
    run = generate_run_id()
    if isinstance(env, os._Environ):
        # children (DDP workers spawned by this process) join the same run
        os.environ["RUNCTL_RUN"] = run
    return run


def detect_rank(env: Mapping[str, str] | None = None) -> str:
    """The rank: ``RUNCTL_RANK``, ``RANK``, Lightning's ``NODE_RANK``/``LOCAL_RANK``,
    ``SLURM_PROCID``, MPI's, else ``0``."""
    env = os.environ if env is None else env
    for key in ("RUNCTL_RANK", "RANK"):
        if value := env.get(key):
            return value
    # Lightning's DDP launcher sets only LOCAL_RANK and NODE_RANK in the ranks it starts
    # (before SLURM_PROCID: they all inherit the launching task's)
    if (local := env.get("LOCAL_RANK")) and (node := env.get("NODE_RANK")) is not None:
        return local if node in ("", "0") else f"{node}-{local}"
    for key in ("SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if value := env.get(key):
            return value
    return "0"


def detect_world_size(env: Mapping[str, str] | None = None) -> int | None:
    """How many ranks the launcher started (``RUNCTL_WORLD_SIZE``, ``WORLD_SIZE``,
    SLURM's, MPI's), or None if it does not say."""
    env = os.environ if env is None else env
    for key in (
        "RUNCTL_WORLD_SIZE",
        "WORLD_SIZE",
        "SLURM_NTASKS",
        "PMI_SIZE",
        "OMPI_COMM_WORLD_SIZE",
    ):
        value = env.get(key)
        if value and value.isdigit():
            return int(value)
    return None
