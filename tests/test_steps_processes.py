"""Resume across real process deaths: the program killed with SIGKILL, the nats-server killed
with SIGKILL, and two ranks in separate processes."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import nats
from conftest import spawn_python

from runctl.bus.server import NatsServer
from runctl.bus.steps.records import RunLog
from runctl.bus.steps.store import read_log

PROGRAM = """
import json, os, sys, time
from pydantic import BaseModel
from runctl.agent import control

class S(BaseModel):
    x: int = 0

ctl = control(S(), run=os.environ["RUN"], rank=int(os.environ.get("RANK_", "0")),
              url=os.environ["URL"])
ctl.wait_ready()
"""


def log_of(url: str, run: str) -> RunLog:
    async def go() -> RunLog:
        nc = await nats.connect(url)
        try:
            return await read_log(nc, run)
        finally:
            await nc.close()

    return anyio.run(go)


def objects(text: str) -> list[Any]:
    """The JSON objects a program printed, one a line. The agent's thread logs to the same
    stdout, and print() writes text and newline separately, so a log line may share the
    object's line: find the object where it starts."""
    found = []
    for line in text.splitlines():
        start = line.find('{"')
        if start >= 0:
            found.append(json.JSONDecoder().raw_decode(line[start:])[0])
    return found


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> list[Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return objects(out)


def test_a_program_killed_half_way_runs_only_the_rest(nats_url: str, run_id: str) -> None:
    code = (
        PROGRAM
        + """
@ctl.cached()
def work(i):
    print(json.dumps({"computing": i}), flush=True)
    if i == 10 and os.environ.get("HANG"):
        time.sleep(60)                      # killed here, half-way through 20 steps
    return {"i": i, "square": i * i, "pid": os.getpid()}

for i in range(20):
    print(json.dumps({"result": work(i)}), flush=True)
print(json.dumps({"interrupted": [r.key for r in ctl.agent.steplog.interrupted]}), flush=True)
ctl.close()
"""
    )
    env = {"RUN": run_id, "URL": nats_url}
    first = spawn_python(code, env={**env, "HANG": "1"})
    assert first.stdout is not None
    deadline = time.monotonic() + 30
    for line in first.stdout:
        if objects(line) == [{"computing": 10}]:
            break
        assert time.monotonic() < deadline
    # the "started" record is published without waiting (it only informs): give it a moment
    # to leave, or the restart cannot tell "interrupted" from "never started"
    time.sleep(0.3)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=10)  # reaps it and closes its pipes
    second_proc = spawn_python(code, env=env)
    second = finish(second_proc)
    computed = [o["computing"] for o in second if "computing" in o]
    results = [o["result"] for o in second if "result" in o]
    assert computed == list(range(10, 20))
    assert [r["square"] for r in results] == [i * i for i in range(20)]
    assert {r["pid"] for r in results[:10]} == {first.pid}  # from the log, not recomputed
    assert {r["pid"] for r in results[10:]} == {second_proc.pid}
    assert second[-1] == {"interrupted": [{"i": 10}]}
    runlog = log_of(nats_url, run_id)
    assert len(runlog.records) == 20
    assert {r.attempt for _, r in runlog.records.values() if r.key == {"i": 10}} == {2}


