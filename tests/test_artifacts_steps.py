"""Step results of any size and attached files, with real rank processes and nats-server.

- a 50 MiB numpy result is stored once and returned on a rerun in another process and
  another working directory;
- a damaged object is caught by its digest, and the step runs again;
- files attached to a step come back, streamed, on a later run elsewhere;
- forgetting a step removes its objects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from conftest import GatewayFactory, spawn_python

from runctl.bus.artifact_store import BUCKET, ArtifactStore
from runctl.bus.client import Client, Gathered

PROGRAM = """
import json, os, sys, time
import numpy as np
from pydantic import BaseModel
from runctl import control

class S(BaseModel):
    x: int = 0

ctl = control(S(), run=os.environ["RUN"], url=os.environ["URL"])
ctl.wait_ready(30)

def say(**kw):
    print("\\n" + json.dumps(kw), flush=True)
"""

EMBEDDINGS = (
    PROGRAM
    + """
@ctl.cached()
def embeddings(n: int):
    say(computing=n)
    return np.arange(n, dtype=np.float64).reshape(-1, 1024)   # n * 8 bytes

table = embeddings(50 * 1024 * 1024 // 8)                      # 50 MiB
say(shape=list(table.shape), dtype=str(table.dtype), last=float(table[-1, -1]),
    cwd=os.getcwd())
ctl.close()
"""
)


def _objects(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        start = line.find('{"')
        if start >= 0:
            found.append(json.JSONDecoder().raw_decode(line[start:])[0])
    return found


def _finish(proc: subprocess.Popen[str], timeout: float = 90) -> list[dict[str, Any]]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"still running after {timeout}s:\n{out[-2000:]}\n{err[-3000:]}"
        ) from None
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return _objects(out)


def _stored(url: str, prefix: str) -> list[str]:
    async def go() -> list[str]:
        nc = await nats.connect(url)
        try:
            store = await ArtifactStore.open(nc.jetstream())
            return [info.name for info in await store.list(prefix)]
        finally:
            await nc.close()

    return anyio.run(go)


def test_a_50_mib_numpy_result_comes_back_in_another_process_and_directory(
    nats_url: str, run_id: str, tmp_path: Path
) -> None:
    env = {"RUN": run_id, "URL": nats_url}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _finish(spawn_python(EMBEDDINGS, env=env, cwd=tmp_path / "a"))
    assert {"computing": 50 * 1024 * 1024 // 8} in first
    (result,) = [o for o in first if "shape" in o]
    assert result["shape"] == [6400, 1024] and result["dtype"] == "float64"
    names = _stored(nats_url, f"{run_id}/")
    assert len(names) == 1 and names[0].endswith("/result"), names

    second = _finish(spawn_python(EMBEDDINGS, env=env, cwd=tmp_path / "b"))
    assert not [o for o in second if "computing" in o], second  # not recomputed
    (again,) = [o for o in second if "shape" in o]
    assert again["cwd"] != result["cwd"]
    assert {k: again[k] for k in ("shape", "dtype", "last")} == {
        k: result[k] for k in ("shape", "dtype", "last")
    }
    assert _stored(nats_url, f"{run_id}/") == names  # stored once


def test_a_damaged_result_is_caught_by_its_digest_and_the_step_reruns(
    nats_url: str, run_id: str
) -> None:
    code = (
        PROGRAM
        + """
@ctl.cached()
def blob():
    say(computing=True)
    return bytes(range(256)) * 4096                 # 1 MiB of bytes: an object
data = blob()
say(size=len(data), ok=data == bytes(range(256)) * 4096)
ctl.close()
"""
    )
    env = {"RUN": run_id, "URL": nats_url}
    assert {"computing": True} in _finish(spawn_python(code, env=env))
    (name,) = _stored(nats_url, f"{run_id}/")

    async def damage() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            obj = await js.object_store(BUCKET)
            info = await obj.get_info(name)
            chunks = f"$O.{BUCKET}.C.{info.nuid}"
            good = bytearray((await obj.get(name)).data or b"")
            await js.purge_stream(f"OBJ_{BUCKET}", subject=chunks)
            good[12345] ^= 0x55
            for start in range(0, len(good), 128 * 1024):
                await js.publish(chunks, bytes(good[start : start + 128 * 1024]))
        finally:
            await nc.close()

    anyio.run(damage)
    rerun = _finish(spawn_python(code, env=env))
    assert {"computing": True} in rerun, rerun  # the damaged result was not used
    assert {"size": 1024 * 1024, "ok": True} in rerun


def test_attached_files_come_back_elsewhere_and_forget_removes_them(
    nats_url: str, run_id: str, tmp_path: Path, gateway: GatewayFactory
) -> None:
    code = (
        PROGRAM
        + """
with ctl.once("train", key=1) as s:
    if not s.done:
        say(training=True)
        with open("model.bin", "wb") as f:
            f.write(os.urandom(3 * 1024 * 1024 + 5))
        s.attach("model.bin")
        s.result = {"loss": 0.25}
    else:
        target = s.files["model.bin"].download("restored/model.bin")
        say(restored=target.stat().st_size, result=s.result,
            size=s.files["model.bin"].size)
ctl.close()
"""
    )
    env = {"RUN": run_id, "URL": nats_url}
    (tmp_path / "host1").mkdir()
    (tmp_path / "host2").mkdir()
    assert {"training": True} in _finish(spawn_python(code, env=env, cwd=tmp_path / "host1"))
    names = _stored(nats_url, f"{run_id}/")
    assert [n.rsplit("/", 2)[-2:] for n in names] == [["files", "model.bin"]]

    again = _finish(spawn_python(code, env=env, cwd=tmp_path / "host2"))
    expected = 3 * 1024 * 1024 + 5
    assert {"restored": expected, "result": {"loss": 0.25}, "size": expected} in again
    restored = tmp_path / "host2" / "restored" / "model.bin"
    assert restored.read_bytes() == (tmp_path / "host1" / "model.bin").read_bytes()

    # listed and fetched from outside: HTTP, and the CLI (streamed, digest-checked)
    listed = gateway().get(f"/runs/{run_id}/artifacts")
    assert listed.status_code == 200, listed.text
    assert [a["size"] for a in listed.json()["artifacts"]] == [expected]
    (name,) = names
    cli = [sys.executable, "-m", "runctl", "--nats", nats_url, "artifacts", run_id]
    shown = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and name in shown.stdout, shown.stdout + shown.stderr
    fetched = subprocess.run(
        [*cli, "--get", name, "--to", str(tmp_path / "cli" / "model.bin")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert (tmp_path / "cli" / "model.bin").read_bytes() == restored.read_bytes()
    # runctl steps shows what each step keeps in the object store
    steps = subprocess.run(
        [sys.executable, "-m", "runctl", "--nats", nats_url, "steps", run_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert steps.returncode == 0, steps.stdout + steps.stderr
    header, row = steps.stdout.splitlines()[:2]
    assert header.split()[-1] == "STORED" and row.startswith("train")
    assert row.split()[-2:] == ["3.0", "MiB"], steps.stdout

    forget = subprocess.run(
        [sys.executable, "-m", "runctl", "--nats", nats_url, "forget", run_id, "train"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert forget.returncode == 0, forget.stdout + forget.stderr
    assert _stored(nats_url, f"{run_id}/") == []


CHECKPOINTING = """
import json, os, sys, time
from pydantic import BaseModel
from runctl import control

class S(BaseModel):
    lr: float = 0.1

rank = int(os.environ["RANK_"])
ctl = control(S(), run=os.environ["RUN"], rank=rank, url=os.environ["URL"])
ctl.wait_ready(30)

def say(**kw):
    print("\\n" + json.dumps(kw), flush=True)

def content(step):
    return (f"rank {rank} at step {step};" * 50_000).encode()

@ctl.on_checkpoint
def save(step):
    time.sleep(0.5)              # a slow save: the stop must wait for it
    with open(f"model-{rank}.bin", "wb") as f:
        f.write(content(step))
    return f"model-{rank}.bin"

found = ctl.latest_checkpoint()
if found is not None:
    paths = found.download("restored")
    data = paths[f"model-{rank}.bin"].read_bytes()
    say(resumed=found.step, intact=data == content(found.step), files=sorted(found.files))
say(ready=True)
step = 0
deadline = time.monotonic() + 60
while not ctl.stop_requested and time.monotonic() < deadline:
    ctl.sync(step)
    step += 1
    time.sleep(0.005)
say(stopped=ctl.stop_requested, step=step)
ctl.close()
"""


class _Rank:
    """A rank process whose output goes to a file: waited on with a deadline, shown on failure."""

    def __init__(self, code: str, env: dict[str, str], cwd: Path) -> None:
        self.log = cwd / "rank.log"
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            cwd=cwd,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} (exit {self.proc.poll()}):\n{self.output()}")
            time.sleep(0.05)

    def finish(self, timeout: float = 60) -> list[dict[str, Any]]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.output()}") from None
        assert code == 0, f"exit {code}:\n{self.output()}"
        return _objects(self.output())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()


@pytest.mark.timeout(180)
def test_a_checkpointing_stop_waits_for_every_ranks_checkpoint_and_a_restart_resumes(
    nats_url: str, run_id: str, tmp_path: Path
) -> None:
    ranks: list[_Rank] = []
    try:
        _checkpoint_and_resume(nats_url, run_id, tmp_path, ranks)
    finally:
        for rank in ranks:
            rank.kill()


def _checkpoint_and_resume(nats_url: str, run_id: str, tmp_path: Path, ranks: list[_Rank]) -> None:
    for rank in (0, 1):
        where = tmp_path / f"host{rank}"
        where.mkdir()
        env = {"RUN": run_id, "URL": nats_url, "RANK_": str(rank)}
        ranks.append(_Rank(CHECKPOINTING, env, where))
    for proc in ranks:
        proc.wait_for('"ready": true')

    async def stop() -> Gathered:
        async with await Client.connect(nats_url, timeout=10) as client:
            result = await client.stop(run_id, "all", reason="checkpoint", checkpoint=True)
            assert isinstance(result, Gathered)
            return result

    stopped = anyio.run(stop)
    assert not stopped.cancelled and stopped.no_checkpoint == [], stopped.to_json()
    assert set(stopped.checkpoints) == {"0", "1"}, stopped.to_json()
    steps = {r["step"] for r in stopped.checkpoints.values()}
    assert steps == {stopped.at_step}  # every rank at the same step
    for who, report in stopped.checkpoints.items():
        assert report["ok"] and report["acknowledged"], report
        size = len(f"rank {who} at step {stopped.at_step};".encode()) * 50_000
        assert report["files"][f"model-{who}.bin"]["size"] == size
        # stored before the answer came: the object is there now
        assert any(n.endswith(f"files/model-{who}.bin") for n in _stored(nats_url, f"{run_id}/"))
    for proc in ranks:
        done = proc.finish()
        assert done[-1]["stopped"] is True

    restarted = []
    for rank in (0, 1):
        where = tmp_path / f"other-host{rank}"
        where.mkdir()
        env = {"RUN": run_id, "URL": nats_url, "RANK_": str(rank)}
        restarted.append(_Rank(CHECKPOINTING, env, where))
        ranks.append(restarted[-1])
    for rank, proc in enumerate(restarted):
        out = proc.finish()
        assert {
            "resumed": stopped.at_step,
            "intact": True,
            "files": [f"model-{rank}.bin"],
        } in out, out
