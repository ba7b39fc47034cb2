"""Checkpoint on stop: every rank saves at the same step, and a restarted run finds it.

``runctl stop RUN --checkpoint`` sends a stop deferred to a step every rank has not reached
yet (like any synchronised change). At that step, on the program's thread, each rank runs
its checkpoint callback (``ctl.on_checkpoint(fn)``), stores what it returned as the files
or result of its step ``checkpoint`` (key: the step number) in the object store, publishes
a ``checkpoint`` event that says what was stored (or why not), and only then stops. The
client that asked waits for those events, so its answer lists each rank's checkpoint.

``fn(step)`` returns a path (a file, e.g. what ``torch.save`` or
``trainer.save_checkpoint`` wrote: attached and streamed), or a value (a state dict,
an array, JSON: stored as the step's result), or None (nothing to store).

``ctl.latest_checkpoint()`` is the newest one this rank stored, from the step log already
in memory: nothing is downloaded until asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import structlog

from runctl.agent.steps import Steps
from runctl.agent.steps.step import StoredFile
from runctl.bus.steps.records import StepRecord

__all__ = ["CHECKPOINT_STEP", "Checkpoint", "CheckpointFn", "latest", "take"]

#: the step name checkpoints are logged under (key: the step number)
CHECKPOINT_STEP: Final = "checkpoint"

CheckpointFn = Callable[[int], Any]

log = structlog.get_logger()


@dataclass(frozen=True)
class Checkpoint:
    """One stored checkpoint of this rank: ``step``, its ``files``, its ``result()``."""

    step: int
    record: StepRecord
    files: Mapping[str, StoredFile]
    _steps: Steps

    def result(self, *, pickle: bool = False) -> Any:
        """The value the callback returned (fetched now when it is in the object store)."""
        return self._steps.result(CHECKPOINT_STEP, self.step, pickle=pickle)

    def download(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Every file of the checkpoint into ``directory``; the paths by file name."""
        target = Path(directory)
        return {name: f.download(target / name) for name, f in self.files.items()}


def take(steps: Steps, callbacks: list[CheckpointFn], step: int) -> dict[str, Any]:
    """Run the checkpoint callback at ``step`` and store what it returns (program's thread).

    Returns the ``checkpoint`` event's data: the files and result stored, or the error.
    Never raises: a stop still happens when its checkpoint failed, and says so.
    """
    if not callbacks:
        return {"step": step, "ok": False, "error": "no checkpoint callback (ctl.on_checkpoint)"}
    try:
        with steps.step(CHECKPOINT_STEP, step) as s:
            if s.done:  # this step's checkpoint is already stored (a repeated stop)
                s.skip()
            for callback in callbacks:
                out = callback(step)
                if isinstance(out, str | os.PathLike):
                    s.attach(out)
                elif out is not None:
                    s.result = out
    except Exception as exc:
        log.exception("checkpoint failed", step=step)
        return {"step": step, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return {
        "step": step,
        "ok": True,
        # False only when the server did not acknowledge the record in time (it stays
        # queued and is re-sent): the files themselves are stored either way
        "acknowledged": bool(s.done),
        "files": {name: {"size": f.size, "digest": f.digest} for name, f in s.files.items()},
        "result": s.result is not None,
    }


def latest(steps: Steps, rank_scope: str) -> Checkpoint | None:
    """The newest checkpoint this rank stored (highest step), or None."""
    log_ = steps._log()
    best: StepRecord | None = None
    for _, rec in log_.records([rank_scope]).records.values():
        if rec.name != CHECKPOINT_STEP or rec.status != "done" or not isinstance(rec.key, int):
            continue
        if best is None or rec.key > best.key:
            best = rec
    if best is None:
        return None
    files = {name: StoredFile(steps, log_, ref, name) for name, ref in best.files.items()}
    return Checkpoint(step=best.key, record=best, files=files, _steps=steps)
