"""Ranks as real separate processes: broadcast to every rank, stop and exit, a SIGKILLed rank
going stale, a busy main thread, and the zero-setup embedded server."""

from __future__ import annotations

import signal
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import free_port, listening, spawn_python, wait_exit, wait_for

from runctl.bus import Client, Gathered, NotFound, RankInfo, Result, ValidationRejected

#: markers go out in one write() each: the agent thread logs to the same stdout
SAY = """
    import os
    def say(*words):
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())
"""

RANK_CODE = """
    import os, sys, time
    from pydantic import BaseModel, Field
    from runctl.agent import control

    class Opt(BaseModel):
        lr: float = Field(0.1, gt=0)
        momentum: float = 0.9

    class S(BaseModel):
        epochs: int = 3
        opt: Opt = Opt()

    state = S()
    held = state.opt
    # run, rank and url come from RUNCTL_RUN, RUNCTL_RANK and RUNCTL_NATS_URL
    ctl = control(state, heartbeat=float(os.environ.get("HEARTBEAT", "1")))
    ctl.wait_ready()
    say("READY", ctl.run, ctl.rank)
    while not ctl.stop_requested:
        time.sleep(0.01)
    say("STATE", state.model_dump_json(), held is state.opt, held.lr)
    ctl.close()
    sys.exit(0)
"""


