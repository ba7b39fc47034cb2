"""examples/torchrun_train.py under a real torchrun (2 CPU ranks, gloo), driven by the CLI:
the run id and ranks come from torchrun's environment (the one line has no arguments), a
synchronised lr change lands on both ranks at the same step, a plain stop ends both at the
same step with exit code 0; a crashed job restarted in the same run skips the epochs the
step iterator logged done."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import ROOT, wait_exit

from runctl.bus import Client

pytest.importorskip("torch")  # the `distributed` extra; CI installs it

EXAMPLE = ROOT / "examples" / "torchrun_train.py"
RUN_LINE = re.compile(r"runctl run: ([A-Za-z0-9_-]+) rank: (\d+)")
TIMEOUT = 50


class Job:
    """``torchrun`` as the user types it; output read on a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                str(EXAMPLE),
                *args,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **env},
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

    async def runs(self) -> dict[str, str]:
        """{rank: run} as each worker printed it."""
        with anyio.fail_after(TIMEOUT):
            while True:
                # two workers share torchrun's stdout: their lines may interleave
                found = {rank: run for run, rank in RUN_LINE.findall(self.output)}
                if len(found) == 2:
                    return found
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"torchrun exited ({self.proc.returncode}):\n" + self.output
                    )
                await anyio.sleep(0.1)

    async def exit_code(self) -> int:
        code = await wait_exit(self.proc, TIMEOUT, "torchrun")
        self.reader.join(5)
        return code

    def kill(self) -> None:
        """torchrun and its workers (which it starts in sessions of their own)."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)
        self.reader.join(10)  # EOF once every process holding the pipe is gone
        if self.proc.stdout is not None and not self.reader.is_alive():
            self.proc.stdout.close()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def jobs() -> Iterator[list[Job]]:
    started: list[Job] = []
    yield started
    for job in started:
        job.kill()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    async with await Client.connect(nats_url) as c:
        yield c


async def cli(nats_url: str, *args: str) -> Any:
    result = await anyio.run_process(
        # torch ranks on a loaded machine may take longer than the default 2 s to answer:
        # what is checked is that every rank answers, not how fast
        [sys.executable, "-m", "runctl", *args, "--json", "--timeout", "30"],
        cwd=ROOT,
        check=False,
        env={**os.environ, "RUNCTL_NATS_URL": nats_url, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def stepping(
    job: Job, client: Client, run: str, past: int = 0, not_pids: frozenset[int] = frozenset()
) -> set[int]:
    """Until both ranks of ``job`` run (processes other than ``not_pids``) past step
    ``past``; a job that exits first fails the test with its output."""
    with anyio.fail_after(TIMEOUT):
        while True:
            try:
                infos = await client.ranks(run)
            except Exception:
                infos = []
            alive = [i for i in infos if i.liveness == "alive" and i.record.pid not in not_pids]
            if len(alive) == 2 and all((i.record.step or 0) > past for i in alive):
                return {i.record.pid for i in alive}
            if job.proc.poll() is not None:
                raise AssertionError(f"torchrun exited ({job.proc.returncode}):\n" + job.output)
            await anyio.sleep(0.1)


def read_log(path: Path) -> tuple[list[list[Any]], dict[str, Any] | None]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    if records and isinstance(records[-1], dict):
        return records[:-1], records[-1]
    return records, None


@pytest.mark.anyio
@pytest.mark.timeout(240)  # two torch processes per launch: slow to start on a loaded machine
async def test_torchrun_synchronised_lr_and_stop_from_the_cli(
    jobs: list[Job],
    client: Client,
    nats_url: str,
    tmp_path: Path,
) -> None:
    job = Job(["--log-dir", str(tmp_path)], {"RUNCTL_NATS_URL": nats_url, "RUNCTL_RUN": ""})
    jobs.append(job)
    runs = await job.runs()
    # both workers found the same run (torchrun's run id), each its own rank
    assert set(runs) == {"0", "1"} and runs["0"] == runs["1"]
    run = runs["0"]
    await stepping(job, client, run)

    change = await cli(nats_url, "set", run, "lr=0.01", "--sync")
    assert change["acknowledged"] == ["0", "1"] and change["missing"] == []
    at_step = change["at_step"]
    with anyio.fail_after(TIMEOUT):  # each rank reports the state version it runs
        while {i.record.version for i in await client.ranks(run)} != {1}:  # noqa: ASYNC110
            await anyio.sleep(0.1)

    stop = await cli(nats_url, "stop", run, "--reason", "cli")
    ranks = [(i.record.rank, i.liveness, i.age) for i in await client.ranks(run)]
    assert stop["acknowledged"] == ["0", "1"] and stop["missing"] == [], (stop, ranks)
    assert await job.exit_code() == 0, job.output

    (steps0, done0), (steps1, done1) = (read_log(tmp_path / f"rank{r}.jsonl") for r in (0, 1))
    assert done0 is not None and done1 is not None
    assert done0 == done1 and done0["stop_reason"] == "cli"  # same step, same epoch
    assert [s[:2] for s in steps0] == [s[:2] for s in steps1]
    for steps in (steps0, steps1):
        assert {lr for _, step, lr in steps if step < at_step} == {0.05}
        assert {lr for _, step, lr in steps if step >= at_step} == {0.01}
    infos = await client.ranks(run)
    assert [(i.record.rank, i.liveness) for i in infos] == [("0", "exited"), ("1", "exited")]


@pytest.mark.anyio
@pytest.mark.timeout(240)  # two torch processes per launch: slow to start on a loaded machine
async def test_a_stop_sent_to_one_rank_stops_every_rank_with_its_reason(
    jobs: list[Job],
    client: Client,
    nats_url: str,
    tmp_path: Path,
) -> None:
    """One rank's stop stops them all (a collective in the loop), before the other rank's
    agent heard of any stop: each still reports the reason the run was stopped with."""
    job = Job(["--log-dir", str(tmp_path)], {"RUNCTL_NATS_URL": nats_url, "RUNCTL_RUN": ""})
    jobs.append(job)
    run = (await job.runs())["0"]
    await stepping(job, client, run)

    stop = await cli(nats_url, "stop", f"{run}/1", "--reason", "cli")
    assert stop["rank"] == "1" and stop["outcome"] == "applied", stop
    assert await job.exit_code() == 0, job.output

    (_, done0), (_, done1) = (read_log(tmp_path / f"rank{r}.jsonl") for r in (0, 1))
    assert done0 is not None and done0 == done1 and done0["stop_reason"] == "cli"


@pytest.mark.anyio
@pytest.mark.timeout(240)  # two launches of two torch processes each
async def test_torchrun_restarted_after_a_crash_skips_the_epochs_done(
    jobs: list[Job],
    client: Client,
    nats_url: str,
    run_id: str,
    tmp_path: Path,
) -> None:
    env = {"RUNCTL_NATS_URL": nats_url, "RUNCTL_RUN": run_id}
    first_logs, second_logs = tmp_path / "first", tmp_path / "second"
    first_logs.mkdir()
    second_logs.mkdir()
    checkpoint = str(tmp_path / "model.pt")
    job = Job(["--log-dir", str(first_logs), "--checkpoint", checkpoint], env)
    jobs.append(job)
    crashed = await stepping(job, client, run_id, past=40)  # a few epochs of 16 steps done
    job.kill()  # a crash: no stop is recorded, nothing says goodbye

    steps, done = read_log(first_logs / "rank0.jsonl")
    assert done is None
    reached = steps[-1][0]  # the epoch it was in
    assert reached >= 2

    job = Job(["--log-dir", str(second_logs), "--checkpoint", checkpoint], env)
    jobs.append(job)
    await stepping(job, client, run_id, not_pids=frozenset(crashed))
    await cli(nats_url, "stop", run_id)
    assert await job.exit_code() == 0, job.output
    for rank in (0, 1):
        steps, done = read_log(second_logs / f"rank{rank}.jsonl")
        # epochs logged done were skipped: it went on from the interrupted one (or the
        # next, if the crash came after that epoch's completion was logged)
        assert steps and reached <= steps[0][0] <= reached + 1
        assert done is not None and done["epoch"] >= steps[0][0]
