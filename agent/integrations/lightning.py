"""PyTorch Lightning: every rank serves its state, stops together, applies synchronised changes.

    from runctl.agent.integrations.lightning import RunctlCallback

    state = TrainConfig()
    trainer = L.Trainer(strategy="ddp", devices=2,
                        callbacks=[RunctlCallback(state, lr_field="lr")])
    trainer.fit(model)

What it does, on every rank (not only rank 0):

- ``setup`` starts the rank's own agent (``control(state, run, rank=trainer.global_rank)``);
  ``teardown`` closes it, so the rank is reported ``exited``.
- At every training batch end it calls ``ctl.sync(trainer.global_step)``: the synchronised
  changes due at that step are applied on every rank at the same global step (Lightning's
  global step is the same on every rank). Then, if the state changed, ``lr_field`` is copied
  into every optimizer's param groups and ``on_change(trainer, pl_module, state)`` runs.
- Stopping without a deadlock: a rank that leaves the loop while the others wait in the
  next gradient all-reduce hangs them (Lightning #379). So a rank never decides alone:
  a *synchronised* stop (``runctl stop RUN --sync``) is applied by every rank at the same
  step, and any other stop is agreed on by a tiny all-reduce of the stop flag that every
  rank runs at the same batches (``stop_check_every``), so all ranks set
  ``trainer.should_stop`` at the same step (or epoch, with ``stop_on="epoch"``).

The run id is resolved when the callback is built, i.e. in the launching process before
Lightning starts the other ranks: a generated id is exported (``RUNCTL_RUN``) and the
ranks Lightning starts inherit it, so they join the same run.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import lightning.pytorch as pl
import structlog
import torch
import torch.distributed as dist
from pydantic import BaseModel

from runctl.agent.control import Control, control
from runctl.agent.env import detect_run
from runctl.agent.state import check_path
from runctl.bus.errors import RunctlError
from runctl.bus.subjects import check_token

__all__ = ["RunctlCallback"]

M = TypeVar("M", bound=BaseModel)
log = structlog.get_logger()


class RunctlCallback(pl.Callback, Generic[M]):
    """Serve ``state`` on every rank of a Lightning fit; stop and change it consistently.

    Args:
        state: the pydantic model the program reads its settings from.
        run: run id; default from the environment (``RUNCTL_RUN``, torchrun, SLURM) or a
            generated id shared with the ranks Lightning starts.
        url: NATS URL (default ``RUNCTL_NATS_URL``, else the embedded server).
        lr_field: dotted path of a float in ``state`` (e.g. ``"optimizer.lr"``) copied into
            every optimizer param group at fit start and whenever the state changes.
        on_change: ``on_change(trainer, pl_module, state)`` called at the step boundary
            after the state changed (on every rank at the same step for a synchronised
            change).
        stop_check_every: all-reduce the stop flag every this many training batches (the
            same batches on every rank: it can never deadlock). 1 costs one tiny
            collective per batch; larger values stop up to that many batches later.
            Synchronised stops do not need it.
        stop_on: ``"step"`` stops at the next batch boundary, ``"epoch"`` lets every rank
            finish the current epoch.
        log_epochs: step name under which every completed epoch is logged done
            (``ctl.done(log_epochs, epoch, scope="run")``, see docs/steps.md), so a
            restarted fit, ``runctl steps RUN`` or ``ctl.is_done("epoch", 3, scope="run")``
            can tell which epochs finished; None: not logged. An epoch cut short by a stop
            is not logged.
        epoch_config: the config that identifies the fit for the epoch log (hashed; a
            different config makes a new step), e.g. the hyperparameters.
        options: passed to :func:`runctl.agent.control` (``heartbeat``, ``data_dir`` ...).
    """

    def __init__(
        self,
        state: M,
        run: str | None = None,
        *,
        url: str | None = None,
        lr_field: str | None = None,
        on_change: Callable[[pl.Trainer, pl.LightningModule, M], object] | None = None,
        stop_check_every: int = 1,
        stop_on: Literal["step", "epoch"] = "step",
        log_epochs: str | None = "epoch",
        epoch_config: Any = None,
        **options: Any,
    ) -> None:
        if stop_check_every < 1:
            raise ValueError("stop_check_every must be >= 1")
        if stop_on not in ("step", "epoch"):
            raise ValueError("stop_on must be 'step' or 'epoch'")
        if lr_field is not None:
            check_path(state, lr_field, for_write=False)  # a typo fails here, not mid-fit
        self.state = state
        # Resolved now, before Lightning launches the other ranks (see the module docs).
        self.run = check_token(run if run is not None else detect_run(), "run")
        self.url = url
        self.log_epochs = check_token(log_epochs, "step") if log_epochs is not None else None
        self.epoch_config = epoch_config
        self.lr_field = lr_field
        self.on_change = on_change
        self.stop_check_every = stop_check_every
        self.stop_on = stop_on
        self.options = options
        self.ctl: Control[M] | None = None
        #: (epoch, global_step) at which this callback told the trainer to stop
        self.stopped_at: tuple[int, int] | None = None
        self._applied_version = -1
        self._batches = 0
        self._loop_thread: int | None = None
        self._synced_stop = False
        self._epoch_log_failed = False
        self._torch_dist = False
        self._closed = False
        self._group: Any = None  # the process group the stop flag is reduced on

    # --- lifecycle ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning hook: start this rank's agent (once per process)."""
        # Runs in every rank's process, after Lightning launched them.
        if stage != "fit" or (self.ctl is not None and not self._closed):
            return
        self._closed = False  # a second fit with the same callback: a fresh agent
        self._synced_stop, self.stopped_at = False, None
        self._applied_version, self._batches = -1, 0
        self._loop_thread = threading.get_ident()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # The stop flag travels on the CPU: a gloo group of its own when training
            # uses NCCL, so agreeing on it never waits for the GPU. Every rank runs setup.
            self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            self._torch_dist = True
        self.ctl = control(
            self.state, run=self.run, rank=trainer.global_rank, url=self.url, **self.options
        )
        self.ctl.on_stop(self._on_stop)
        self._trainer = trainer
        self.ctl.on_checkpoint(self._save_checkpoint)

    def _save_checkpoint(self, step: int) -> Path | None:
        """``runctl stop RUN --checkpoint``: every rank calls this at the same step (it is
        a collective in DDP); global rank 0 writes the file and runctl stores it."""
        trainer = self._trainer
        path = Path(trainer.default_root_dir) / f"runctl-step{step}.ckpt"
        trainer.save_checkpoint(path)
        return path if path.exists() else None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Lightning hook: close the agent."""
        if stage == "fit":
            self.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Lightning hook: close the agent when the fit fails."""
        if self.ctl is not None:  # the rank's exit says it failed, and why
            self.ctl.agent.exit.record(type(exception), exception)
        self.close()

    def close(self) -> None:
        """Close the rank's agent (it is reported ``exited``) and the stop flag's group."""
        self._closed = True
        if self._group is not None:
            group, self._group = self._group, None
            with contextlib.suppress(Exception):  # gone with the default group already
                dist.destroy_process_group(group)
        if self.ctl is not None:
            self.ctl.close()

    def _on_stop(self, reason: str) -> None:
        # Deferred (synchronised) stops are applied inside ctl.sync() on the training
        # thread, on every rank at the same step: those need no agreement.
        if threading.get_ident() == self._loop_thread:
            self._synced_stop = True

    # --- the step boundary ----------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning hook: report the starting step and apply the live state."""
        ctl = self._control()
        ctl.sync(trainer.global_step)  # report the step (a resumed fit starts past 0)
        self._apply(trainer, pl_module, force=True)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Lightning hook, the step boundary: ``sync`` the global step, apply changes, and
        agree on a stop across ranks (``stop_on="step"``)."""
        ctl = self._control()
        ctl.sync(trainer.global_step)
        self._apply(trainer, pl_module)
        self._batches += 1
        if self.stop_on == "step":
            check = self._batches % self.stop_check_every == 0
            self._decide_stop(trainer, check)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning hook: a stop asked for at the end of an epoch ends the fit here; a
        completed epoch is logged as a step (``log_epochs``)."""
        if self.stop_on == "epoch" and not trainer.should_stop:
            self._decide_stop(trainer, check=True)
        # an epoch cut short (a stop at a step, max_steps) did not complete: not logged
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._log_epoch(trainer)

    def _log_epoch(self, trainer: pl.Trainer) -> None:
        if self.log_epochs is None:
            return
        ctl = self._control()
        try:
            # wait=False: the program never waits for the server's ack here
            ctl.done(
                self.log_epochs,
                trainer.current_epoch,
                config=self.epoch_config,
                scope="run",
                result={"global_step": trainer.global_step},
                wait=False,
            )
        except RunctlError as exc:  # no JetStream: the fit goes on without the log
            if not self._epoch_log_failed:
                self._epoch_log_failed = True
                log.warning("runctl: epochs are not logged", error=str(exc))

    def _decide_stop(self, trainer: pl.Trainer, check: bool) -> None:
        ctl = self._control()
        stop = self._synced_stop
        if trainer.world_size == 1:
            stop = stop or ctl.stop_requested
        elif check:
            # Every rank runs this at the same batches, whatever its own flag: no rank can
            # be left waiting in a collective the others skipped.
            stop = self._any_rank(trainer, ctl.stop_requested) or stop
        if stop and not trainer.should_stop:
            trainer.should_stop = True
            self.stopped_at = (trainer.current_epoch, trainer.global_step)
            log.info(
                "runctl: stopping the fit",
                run=self.run,
                rank=ctl.rank,
                epoch=trainer.current_epoch,
                step=trainer.global_step,
                reason=ctl.stop_reason,
                synchronised=self._synced_stop,
            )

    def _any_rank(self, trainer: pl.Trainer, flag: bool) -> bool:
        """True if ``flag`` is set on any rank (a collective: every rank must call it)."""
        if not self._torch_dist:  # another launcher: Lightning's own (barrier + reduce)
            return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
        # one all-reduce of one float (Lightning's reduce_boolean_decision adds a barrier:
        # measured 0.4 ms vs 1.1 ms a call with gloo on 2 CPU ranks)
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return bool(value.item() > 0)

    def _apply(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, force: bool = False
    ) -> None:
        ctl = self._control()
        version = ctl.version
        if version == self._applied_version and not force:
            return
        self._applied_version = version
        if self.lr_field is not None:
            lr = float(json.loads(ctl.agent.live.get(self.lr_field)))
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        if self.on_change is not None and not force:
            self.on_change(trainer, pl_module, self.state)

    def _control(self) -> Control[M]:
        if self.ctl is None:  # a hook before setup("fit"): Lightning never does this
            raise RuntimeError("RunctlCallback used outside of Trainer.fit")
        return self.ctl
