"""A real Lightning DDP fit on CPU (2 ranks, gloo) with RunctlCallback: every rank serves its
state; a synchronised learning-rate change lands on both ranks at the same global step
(asserted from each rank's own log of (step, lr in the optimizer)); a stop over HTTP ends
both ranks at the same step without a deadlock, each acknowledged, exit code 0."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import ROOT, wait_exit

from runctl.bus import Client, Gathered
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

pytest.importorskip("lightning")  # the `distributed` extra; CI installs it

EXAMPLE = ROOT / "examples" / "lightning_train.py"
#: whole fits: imports, process launch and gloo set-up dominate (~10 s on 2 cores)
FIT_TIMEOUT = 50


class Fit:
    """A training script run as the user would; its output read on a thread (a full pipe
    would block the ranks)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **env},
            start_new_session=True,  # the rank Lightning starts joins this process group
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def line(self, prefix: str, timeout: float = FIT_TIMEOUT) -> str:
        with anyio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if line.startswith(prefix):
                        return line[len(prefix) :].strip()
                if self.proc.poll() is not None:
                    raise AssertionError(f"fit exited ({self.proc.returncode}):\n{self.output}")
                await anyio.sleep(0.1)

    async def exit_code(self, timeout: float = FIT_TIMEOUT) -> int:
        code = await wait_exit(self.proc, timeout, "the fit")
        self.reader.join(5)
        return code

    def kill(self) -> None:
        """Whatever is left of the fit: the launching process and the rank it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)  # EOF once every process holding the pipe is gone
        if self.proc.stdout is not None and not self.reader.is_alive():
            self.proc.stdout.close()


@pytest.fixture
def fits() -> Iterator[list[Fit]]:
    started: list[Fit] = []
    yield started
    for fit in started:
        fit.kill()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    async with await Client.connect(nats_url) as c:
        yield c


@pytest.fixture
async def http(nats_url: str) -> AsyncIterator[httpx.AsyncClient]:
    with GatewayThread(Settings(nats_url=nats_url, port=0)) as gateway:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as http_client:
            yield http_client


async def both_stepping(client: Client, run: str) -> None:
    with anyio.fail_after(FIT_TIMEOUT):
        while True:
            try:
                infos = await client.ranks(run)
            except Exception:
                infos = []
            if [i.record.rank for i in infos] == ["0", "1"] and all(
                i.liveness == "alive" and i.record.step for i in infos
            ):
                return
            await anyio.sleep(0.2)


async def applied(client: Client, run: str) -> None:
    """Until both ranks report state version 1 (the change applied)."""
    with anyio.fail_after(FIT_TIMEOUT):
        while True:
            if {i.record.rank: i.record.version for i in await client.ranks(run)} == {
                "0": 1,
                "1": 1,
            }:
                return
            await anyio.sleep(0.1)


async def logged_epochs(nats_url: str, run: str) -> dict[int, int]:
    """{epoch: global step at its end} from the step log (``runctl steps RUN``)."""
    result = await anyio.run_process(
        [sys.executable, "-m", "runctl", "steps", run, "--name", "epoch", "--json"],
        cwd=ROOT,
        check=False,
        env={**os.environ, "RUNCTL_NATS_URL": nats_url, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr.decode()
    steps = json.loads(result.stdout)["steps"]
    assert all(s["status"] == "done" and s["scope"] == "run" for s in steps)
    return {s["key"]: s["result"]["global_step"] for s in steps}


def rank_log(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[-1].get("done"), records[-1]
    return records[:-1], records[-1]


@pytest.mark.anyio
async def test_lightning_ddp_synchronised_lr_then_stop_over_http(
    fits: list[Fit],
    client: Client,
    http: httpx.AsyncClient,
    nats_url: str,
    tmp_path: Path,
) -> None:
    # No RUNCTL_RUN: the launching process generates the run id before fit, and the rank
    # Lightning starts inherits it.
    env = {"RUNCTL_NATS_URL": nats_url, "RUNCTL_RUN": "", "RUNCTL_RANK": ""}
    fit = Fit([str(EXAMPLE), "--log-dir", str(tmp_path)], env)
    fits.append(fit)
    run = await fit.line("runctl run:")
    await both_stepping(client, run)

    response = await http.put(
        f"/runs/{run}/ranks/all/set/lr", params={"value": "0.01", "sync": "true"}
    )
    assert response.status_code == 200, response.text
    change = response.json()
    assert change["acknowledged"] == ["0", "1"] and change["missing"] == []
    at_step = change["at_step"]
    await applied(client, run)  # each rank reports the state version it runs

    # a plain (not synchronised) stop: each rank hears it at its own moment; the callback's
    # all-reduce of the flag makes both leave at the same step
    response = await http.post(f"/runs/{run}/ranks/all/stop", params={"reason": "http"})
    assert response.status_code == 200, response.text
    stop = response.json()
    assert stop["acknowledged"] == ["0", "1"] and stop["missing"] == []
    assert await fit.exit_code() == 0, fit.output

    logs = {rank: rank_log(tmp_path / f"rank{rank}.jsonl") for rank in (0, 1)}
    (steps0, done0), (steps1, done1) = logs[0], logs[1]
    # both ranks ended at the same epoch and step, for the reason sent
    assert (done0["epoch"], done0["step"]) == (done1["epoch"], done1["step"])
    assert done0["stopped_at"] == done1["stopped_at"] is not None
    assert done0["stop_reason"] == done1["stop_reason"] == "http"
    assert [r["step"] for r in steps0] == [r["step"] for r in steps1]
    # the lr in each rank's optimizer switched at at_step, on both
    for steps in (steps0, steps1):
        assert {r["lr"] for r in steps if r["step"] < at_step} == {0.05}
        assert {r["lr"] for r in steps if r["step"] >= at_step} == {0.01}
        assert steps[-1]["step"] >= at_step
    ranks = (await http.get(f"/runs/{run}")).json()["ranks"]
    assert [(r["rank"], r["status"]) for r in ranks] == [("0", "exited"), ("1", "exited")]
    # completed epochs are logged as steps (16 steps an epoch); the one cut short is not
    epochs = await logged_epochs(nats_url, run)
    assert epochs == {e: 16 * (e + 1) for e in range(done0["step"] // 16)}


EPOCH_SCRIPT = """
import json, sys
from pathlib import Path

