"""The Python client against real agents on the real bus: one rank, unknown ranks, silent
ranks, oversize and badly named requests, and a broadcast to in-process ranks."""

from __future__ import annotations

import contextlib
import gc
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import anyio
import nats
import pytest
from conftest import register_rank, register_silent_rank
from pydantic import BaseModel, Field

from runctl.agent import Control, control
from runctl.bus import (
    BadPath,
    BadToken,
    Client,
    Gathered,
    NotFound,
    PayloadTooLarge,
    Result,
    Timeout,
    Unavailable,
    ValidationRejected,
)
from runctl.bus import messages as m
from runctl.bus.subjects import command_subject


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    momentum: float = 0.9
    kind: Literal["sgd", "adam"] = "sgd"


class Cfg(BaseModel):
    epochs: int = 3
    seed: int | None = None
    opt: Opt = Opt()
    tags: dict[str, int] = {}


@pytest.fixture
def ctl(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    """Rank 0 of the test's run, in this process; a long heartbeat so the registry only
    changes when a command changes the state."""
    with control(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=30) as handle:
        handle.wait_ready()
        yield handle


def one(result: Result | Gathered) -> Result:
    assert isinstance(result, Result), result
    return result


def gathered(result: Result | Gathered) -> Gathered:
    assert isinstance(result, Gathered), result
    return result


@contextlib.contextmanager
def two_ranks(states: list[Cfg], nats_url: str, run_id: str) -> Iterator[None]:
    """Ranks 0 and 1 of the test's run, in this process, serving ``states``; ready."""
    with (
        control(states[0], run=run_id, rank=0, url=nats_url) as c0,
        control(states[1], run=run_id, rank=1, url=nats_url) as c1,
    ):
        c0.wait_ready()
        c1.wait_ready()
        yield


# --- reads ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_get_reads_the_registry_unless_fresh(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    async with await Client.connect(nats_url) as client:
        ctl.state.epochs = 11  # the program's own change: not published before a heartbeat
        cached = one(await client.get(run_id, 0))
        assert cached.source == "registry" and cached.liveness == "alive"
        assert cached.value["epochs"] == 3
        fresh = one(await client.get(run_id, 0, fresh=True))
        assert fresh.source == "agent"
        assert fresh.value["epochs"] == 11
        assert one(await client.get(run_id, 0, "opt.lr")).value == 0.1
        assert one(await client.get(run_id, "0", "opt.lr", fresh=True)).value == 0.1


@pytest.mark.anyio
async def test_runs_ranks_and_rank(ctl: Control[Cfg], nats_url: str, run_id: str) -> None:
    async with await Client.connect(nats_url) as client:
        mine = [info for info in await client.runs() if info.record.run == run_id]
        assert [(i.record.rank, i.liveness) for i in mine] == [("0", "alive")]
        [info] = await client.ranks(run_id)
        assert info.record.model == "Cfg" and info.record.status == "running"
        summary = (await client.rank(run_id, 0)).summary()
        assert summary["status"] == "alive" and summary["run"] == run_id
        assert summary["pid"] == ctl.agent.pid


# --- writes -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_set_patch_reset_on_one_rank(ctl: Control[Cfg], nats_url: str, run_id: str) -> None:
    state, held = ctl.state, ctl.state.opt
    async with await Client.connect(nats_url) as client:
        res = one(await client.set(run_id, 0, "opt.lr", 0.5))
        assert (res.rank, res.version, res.changed) == ("0", 1, True)
        assert res.value["opt"]["lr"] == 0.5  # a write answers with the whole new state
        assert held.lr == 0.5
        # read after write: the registry already holds it (the record is written first)
        assert one(await client.get(run_id, 0, "opt.lr")).value == 0.5

        res = one(await client.patch(run_id, 0, {"opt": {"kind": "adam"}, "tags": {"a": 1}}))
        assert res.changed and res.version == 2
        assert state.opt.model_dump() == {"lr": 0.5, "momentum": 0.9, "kind": "adam"}
        assert state.tags == {"a": 1}

        res = one(await client.patch(run_id, 0, {"momentum": 0.5}, path="opt"))
        assert res.changed and held.momentum == 0.5

        same = one(await client.set(run_id, 0, "opt.lr", 0.5))
        assert not same.changed and same.version == 3

        res = one(await client.reset(run_id, 0))
        assert res.changed and res.version == 4
        assert state.model_dump() == Cfg().model_dump()
        assert state.opt is held
        assert one(await client.get(run_id, 0)).value == Cfg().model_dump(mode="json")


@pytest.mark.anyio
async def test_rejections_come_back_as_the_same_errors(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    async with await Client.connect(nats_url) as client:
        with pytest.raises(ValidationRejected) as info:
            await client.patch(run_id, 0, {"epochs": 5, "opt": {"lr": -1}})
        assert info.value.errors[0]["type"] == "greater_than"
        assert info.value.errors[0]["loc"] == ["opt", "lr"]
        with pytest.raises(ValidationRejected) as info:
            await client.patch(run_id, 0, {"opt": {"bogus": 1}})
        assert info.value.errors[0]["type"] == "extra_forbidden"
        with pytest.raises(BadPath) as bad_path:
            await client.set(run_id, 0, "opt.nope", 1)
        assert "nope" in str(bad_path.value)
        assert ctl.state.model_dump() == Cfg().model_dump()
        assert ctl.version == 0


@pytest.mark.anyio
async def test_stop_schema_ping(ctl: Control[Cfg], nats_url: str, run_id: str) -> None:
    reasons: list[str] = []
    ctl.on_stop(reasons.append)
    async with await Client.connect(nats_url) as client:
        pong = one(await client.ping(run_id, 0))
        assert pong.value["pid"] == ctl.agent.pid and pong.value["host"] == ctl.agent.host

        schema = await client.schema(run_id, 0)
        assert schema == Cfg.model_json_schema()
        fresh_schema = one(await client.send(run_id, 0, m.Schema()))
        assert fresh_schema.value == Cfg.model_json_schema()

        assert not ctl.stop_requested
        res = one(await client.stop(run_id, 0, reason="enough"))
        assert res.value["stop_requested"] is True
        assert ctl.stop_requested and ctl.stop_reason == "enough"
        assert reasons == ["enough"]
        # the registry hears of it just after the reply (off a broadcast's reply path)
        for _ in range(250):  # up to 5 s: polling the registry, which has no event to await
            if (await client.rank(run_id, 0)).record.stop_requested:
                break
            await anyio.sleep(0.02)
        assert (await client.rank(run_id, 0)).record.stop_requested is True


# --- failures ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unknown_run_or_rank_is_not_found_not_a_timeout(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    # A long timeout: if no-responders were not detected, these would be Timeouts.
    async with await Client.connect(nats_url, timeout=10) as client:
        nowhere = run_id + "-nope"
        for call in (
            lambda: client.get(nowhere, 0),
            lambda: client.get(nowhere, 0, fresh=True),
            lambda: client.get(nowhere, "all"),
            lambda: client.set(nowhere, 0, "epochs", 1),
            lambda: client.ping(nowhere, "all"),
            lambda: client.get(run_id, 7),  # a run that exists, a rank that does not
            lambda: client.get(run_id, 7, fresh=True),
            lambda: client.patch(run_id, 7, {"epochs": 1}),
            lambda: client.ranks(nowhere),
        ):
            with pytest.raises(NotFound) as info:
                await call()
            # it names what is not there (a timeout would name nothing, and come as 504)
            assert info.value.run in {nowhere, run_id}, info.value
            assert info.value.rank in {None, "0", "7"} and info.value.http_status == 404


@pytest.mark.anyio
async def test_a_silent_rank_is_a_timeout_naming_it(nats_url: str, run_id: str) -> None:
    nc = await nats.connect(nats_url)
    heard: list[str] = []

    async def never_answer(msg: Any) -> None:
        heard.append(msg.subject)

    await nc.subscribe(f"runctl.{run_id}.5.cmd.*", cb=never_answer)
    await nc.flush()
    await register_silent_rank(nats_url, run_id, "5")
    try:
        async with await Client.connect(nats_url, timeout=0.3) as client:
            with pytest.raises(Timeout) as info:
                await client.get(run_id, 5, fresh=True)
            assert info.value.missing == ["5"]
            assert "'5'" in str(info.value) and run_id in str(info.value)
            with pytest.raises(Timeout):
                await client.set(run_id, 5, "x", 1)
        assert heard == [command_subject(run_id, 5, "get"), command_subject(run_id, 5, "set")]
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_command_over_one_mib_is_refused_before_sending(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    seen: list[bytes] = []
    arrived = anyio.Event()

    async def tap(msg: Any) -> None:
        seen.append(msg.data)
        arrived.set()

    await nc.subscribe(f"runctl.{run_id}.>", cb=tap)
    await nc.flush()
    try:
        async with await Client.connect(nats_url) as client:
            with pytest.raises(PayloadTooLarge) as info:
                await client.set(run_id, 0, "tags", {"k": "x" * (1 << 20)})
            assert info.value.limit == 1 << 20 and info.value.size > 1 << 20
            assert len(str(info.value)) < 200
            await client.ping(run_id, 0)  # something that does go out, as a marker
        await nc.flush()
        with anyio.fail_after(5):
            await arrived.wait()
        assert all(len(data) < 1000 for data in seen)
        assert ctl.version == 0
    finally:
        await nc.close()


BAD_NAMES: list[tuple[Any, Any]] = [
    ("a.b", 0),
    ("exp1", "*"),
    ("exp1", ">"),
    ("", 0),
    ("exp1", "a b"),
    ("r\u00e9", 0),
    ("x" * 10_240, 0),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("run", "rank"), BAD_NAMES)
async def test_bad_tokens_raise_before_anything_is_sent(nats_url: str, run: Any, rank: Any) -> None:
    """On a closed connection: anything that tried to send would fail differently."""
    client = await Client.connect(nats_url)
    await client.close()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.get(run, rank, fresh=True),
        lambda: client.set(run, rank, "x", 1),
        lambda: client.patch(run, rank, {"x": 1}),
        lambda: client.reset(run, rank),
        lambda: client.stop(run, rank),
        lambda: client.ping(run, rank),
        lambda: client.send(run, rank, m.Schema()),
        lambda: client.get(run, rank),
        lambda: client.schema(run, rank),
        lambda: client.ranks(run) if rank == 0 else client.rank(run, rank),
    ]
    for call in calls:
        with pytest.raises(BadToken) as info:
            await call()
        assert info.value.value in (run, rank)


# --- broadcast (in-process ranks; separate processes in test_agent_processes) -----------


@pytest.mark.anyio
async def test_broadcast_to_in_process_ranks(nats_url: str, run_id: str) -> None:
    states = [Cfg(), Cfg()]
    with two_ranks(states, nats_url, run_id):
        async with await Client.connect(nats_url) as client:
            res = gathered(await client.patch(run_id, "all", {"opt": {"lr": 0.3}}))
            assert res.acknowledged == ["0", "1"] and not res.missing and not res.errors
            assert [s.opt.lr for s in states] == [0.3, 0.3]
            report = res.to_json()
            assert report["ranks"]["1"]["outcome"] == "applied"
            assert report["ranks"]["0"]["changed"] is True
            json.dumps(report)  # JSON-ready as promised

            bad = gathered(await client.set(run_id, "all", "opt.kind", "nope"))
            assert set(bad.errors) == {"0", "1"} and not bad.results
            assert all(isinstance(e, ValidationRejected) for e in bad.errors.values())
            assert bad.to_json()["ranks"]["0"]["outcome"] == "rejected"
            assert bad.to_json()["ranks"]["0"]["detail"][0]["type"] == "literal_error"
            assert [s.opt.kind for s in states] == ["sgd", "sgd"]

            cached = gathered(await client.get(run_id, "all", "opt.lr"))
            assert {r: x.value for r, x in cached.results.items()} == {"0": 0.3, "1": 0.3}
            assert cached.to_json()["ranks"]["0"]["status"] == "alive"


@pytest.mark.anyio
async def test_concurrent_broadcasts_on_one_client_each_get_their_own_replies(
    nats_url: str, run_id: str
) -> None:
    """Broadcasts share the client's one reply subscription: each still gathers exactly
    its own replies, every rank's, while others are in flight."""
    with two_ranks([Cfg(epochs=3), Cfg(epochs=3)], nats_url, run_id):
        async with await Client.connect(nats_url) as client:
            answers: dict[int, Gathered] = {}

            async def ask(i: int) -> None:
                path = "epochs" if i % 2 else "opt.lr"
                answers[i] = gathered(await client.get(run_id, "all", path, fresh=True))

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tasks:
                    for i in range(24):
                        tasks.start_soon(ask, i)
            for i, res in answers.items():
                assert res.acknowledged == ["0", "1"] and not res.missing, (i, res)
                want = 3 if i % 2 else 0.1
                assert {x.value for x in res.results.values()} == {want}, (i, res)
            assert len(answers) == 24


# --- no bus ---------------------------------------------------------------------------------


@pytest.fixture
def mute_port() -> Iterator[int]:
    """A TCP port that accepts connections and never speaks NATS."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield srv.getsockname()[1]  # the kernel completes handshakes from the backlog
    srv.close()


@pytest.mark.anyio
async def test_connecting_to_nothing_or_to_a_mute_port_is_unavailable(mute_port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(Unavailable) as refused:
            await Client.connect(f"nats://127.0.0.1:{closed_port}")
        assert str(closed_port) in str(refused.value)
    with pytest.raises(Unavailable) as mute:
        await Client.connect(f"nats://127.0.0.1:{mute_port}", connect_timeout=0.3)
    assert str(mute_port) in str(mute.value)
    gc.collect()  # the half-open connection was closed, not left to the garbage collector


@pytest.mark.anyio
async def test_a_broadcast_counts_a_stale_rank_that_answers_and_names_a_silent_one(
    nats_url: str, run_id: str
) -> None:
    """Three ranks in the registry: 0 alive, answering at once; 1 stale (its heartbeat 10 s
    old, as when a loaded machine kept its agent from beating) but answering 50 ms later;
    2 stale and silent (killed). The answer counts 1 as acknowledged and names 2 stale,
    not missing: a dead rank does not make every broadcast to its run a partial one."""
    for rank, age in (("0", 0.0), ("1", 10.0), ("2", 10.0)):
        await register_rank(nats_url, run_id, rank, heartbeat_age=age, heartbeat_interval=1.0)
    nc = await nats.connect(nats_url)

    def answering(rank: str, delay: float) -> Callable[[Any], Awaitable[None]]:
        async def on_ping(msg: Any) -> None:
            await anyio.sleep(delay)
            await msg.respond(m.encode(m.Ok(run=run_id, rank=rank, version=0)))

        return on_ping

    subject = command_subject(run_id, "all", "ping")
    subs = [
        await nc.subscribe(subject, cb=answering("0", 0.0)),
        await nc.subscribe(subject, cb=answering("1", 0.05)),
    ]
    await nc.flush()
    try:
        async with await Client.connect(nats_url) as client:
            res = await client.ping(run_id, "all")
        assert isinstance(res, Gathered)
        assert res.acknowledged == ["0", "1"] and res.missing == [] and res.stale == ["2"]
        body = res.to_json()
        assert body["stale"] == ["2"]
        assert body["ranks"]["2"] == {"outcome": "no_answer", "status": "stale"}
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await nc.close()