class Ranks:
    """Processes this test started; whatever is still running at the end is killed."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(
        self,
        run: str,
        rank: int,
        url: str,
        *,
        code: str = RANK_CODE,
        heartbeat: float = 1.0,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        proc = spawn_python(
            textwrap.dedent(SAY) + textwrap.dedent(code),
            cwd=cwd,
            env={
                "RUNCTL_RUN": run,
                "RUNCTL_RANK": str(rank),
                "RUNCTL_NATS_URL": url,
                "HEARTBEAT": str(heartbeat),
                "PYTHONPATH": str(Path(__file__).parent.parent),
                **(env or {}),
            },
        )
        self.procs[str(rank)] = proc
        return proc

    async def line(self, rank: int | str, prefix: str, timeout: float = 20) -> str:
        proc = self.procs[str(rank)]
        assert proc.stdout is not None
        with anyio.fail_after(timeout):
            while True:
                text = await anyio.to_thread.run_sync(proc.stdout.readline)
                if not text:
                    _, err = proc.communicate(timeout=5)
                    raise AssertionError(f"rank {rank} exited ({proc.returncode}): {err}")
                if prefix in text:  # the agent thread's log lines may share the line
                    return text[text.index(prefix) :].strip()

    async def ready(self, *ranks: int) -> None:
        for rank in ranks:
            await self.line(rank, "READY")

    async def exit_code(self, rank: int | str, timeout: float = 20) -> int:
        return await wait_exit(self.procs[str(rank)], timeout, f"rank {rank}")

    def output(self, rank: int | str) -> str:
        """The end of a rank's stderr (it is killed first if still running): for failures."""
        proc = self.procs[str(rank)]
        if proc.poll() is None:
            proc.kill()
        try:
            _, err = proc.communicate(timeout=5)
        except (subprocess.TimeoutExpired, ValueError) as error:  # ValueError: streams closed
            return repr(error)
        return (err or "")[-3000:]

    def cleanup(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def ranks() -> Iterator[Ranks]:
    handle = Ranks()
    yield handle
    handle.cleanup()


def gathered(result: Result | Gathered) -> Gathered:
    assert isinstance(result, Gathered), result
    return result


async def liveness(client: Client, run: str) -> dict[str, str]:
    return {i.record.rank: i.liveness for i in await client.ranks(run)}


# --- broadcast -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_patch_and_stop_on_all_ranks(ranks: Ranks, nats_url: str, run_id: str) -> None:
    ranks.start(run_id, 0, nats_url)  # the standard loop, the default
    ranks.start(run_id, 1, nats_url, env={"RUNCTL_LOOP": "uvloop"})
    await ranks.ready(0, 1)
    async with await Client.connect(nats_url) as client:
        res = gathered(await client.patch(run_id, "all", {"opt": {"lr": 0.5}}))
        assert res.acknowledged == ["0", "1"] and not res.errors and not res.missing
        assert all(
            r.changed and r.value["opt"] == {"lr": 0.5, "momentum": 0.9}
            for r in res.results.values()
        )
        cached = gathered(await client.get(run_id, "all", "opt.lr"))
        assert {r: x.value for r, x in cached.results.items()} == {"0": 0.5, "1": 0.5}

        stop = gathered(await client.stop(run_id, "all", reason="finished"))
        assert stop.acknowledged == ["0", "1"] and not stop.missing
        assert all(r.value["stop_requested"] for r in stop.results.values())
        for rank in (0, 1):
            line = await ranks.line(rank, "STATE")
            assert '"lr":0.5' in line and line.endswith("True 0.5")  # held reference updated
            assert await ranks.exit_code(rank) == 0
        assert await liveness(client, run_id) == {"0": "exited", "1": "exited"}


@pytest.mark.anyio
async def test_an_invalid_patch_on_all_is_rejected_per_rank_and_nothing_changes(
    ranks: Ranks, nats_url: str, run_id: str
) -> None:
    ranks.start(run_id, 0, nats_url)
    ranks.start(run_id, 1, nats_url)
    await ranks.ready(0, 1)
    async with await Client.connect(nats_url) as client:
        res = gathered(await client.patch(run_id, "all", {"epochs": 9, "opt": {"lr": -1}}))
        assert not res.results and set(res.errors) == {"0", "1"}
        for err in res.errors.values():
            assert isinstance(err, ValidationRejected)
            assert err.errors[0]["loc"] == ["opt", "lr"]
        report = res.to_json()
        assert {r["outcome"] for r in report["ranks"].values()} == {"rejected"}
        fresh = gathered(await client.get(run_id, "all", fresh=True))
        assert {r: (x.value["epochs"], x.version) for r, x in fresh.results.items()} == {
            "0": (3, 0),
            "1": (3, 0),
        }
        await client.stop(run_id, "all")
    for rank in (0, 1):
        assert '"epochs":3' in await ranks.line(rank, "STATE")
        assert await ranks.exit_code(rank) == 0


# --- failures of a rank ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_killed_rank_is_missing_then_stale_while_the_other_answers(
    ranks: Ranks, nats_url: str, run_id: str
) -> None:
    ranks.start(run_id, 0, nats_url, heartbeat=0.2)
    victim = ranks.start(run_id, 1, nats_url, heartbeat=0.2)
    await ranks.ready(0, 1)
    async with await Client.connect(nats_url, timeout=1.0) as client:
        assert await liveness(client, run_id) == {"0": "alive", "1": "alive"}
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        # still "alive" in the registry for a moment: the broadcast names it missing
        res = gathered(await client.ping(run_id, "all"))
        assert "0" in res.results
        if res.missing:
            assert res.missing == ["1"] and res.to_json()["ranks"]["1"]["outcome"] == "no_answer"

        with anyio.fail_after(15):
            while True:
                if (await liveness(client, run_id)).get("1") == "stale":
                    break
                await anyio.sleep(0.1)
        infos: list[RankInfo] = [i for i in await client.runs() if i.record.run == run_id]
        assert {i.record.rank: i.liveness for i in infos} == {"0": "alive", "1": "stale"}
        stale = next(i for i in infos if i.record.rank == "1")
        assert stale.age > 0.6 and stale.record.state["epochs"] == 3  # last state readable

        # a stale rank gets a short grace, then is named stale; the live one keeps answering
        res = gathered(await client.patch(run_id, "all", {"epochs": 4}))
        assert list(res.results) == ["0"] and not res.missing and res.stale == ["1"]
        with pytest.raises(NotFound):
            await client.ping(run_id, 1)
        await client.stop(run_id, 0)
    assert await ranks.exit_code(0) == 0