import lightning as L
import torch
from pydantic import BaseModel
from torch.utils.data import DataLoader, TensorDataset

from runctl.agent.integrations.lightning import RunctlCallback


class Cfg(BaseModel):
    lr: float = 0.1
    noisy: bool = False


class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.out = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.out is None:
            self.out = open(Path(sys.argv[1]) / f"rank{self.global_rank}.jsonl", "w")
        self.out.write(json.dumps({"step": self.global_step, "noisy": self.noisy}) + "\\n")
        self.out.flush()
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def on_change(trainer, module, state):
    module.noisy = state.noisy  # applied at the step boundary, the same one on every rank


model = M()
model.noisy = False
callback = RunctlCallback(Cfg(), on_change=on_change, stop_on="epoch", heartbeat=0.2)
trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=10_000,
                    callbacks=[callback], logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))  # 4 batches a rank an epoch
trainer.fit(model, DataLoader(data, batch_size=8))
model.out.write(json.dumps({"done": True, "epoch": trainer.current_epoch,
                            "step": trainer.global_step, "stopped_at": callback.stopped_at,
                            "synchronised": callback._synced_stop}) + "\\n")
model.out.close()
"""


@pytest.mark.anyio
async def test_lightning_synchronised_flag_and_stop_at_the_end_of_an_epoch(
    fits: list[Fit],
    client: Client,
    run_id: str,
    nats_url: str,
    tmp_path: Path,
) -> None:
    script = tmp_path / "train.py"  # Lightning relaunches the script file for rank 1
    script.write_text(EPOCH_SCRIPT)
    fit = Fit([str(script), str(tmp_path)], {"RUNCTL_NATS_URL": nats_url, "RUNCTL_RUN": run_id})
    fits.append(fit)
    await both_stepping(client, run_id)

    change = await client.set(run_id, "all", "noisy", True, sync=True)
    assert isinstance(change, Gathered)
    assert change.to_json()["acknowledged"] == ["0", "1"]
    at_step = change.at_step
    await applied(client, run_id)  # each rank reports the state version it runs

    # a synchronised stop: both ranks see it at the same step and finish that epoch
    stop = await client.stop(run_id, "all", reason="epoch", sync=True)
    assert isinstance(stop, Gathered)
    assert stop.to_json()["acknowledged"] == ["0", "1"]
    stop_step = stop.at_step
    assert stop_step is not None
    assert await fit.exit_code() == 0, fit.output

    (steps0, done0), (steps1, done1) = (rank_log(tmp_path / f"rank{r}.jsonl") for r in (0, 1))
    assert done0 == done1
    assert done0["synchronised"] is True
    # stopped at the end of the epoch in which the stop step fell: 4 batches an epoch
    assert done0["step"] % 4 == 0 and stop_step <= done0["step"] < stop_step + 4
    # stopped_at names the epoch that was finishing; Lightning then counts it as done
    assert done0["stopped_at"] == [done0["epoch"] - 1, done0["step"]]
    for steps in (steps0, steps1):
        assert {r["noisy"] for r in steps if r["step"] < at_step} == {False}
        assert {r["noisy"] for r in steps if r["step"] >= at_step} == {True}
    # every epoch ran to its end, so every one is logged done
    epochs = await logged_epochs(nats_url, run_id)
    assert epochs == {e: 4 * (e + 1) for e in range(done0["step"] // 4)}
