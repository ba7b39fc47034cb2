"""Lightning DDP on CPU (2 ranks, gloo) controlled by runctl: a tiny model on random data.

    python examples/lightning_train.py                       # runs until stopped
    runctl ls RUN                                            # both ranks, alive
    runctl set RUN lr=0.01 --sync                            # every rank, same step
    runctl stop RUN                                          # every rank, same step

``RUN`` is printed at start (``RUNCTL_RUN`` if set). ``--log-dir DIR`` writes each rank's
``rank<N>.jsonl``: one ``{"epoch", "step", "lr"}`` line per training step (the lr actually in
the optimizer) and a final ``{"done": true, ...}`` line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from pydantic import BaseModel, Field
from torch.utils.data import DataLoader, TensorDataset

from runctl.agent.integrations.lightning import RunctlCallback


class TrainConfig(BaseModel):
    lr: float = Field(0.05, gt=0)
    max_epochs: int = Field(1000, ge=1)


class TinyModel(L.LightningModule):
    def __init__(self, log_dir: Path | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Linear(16, 1)
        self.log_dir = log_dir
        self._log: Any = None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.log_dir is not None:
            self.write(
                epoch=self.current_epoch,
                step=self.global_step,
                lr=self.trainer.optimizers[0].param_groups[0]["lr"],
            )
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def write(self, **record: Any) -> None:
        assert self.log_dir is not None
        if self._log is None:
            self._log = open(self.log_dir / f"rank{self.global_rank}.jsonl", "a")  # noqa: SIM115
        self._log.write(json.dumps(record) + "\n")
        self._log.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    data = TensorDataset(torch.randn(256, 16), torch.randn(256, 1))
    model = TinyModel(args.log_dir)

    state = TrainConfig()
    runctl = RunctlCallback(state, lr_field="lr")  # every rank: its own agent
    trainer = L.Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=state.max_epochs,
        callbacks=[runctl],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if rank_zero_only.rank == 0:
        print(f"runctl run: {runctl.run}", flush=True)
    trainer.fit(model, DataLoader(data, batch_size=8))

    if args.log_dir is not None:
        model.write(
            done=True,
            epoch=trainer.current_epoch,
            step=trainer.global_step,
            stopped_at=runctl.stopped_at,
            stop_reason=runctl.ctl.stop_reason if runctl.ctl else None,
        )


if __name__ == "__main__":
    main()