def test_no_acknowledged_completion_is_lost_when_the_server_is_killed(
    nats_server: NatsServer, run_id: str, tmp_path: Path
) -> None:
    n = 60
    code = (
        PROGRAM
        + f"""
for i in ctl.steps("item", range({n})):
    if i == 16:  # the rest runs once the test has killed the server (bounded wait)
        until = time.monotonic() + 30
        while not os.path.exists(os.environ["GATE"]) and time.monotonic() < until:
            time.sleep(0.01)
    time.sleep(0.02)
    print(json.dumps({{"ran": i, "pending": ctl.agent.steps.pending}}), flush=True)
flushed = ctl.agent.steps.flush(20)
# the reload after the reconnect kept every acknowledged completion in memory
print(json.dumps({{"flushed": flushed, "pending": ctl.agent.steps.pending,
                  "all_done": all(ctl.is_done("item", i) for i in range({n}))}}), flush=True)
ctl.close()
"""
    )
    url = nats_server.url
    gate = tmp_path / "server-killed"
    proc = spawn_python(code, env={"RUN": run_id, "URL": url, "GATE": str(gate)})
    assert proc.stdout is not None
    for line in proc.stdout:
        if any(o.get("ran") == 15 for o in objects(line)):
            break
    acked_before = {r.key for _, r in log_of(url, run_id).records.values() if r.status == "done"}
    nats_server.kill()  # SIGKILL, store kept
    gate.touch()  # the program goes on while the server is down
    time.sleep(0.5)
    restarted = NatsServer(port=nats_server.port, store_dir=nats_server.store_dir).start()
    try:
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err[-3000:]
        lines = objects(out)
        ran = [o["ran"] for o in lines if "ran" in o]
        assert lines[-1] == {"flushed": True, "pending": 0, "all_done": True}
        assert sorted(ran) == [i for i in range(n) if i > 15]  # the program carried on
        assert max(o["pending"] for o in lines if "ran" in o) > 0  # it did see the outage
        runlog = log_of(url, run_id)
        done = {r.key: r for _, r in runlog.records.values() if r.status == "done"}
        assert acked_before and acked_before <= set(done)  # nothing acknowledged was lost
        assert set(done) == set(range(n))
        assert len(runlog.records) == n  # one record per step: nothing doubled
        assert {r.attempt for r in done.values()} == {1}  # no step ran twice
    finally:
        restarted.stop()


def test_two_ranks_in_separate_processes(nats_url: str, run_id: str) -> None:
    code = (
        PROGRAM
        + """
rank = ctl.rank
with ctl.once("prepare", scope="run") as s:
    if not s.done:
        s.result = {"prepared_by": rank}
print(json.dumps({"prepare": s.result, "skipped": s.was_done}), flush=True)
for shard in ctl.steps("shard", ["a", "b", "c"]):
    print(json.dumps({"shard": shard}), flush=True)
ctl.close()
"""
    )
    env = {"RUN": run_id, "URL": nats_url}
    rank0 = finish(spawn_python(code, env={**env, "RANK_": "0"}))
    rank1 = finish(spawn_python(code, env={**env, "RANK_": "1"}))
    assert rank0[0] == {"prepare": {"prepared_by": "0"}, "skipped": False}
    assert rank1[0] == {"prepare": {"prepared_by": "0"}, "skipped": True}
    assert [o["shard"] for o in rank0[1:]] == ["a", "b", "c"]
    assert [o["shard"] for o in rank1[1:]] == ["a", "b", "c"]  # per-rank work is its own
    again = finish(spawn_python(code, env={**env, "RANK_": "1"}))
    assert again == [{"prepare": {"prepared_by": "0"}, "skipped": True}]
    scopes = sorted((r.scope, r.name) for _, r in log_of(nats_url, run_id).records.values())
    assert scopes == [("0", "shard")] * 3 + [("1", "shard")] * 3 + [("run", "prepare")]


def test_an_idle_agent_is_not_woken_for_nothing(nats_url: str, run_id: str) -> None:
    # On a VM a woken thread runs its code cold (docs/performance.md): an idle agent must
    # not wake on a timer of its own. With a 30 s heartbeat, nothing is due in 2 s (the
    # step log's writer used to look every 0.25 s: 8-10 runs; a stray PING may add one).
    code = (
        PROGRAM.replace('url=os.environ["URL"])', 'url=os.environ["URL"], heartbeat=30)')
        + """
import threading
time.sleep(3.0)  # start-up settles: the announce, the step log's read, the server's first PING
agent = next(t for t in threading.enumerate() if t.name.startswith("runctl-agent"))

def runs():  # how many times the thread has run on a CPU (Linux)
    with open(f"/proc/self/task/{agent.native_id}/schedstat") as stat:
        return int(stat.read().split()[2])

before = runs()
time.sleep(2.0)
print(json.dumps({"runs": runs() - before}), flush=True)
ctl.close()
"""
    )
    assert "heartbeat=30)" in code
    (result,) = finish(spawn_python(code, env={"RUN": run_id, "URL": nats_url}))
    assert result["runs"] <= 3, result