@pytest.mark.anyio
async def test_a_busy_main_thread_does_not_block_commands(
    ranks: Ranks, nats_url: str, run_id: str
) -> None:
    busy = """
        import sys
        from pydantic import BaseModel
        from runctl.agent import control

        class S(BaseModel):
            x: int = 0

        state = S()
        ctl = control(state)
        ctl.wait_ready()
        say("READY")
        spins = 0
        while not ctl.stop_requested:  # pure Python, holds the GIL, never sleeps
            spins += 1
        say("STATE", state.x, spins)
        ctl.close()
        sys.exit(0)
    """
    ranks.start(run_id, 0, nats_url, code=busy)
    await ranks.ready(0)
    async with await Client.connect(nats_url) as client:
        for value in range(1, 6):
            res = await client.set(run_id, 0, "x", value)
            assert isinstance(res, Result) and res.version == value
        pong = await client.ping(run_id, 0)
        assert isinstance(pong, Result)
        await client.stop(run_id, 0)
    _, x, spins = (await ranks.line(0, "STATE")).split()
    assert int(x) == 5 and int(spins) > 0
    assert await ranks.exit_code(0) == 0


# --- zero setup: the embedded server ----------------------------------------------------------

EMBEDDED_CODE = """
    import os, sys, time
    from pydantic import BaseModel
    from runctl.agent import control

    class S(BaseModel):
        x: int = 0

    ctl = control(S(), run=os.environ["RUNCTL_RUN"], rank=0)  # no URL anywhere
    ctl.wait_ready(30)
    lease = ctl.agent.lease
    say("READY", ctl.url, lease is not None and lease.started_server)
    while not ctl.stop_requested:
        time.sleep(0.01)
    ctl.close()
    sys.exit(0)
"""


def _nats_servers_using(path: Path) -> list[int]:
    """PIDs of running nats-server processes whose working directory is ``path`` (the
    embedded server's store dir is relative to the program's cwd)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            cwd = (entry / "cwd").resolve()
        except OSError:
            continue
        if argv[0].endswith(b"nats-server") and cwd == path.resolve():
            pids.append(int(entry.name))
    return pids


@pytest.mark.anyio
@pytest.mark.parametrize("ending", ["stop", "sigkill"])
async def test_embedded_server_when_no_url_is_configured(
    ranks: Ranks, run_id: str, tmp_path: Path, ending: str
) -> None:
    port = free_port()  # the embedded server's port (4222 by default) may be taken here
    env = {"RUNCTL_NATS_PORT": str(port), "RUNCTL_GATEWAY": "0"}
    ranks.start(run_id, 0, "", code=EMBEDDED_CODE, cwd=tmp_path, env=env)  # no URL
    _, url, started = (await ranks.line(0, "READY", timeout=40)).split()
    assert url == f"nats://127.0.0.1:{port}" and started == "True"
    assert (tmp_path / ".runctl" / "nats").is_dir()  # the store lives in the program's cwd
    assert len(_nats_servers_using(tmp_path)) == 1
    async with await Client.connect(url) as client:
        res = await client.set(run_id, 0, "x", 4)
        assert isinstance(res, Result) and res.changed
        if ending == "stop":
            await client.stop(run_id, 0)
            assert await ranks.exit_code(0) == 0
        else:
            ranks.procs["0"].send_signal(signal.SIGKILL)
            assert await ranks.exit_code(0) == -signal.SIGKILL
    # no orphan: the server went with the program
    wait_for(lambda: not _nats_servers_using(tmp_path), timeout=20)
    wait_for(lambda: not listening(port), timeout=10)


@pytest.mark.anyio
async def test_an_unknown_event_loop_choice_fails_at_start_naming_it(
    ranks: Ranks, nats_url: str, run_id: str
) -> None:
    proc = ranks.start(run_id, 0, nats_url, env={"RUNCTL_LOOP": "trio"})
    assert await ranks.exit_code(0) != 0
    assert proc.stderr is not None
    assert "RUNCTL_LOOP must be 'uvloop' or 'asyncio', not 'trio'" in proc.stderr.read()
