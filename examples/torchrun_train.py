"""A plain PyTorch DDP loop under torchrun (CPU, gloo) controlled by runctl.

    torchrun --standalone --nproc-per-node 2 examples/torchrun_train.py
    runctl ls RUN                       # RUN is printed at start: torchrun's run id
    runctl set RUN lr=0.01 --sync       # every rank switches at the same step
    runctl stop RUN                     # every rank stops at the same step, exit code 0
    runctl stop RUN --checkpoint        # ... after storing a checkpoint of every rank

Checkpoints taken by ``runctl stop RUN --checkpoint`` live in the bus's object store, not on
one machine's disk: started again under the same run id (``RUNCTL_RUN=...``), on any host,
every rank resumes from its own latest one (``ctl.latest_checkpoint()``).

Epochs go through the step iterator (``ctl.steps``): an epoch is logged done once its body
completed, so a restarted job skips the epochs already done (it reloads ``--checkpoint``).
``--log-dir DIR`` writes each rank's ``rank<N>.jsonl``: one ``[epoch, step, lr]`` line per step (the
lr the optimizer used) and a final ``{"done": ...}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, Field
from torch.nn.parallel import DistributedDataParallel

from runctl import control


class TrainConfig(BaseModel):
    lr: float = Field(0.05, gt=0)
    epochs: int = Field(1000, ge=1)
    batches_per_epoch: int = Field(16, ge=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-dir", type=Path, default=None)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Linear(16, 1))
    if args.checkpoint is not None and args.checkpoint.exists():
        model.module.load_state_dict(torch.load(args.checkpoint))
    log = None
    if args.log_dir is not None:  # line-buffered: what a killed rank did is on disk
        log = open(args.log_dir / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115

    state = TrainConfig()
    ctl = control(state)  # run and rank from torchrun's environment
    print(f"runctl run: {ctl.run} rank: {ctl.rank}", flush=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=state.lr)
    step, epoch, stop = 0, -1, torch.zeros(1)

    @ctl.on_checkpoint
    def save(at: int) -> dict[str, Any]:  # `runctl stop RUN --checkpoint`, at step `at`
        return {"model": model.module.state_dict(), "step": at}

    found = ctl.latest_checkpoint()  # stored by an earlier stop of this run, on any host
    if found is not None:
        saved = found.result()
        model.module.load_state_dict(saved["model"])
        step = int(saved["step"])
        print(f"resumed from the checkpoint of step {found.step}", flush=True)
    for epoch in ctl.steps("epoch", range(state.epochs), scope="run"):
        for _ in range(state.batches_per_epoch):
            ctl.sync(step)  # synchronised changes land here, at the same step on every rank
            stop[0] = ctl.stop_requested
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # one rank's stop stops them all
            if stop.item():
                break
            for group in optimizer.param_groups:
                group["lr"] = state.lr
            x, y = torch.randn(8, 16), torch.randn(8, 1)
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if log:
                log.write(json.dumps([epoch, step, optimizer.param_groups[0]["lr"]]) + "\n")
            step += 1
        if stop.item():
            break  # this epoch is not logged done: a restart runs it again
        if args.checkpoint is not None and rank == 0:
            # write then rename: a crash mid-save must not leave a truncated checkpoint
            # that the restarted job cannot load
            partial = args.checkpoint.with_name(args.checkpoint.name + ".partial")
            torch.save(model.module.state_dict(), partial)
            os.replace(partial, args.checkpoint)

    # one rank's stop stops them all, sometimes before the stop reached this rank's agent:
    # every rank reports the reason whichever rank was given
    reasons: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(reasons, ctl.stop_reason)
    reason = next((r for r in reasons if r), "")
    if log:
        log.write(json.dumps({"done": True, "step": step, "epoch": epoch, "stop_reason": reason}))
        log.write("\n")
        log.close()
    ctl.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
