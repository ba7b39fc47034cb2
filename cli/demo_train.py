"""The program ``runctl demo`` runs as each rank: a training-like loop with runctl.

It is also what adding runctl to a program looks like: a pydantic model for the settings,
one ``control()`` line, the loop reads the settings at each step and honours
``ctl.stop_requested``. Its epochs go through the step log (``ctl.once``), so ``runctl
steps demo``, ``--explain`` and ``runctl forget`` have something to show, and a demo
started again in the same directory skips the epochs done.

Step numbers: step N is the N-th training step, and ``ctl.sync(N)`` runs before it, so a
synchronised stop "at step N" stops the rank before step N runs: the rank says
"stopping before step N", the number the stop reported.

    python -m runctl.cli.demo_train --run demo --rank 0 --url nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from runctl.agent import control
from runctl.bus.logs import configure_logging
from runctl.cli.common import seconds

__all__ = ["EPOCH_STEPS", "Optimizer", "TrainState", "main"]

#: training steps per epoch (each epoch is one logged step)
EPOCH_STEPS = 10


class Optimizer(BaseModel):
    """The optimizer settings an operator may change mid-run."""

    kind: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float | None = None


class TrainState(BaseModel):
    """The demo program's whole live state: settings it reads, progress it writes."""

    optimizer: Optimizer = Optimizer()
    batch_size: int = Field(32, ge=1, le=4096)
    #: stop on its own after this many steps (None: until stopped)
    max_steps: int | None = None
    #: print a line every this many steps
    log_every: int = Field(10, ge=1)
    #: written by the program itself: published with the next heartbeat
    step: int = 0
    loss: float = 0.0


def main(argv: Sequence[str] | None = None) -> int:
    """One rank: train until stopped (``runctl stop demo``) or ``max_steps``."""
    parser = argparse.ArgumentParser(prog="python -m runctl.cli.demo_train")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--rank", default="0")
    parser.add_argument("--url", default=None, help="NATS URL (default: $RUNCTL_NATS_URL)")
    parser.add_argument("--step-time", type=seconds, default=0.2, help="seconds per step")
    args = parser.parse_args(argv)
    configure_logging("warning")

    state = TrainState()
    ctl = control(state, run=args.run, rank=args.rank, url=args.url)
    parent = os.getppid()
    rng = random.Random(int(args.rank) if args.rank.isdigit() else 0)  # noqa: S311 - noise
    tag = f"[rank {args.rank}]"
    try:
        ctl.wait_ready(15)
        print(f"{tag} pid {os.getpid()} ready: {_describe(state)}", flush=True)
        loss, seen, step, epoch, why = 2.5, _describe(state), 0, 0, ""
        while not why:
            # an epoch is a logged step (ctl.once): `runctl steps demo`, --explain, forget
            # and the console's timeline show them; one an earlier demo finished is skipped
            with ctl.once("epoch", key=epoch, wait=False) as done:
                if done.done:
                    epoch += 1
                    step = max(step, epoch * EPOCH_STEPS)  # its steps with it
                    continue
                first = step
                for _ in range(EPOCH_STEPS):
                    if os.getppid() != parent:
                        why = "the demo is gone"  # do not linger as an orphan
                        break
                    if state.max_steps is not None and step >= state.max_steps:
                        why = f"reached max_steps={state.max_steps}"
                        break
                    ctl.sync(step)  # `runctl set --sync` changes (and stops) land here, before step
                    if ctl.stop_requested:
                        why = f"stop requested ({ctl.stop_reason or 'no reason'})"
                        break
                    with ctl.lock:  # several fields, read consistently
                        lr, kind = state.optimizer.lr, state.optimizer.kind
                        batch = state.batch_size
                    speed = lr * (3.0 if kind == "adam" else 1.0) * math.sqrt(batch / 32)
                    loss = max(0.01, loss * (1 - min(speed, 0.5) * 0.1) + rng.gauss(0, 0.01))
                    with ctl.lock:
                        state.step, state.loss = step, round(loss, 4)
                    if (now := _describe(state)) != seen:  # changed from outside
                        seen = now
                        print(f"{tag} step {step}: now {now} (version {ctl.version})", flush=True)
                    elif step % state.log_every == 0:
                        print(f"{tag} step {step}: loss {loss:.4f}  {_describe(state)}", flush=True)
                    time.sleep(args.step_time)
                    step += 1
                if why:
                    done.skip()  # an epoch cut short is not logged done: a restart runs it
                done.result = {"loss": round(loss, 4), "last_step": step - 1}
            if why:
                break
            print(f"{tag} epoch {epoch} done (steps {first}-{step - 1})", flush=True)
            epoch += 1
        print(f"{tag} {why}: stopping before step {step}, finishing cleanly", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        ctl.close()
    return 0


def _describe(state: TrainState) -> str:
    o = state.optimizer
    wd = "" if o.weight_decay is None else f" wd={o.weight_decay:g}"
    return f"{o.kind} lr={o.lr:g} momentum={o.momentum:g}{wd} batch={state.batch_size}"


if __name__ == "__main__":
    sys.exit(main())
