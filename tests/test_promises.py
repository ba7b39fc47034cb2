"""Promises a mutation check found unguarded: each test here fails when its promise is
planted away (the regression named in its docstring), against real processes.

- read-your-writes: the writer waits until the registry shows its write;
- a declared Content-Length over the limit is answered before any byte is read;
- ``?mode=terminate&grace=`` and ``runctl stop --terminate --grace`` reach the rank;
- an old run-wide stop record does not stop every new rank of a run that reuses its id.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import anyio
import httpx
import nats
import pytest
from conftest import GatewayFactory, wait_exit
from nats.aio.msg import Msg
from pydantic import BaseModel
from rankkit import ProgramRank, runctl_cli

from runctl.agent import control
from runctl.bus import Client, Result
from runctl.bus import messages as m
from runctl.bus.registry import Registry
from runctl.bus.subjects import command_subject

MODELS = """
from pydantic import BaseModel

class Cfg(BaseModel):
    lr: float = 0.1
"""


class Cfg(BaseModel):
    lr: float = 0.1


# --- read-your-writes ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_write_is_read_back_from_the_registry_even_when_the_rank_records_it_late(
    nats_url: str, run_id: str
) -> None:
    """Planted regression: the client's registry catch-up removed. A rank replies first
    and writes its registry record after (what agents do: no network wait on the
    program's side); here the record comes 0.5 s late, so only the writer's wait makes
    the next read show the write."""
    nc = await nats.connect(nats_url)
    registry = await Registry.open(nc)
    now = time.time()

    def record(version: int, lr: float) -> m.RankRecord:
        return m.RankRecord(
            run=run_id,
            rank="0",
            host="h",
            pid=1,
            started=now,
            heartbeat=time.time(),
            heartbeat_interval=60.0,
            version=version,
            state={"lr": lr},
        )

    await registry.put(record(1, 0.1))
    late: list[anyio.Event] = []

    async def on_set(msg: Msg) -> None:  # an older rank: no acks offered, record after
        reply = m.Ok(run=run_id, rank="0", version=2, value={"lr": 0.5}, changed=True)
        await msg.respond(m.encode(reply))
        await anyio.sleep(0.5)
        await registry.put(record(2, 0.5))
        late[0].set()

    late.append(anyio.Event())
    sub = await nc.subscribe(command_subject(run_id, "0", "set"), cb=on_set)
    await nc.flush()
    try:
        async with await Client.connect(nats_url, journal_timeout=0.2) as client:
            res = await client.set(run_id, 0, "lr", 0.5)
            assert isinstance(res, Result) and res.version == 2
            read = await client.get(run_id, 0)  # right after: from the registry
            assert isinstance(read, Result) and read.version == 2, read
            assert read.value == {"lr": 0.5}
    finally:
        with anyio.fail_after(5):
            await late[0].wait()
        await sub.unsubscribe()
        await nc.close()


# --- 413 before the body is read ---------------------------------------------------------


def test_a_declared_length_over_the_limit_is_answered_before_any_byte_is_read(
    gateway: GatewayFactory, run_id: str
) -> None:
    """Planted regression: the declared-length check removed (the body would then be read
    up to the limit and refused after: "read, then refused"). Only the headers are sent
    here; the 413 must come without a byte of the body, and name the declared size."""
    http = gateway()
    url = httpx.URL(str(http.base_url))
    declared = 10 << 20
    head = (
        f"PATCH /runs/{run_id}/ranks/0/set HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{url.port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection((url.host, url.port), timeout=15) as sock:
        sock.sendall(head)  # and no body at all
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # a gateway that waits for the body times out here
            if not chunk:
                break
            answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    assert b" 413 " in status, answer[:500]
    assert str(declared).encode() in answer, answer[-300:]  # the declared size, not a count


# --- stop modes end to end ---------------------------------------------------------------


@pytest.fixture
def stubborn(nats_url: str, run_id: str) -> Iterator[ProgramRank]:
    """A program that never stops by itself (it ignores a graceful stop)."""
    with ProgramRank(MODELS, "Cfg()", run=run_id, url=nats_url) as rank:
        yield rank


@pytest.mark.anyio
async def test_terminate_with_a_grace_over_http_signals_the_rank_after_its_grace(
    gateway: GatewayFactory, stubborn: ProgramRank, nats_url: str, run_id: str
) -> None:
    """Planted regression: the gateway drops ``?mode=terminate&grace=`` (a graceful stop
    with the default grace: the program would run on)."""
    http = gateway()
    r = http.post(f"/runs/{run_id}/ranks/all/stop", params={"mode": "terminate", "grace": "1"})
    assert r.status_code == 200, r.text
    assert await wait_exit(stubborn.proc, 20, "the rank") == -15, stubborn.output
    async with await Client.connect(nats_url) as client:
        recorded = await (await client.registry()).get_run(run_id)
    assert recorded is not None and (recorded.mode, recorded.grace) == ("terminate", 1.0)


@pytest.mark.anyio
async def test_terminate_with_a_grace_from_the_cli_signals_the_rank_after_its_grace(
    stubborn: ProgramRank, nats_url: str, run_id: str
) -> None:
    out = runctl_cli("stop", run_id, "--terminate", "--grace", "1", url=nats_url)
    assert out.returncode == 0, out.stderr
    assert await wait_exit(stubborn.proc, 20, "the rank") == -15, stubborn.output


@pytest.mark.anyio
async def test_a_graceful_stop_leaves_the_program_to_stop_itself(
    gateway: GatewayFactory, stubborn: ProgramRank, run_id: str
) -> None:
    """The other side: without ``mode=terminate`` nothing signals the program."""
    http = gateway()
    r = http.post(f"/runs/{run_id}/ranks/all/stop", params={"grace": "0.2"})
    assert r.status_code == 200, r.text
    stubborn.do("assert ctl.stop_requested")
    with pytest.raises(TimeoutError):
        await wait_exit(stubborn.proc, 1.5, "the rank")


# --- an old run-wide stop ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "stops"),
    [(3600.0, False), (1.0, True)],
    ids=["an-hour-old-stop-is-history", "a-fresh-stop-applies"],
)
def test_a_run_reusing_its_id_is_not_stopped_by_an_old_run_wide_stop(
    nats_url: str, run_id: str, age: float, stops: bool
) -> None:
    """Planted regression: a recorded run-wide stop obeyed forever by every new rank
    (resuming a run reuses its id). A stop recorded an hour ago, with no rank of the run
    alive, is history; one recorded a second ago reaches a rank that starts now."""

    async def record_the_stop() -> None:
        async with await Client.connect(nats_url) as client:
            registry = await client.registry()
            then = time.time() - age
            await registry.put_run(m.RunRecord(run=run_id, stop_requested=True, ts=then))

    anyio.run(record_the_stop)
    with control(Cfg(), run=run_id, rank=0, url=nats_url) as ctl:
        ctl.wait_ready(20)
        assert ctl.stop_requested is stops
