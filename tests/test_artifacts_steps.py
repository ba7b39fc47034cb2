"""Step results of any size and attached files, with real rank processes and nats-server.

- a 50 MiB numpy result is stored once and returned on a rerun in another process and
  another working directory;
- a damaged object is caught by its digest, and the step runs again;
- files attached to a step come back, streamed, on a later run elsewhere;
- forgetting a step removes its objects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import nats
from conftest import spawn_python

from runctl.bus.artifact_store import BUCKET, ArtifactStore

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
    nats_url: str, run_id: str, tmp_path: Path
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

    forget = subprocess.run(
        [sys.executable, "-m", "runctl", "--nats", nats_url, "forget", run_id, "train"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert forget.returncode == 0, forget.stdout + forget.stderr
    assert _stored(nats_url, f"{run_id}/") == []
