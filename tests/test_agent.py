"""The agent in this process, observed from outside with a raw NATS client: state messages,
events, the registry, the lock, stop callbacks, malformed commands and the async API."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel, Field, field_validator

from runctl.agent import Agent, Control, control
from runctl.agent.state import LiveState
from runctl.bus import Client, Gathered, NotFound, Result, ValidationRejected
from runctl.bus import messages as m
from runctl.bus.subjects import command_subject, event_subject, events_wildcard, state_subject


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)


class Cfg(BaseModel):
    x: int = 0
    opt: Opt = Opt()

    @field_validator("x")
    @classmethod
    def _buggy(cls, v: int) -> int:
        if v == 666:
            raise ZeroDivisionError("a bug in the user's validator")
        return v


@pytest.fixture
def ctl(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=0.2) as handle:
        handle.wait_ready()
        yield handle


class Tap:
    """Collects what a raw NATS subscription receives, decoded."""

    def __init__(self, nc: NATS, decode: Any) -> None:
        self.nc = nc
        self.decode = decode
        self.items: list[Any] = []

    async def start(self, subject: str) -> Tap:
        async def cb(msg: Any) -> None:
            self.items.append(self.decode(msg.data))

        await self.nc.subscribe(subject, cb=cb)
        await self.nc.flush()
        return self

    async def wait(self, predicate: Any, timeout: float = 10) -> Any:
        with anyio.fail_after(timeout):
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                await anyio.sleep(0.01)


async def request(nc: NATS, subject: str, payload: bytes) -> m.Reply:
    return m.decode_reply((await nc.request(subject, payload, timeout=5)).data)


# --- published state ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_state_is_published_after_every_change_and_on_heartbeat(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        states = await Tap(nc, m.decode_state).start(state_subject(run_id, 0))
        beat = await states.wait(lambda s: s.cause == "heartbeat")
        assert beat.run == run_id and beat.rank == "0" and beat.state == Cfg().model_dump()
        async with await Client.connect(nats_url) as client:
            await client.set(run_id, 0, "x", 1)
            await client.patch(run_id, 0, {"opt": {"lr": 0.5}})
            await client.reset(run_id, 0)
        after_set = await states.wait(lambda s: s.cause == "set")
        assert after_set.version == 1 and after_set.state["x"] == 1
        after_patch = await states.wait(lambda s: s.cause == "patch")
        assert after_patch.version == 2 and after_patch.state["opt"]["lr"] == 0.5
        after_reset = await states.wait(lambda s: s.cause == "reset")
        assert after_reset.version == 3 and after_reset.state == Cfg().model_dump()
        later = len(states.items)
        await states.wait(lambda s: s.cause == "heartbeat" and states.items.index(s) >= later)
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_change_the_program_makes_itself_reaches_the_registry(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        events = await Tap(nc, m.decode_event).start(event_subject(run_id, 0, "changed"))
        async with await Client.connect(nats_url) as client:
            ctl.state.x = 5  # plain assignment in the program's thread
            with anyio.fail_after(10):
                while True:
                    if one(await client.get(run_id, 0, "x")).value == 5:
                        break
                    await anyio.sleep(0.05)
            event = await events.wait(lambda e: True)
            assert event.kind == "changed" and event.version == ctl.version == 1
            assert (await client.rank(run_id, 0)).record.version == 1
    finally:
        await nc.close()


def one(result: Any) -> Result:
    assert isinstance(result, Result)
    return result


# --- events ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_events_for_the_whole_life_of_a_rank(nats_url: str, run_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        events = await Tap(nc, m.decode_event).start(events_wildcard(run_id))
        with control(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=30) as ctl:
            ctl.wait_ready()
            async with await Client.connect(nats_url) as client:
                await client.set(run_id, 0, "x", 1)
                await client.patch(run_id, 0, {"x": 2})
                await client.set(run_id, 0, "x", 2)  # no change: no event
                with pytest.raises(ValidationRejected):
                    await client.set(run_id, 0, "opt.lr", -1)
                await client.reset(run_id, 0)
                await client.stop(run_id, 0, reason="done")
        await events.wait(lambda e: e.kind == "exited")
        kinds = [e.kind for e in events.items]
        assert kinds == ["started", "set", "patch", "rejected", "reset", "stop_requested", "exited"]
        by_kind = {e.kind: e for e in events.items}
        started = by_kind["started"].data
        assert started["pid"] == ctl.agent.pid and started["model"] == "Cfg"
        assert [by_kind[k].version for k in ("set", "patch", "reset")] == [1, 2, 3]
        assert by_kind["rejected"].data["verb"] == "set"
        assert by_kind["stop_requested"].data["reason"] == "done"
        assert by_kind["exited"].data["reason"] == "done"
        assert all(e.run == run_id and e.rank == "0" for e in events.items)
    finally:
        await nc.close()


# --- raw protocol ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_any_nats_client_can_talk_to_an_agent(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        reply = await request(nc, command_subject(run_id, 0, "get"), b"")  # nats req ... ''
        assert isinstance(reply, m.Ok) and reply.value == Cfg().model_dump()
        reply = await request(
            nc, command_subject(run_id, 0, "set"), b'{"t":"set/1","path":"opt.lr","value":0.01}'
        )
        assert isinstance(reply, m.Ok) and reply.changed and ctl.state.opt.lr == 0.01
        reply = await request(
            nc, command_subject(run_id, 0, "get"), b'{"t":"get/1","path":"opt.lr"}'
        )
        assert isinstance(reply, m.Ok) and reply.value == 0.01
    finally:
        await nc.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("verb", "payload"),
    [
        ("set", b"{not json"),
        ("set", b""),  # set has required fields
        ("get", m.encode(m.Set(path="x", value=1))),  # tag does not match the subject
        ("patch", b'{"t":"patch/1","value":[1,2]}'),
        ("get", b'{"t":"get/9"}'),
    ],
)
async def test_malformed_commands_get_bad_request_and_change_nothing(
    ctl: Control[Cfg], nats_url: str, run_id: str, verb: str, payload: bytes
) -> None:
    nc = await nats.connect(nats_url)
    try:
        reply = await request(nc, command_subject(run_id, 0, verb), payload)
        assert isinstance(reply, m.Err) and reply.code == "bad_request"
        assert verb in reply.message
        assert (reply.run, reply.rank) == (run_id, "0")
        assert ctl.version == 0 and ctl.state == Cfg()
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_buggy_validator_is_an_internal_error_and_the_program_keeps_going(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        reply = await request(
            nc, command_subject(run_id, 0, "set"), m.encode(m.Set(path="x", value=666))
        )
        assert isinstance(reply, m.Err) and reply.code == "internal"
        assert "ZeroDivisionError" in reply.message
        assert ctl.state.x == 0 and ctl.version == 0
        reply = await request(
            nc, command_subject(run_id, 0, "set"), m.encode(m.Set(path="x", value=7))
        )
        assert isinstance(reply, m.Ok) and ctl.state.x == 7
    finally:
        await nc.close()


# --- the program's side: lock, stop callbacks ---------------------------------------------


@pytest.mark.anyio
async def test_a_change_waits_while_the_program_holds_the_lock(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    held, release = threading.Event(), threading.Event()
    seen_inside: list[int] = []

    def program() -> None:
        with ctl.lock:  # as documented: read several fields consistently
            held.set()
            release.wait(10)
            seen_inside.append(ctl.state.x)

    worker = threading.Thread(target=program)
    worker.start()
    assert await anyio.to_thread.run_sync(held.wait, 5)
    results: list[Result] = []
    async with await Client.connect(nats_url, timeout=10) as client:

        async def change() -> None:
            results.append(one(await client.set(run_id, 0, "x", 9)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(change)
            await anyio.sleep(0.3)  # long enough for the command to reach the agent
            assert ctl.state.x == 0 and not results  # blocked behind the lock
            release.set()
        await anyio.to_thread.run_sync(worker.join, 5)
    assert seen_inside == [0]  # the holder never saw a half-applied change
    assert ctl.state.x == 9 and results[0].changed and results[0].version == 1


@pytest.mark.anyio
async def test_on_stop_callbacks_fire_once_with_the_reason(nats_url: str, run_id: str) -> None:
    calls: list[tuple[str, str]] = []

    def broken(reason: str) -> None:
        raise RuntimeError("a broken callback does not stop the others")

    with control(
        Cfg(), run=run_id, rank=0, url=nats_url, on_stop=lambda r: calls.append(("ctor", r))
    ) as ctl:
        ctl.on_stop(broken)

        @ctl.on_stop
        def decorated(reason: str) -> None:
            calls.append(("decorated", reason))

        ctl.wait_ready()
        async with await Client.connect(nats_url) as client:
            await client.stop(run_id, 0, reason="lr exploded")
            assert calls == [("ctor", "lr exploded"), ("decorated", "lr exploded")]
            await client.stop(run_id, 0, reason="again")
            assert len(calls) == 2  # a repeated stop does not run them again
        assert ctl.stop_requested and ctl.stop_reason == "again"


# --- async programs -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_async_agent_context_manager(nats_url: str, run_id: str) -> None:
    state = Cfg()
    async with Agent(state, run=run_id, rank=2, url=nats_url, heartbeat=0.2) as agent:
        assert agent.ready.is_set()
        async with await Client.connect(nats_url) as client:
            res = one(await client.patch(run_id, 2, {"opt": {"lr": 0.7}}))
            assert res.changed and state.opt.lr == 0.7 and agent.version == 1
            assert (await client.rank(run_id, 2)).liveness == "alive"
    assert agent.closed.is_set()
    async with await Client.connect(nats_url) as client:
        info = await client.rank(run_id, 2)
        assert info.liveness == "exited" and info.record.state["opt"]["lr"] == 0.7


@pytest.mark.anyio
async def test_close_marks_the_rank_exited(nats_url: str, run_id: str) -> None:
    ctl = control(Cfg(), run=run_id, rank=0, url=nats_url).wait_ready()
    ctl.close()
    ctl.close()  # idempotent
    assert ctl.agent.closed.is_set()
    async with await Client.connect(nats_url) as client:
        assert (await client.rank(run_id, 0)).liveness == "exited"
        with pytest.raises(NotFound):
            await client.ping(run_id, 0)


@pytest.mark.anyio
async def test_agents_can_share_the_callers_connection(nats_url: str, run_id: str) -> None:
    from runctl.bus.connection import connect

    nc = await connect(nats_url, name="shared-agents", role="agent")
    try:
        first, second = Cfg(), Cfg()
        async with await Client.connect(nats_url) as client:
            async with Agent(first, run=run_id, rank=0, connection=nc, heartbeat=0.2) as zero:
                async with Agent(second, run=run_id, rank=1, connection=nc, heartbeat=0.2):
                    assert zero.nc is nc
                    changed = await client.set(run_id, "all", "x", 5)
                    assert isinstance(changed, Gathered)
                    assert sorted(changed.results) == ["0", "1"] and not changed.missing
                    assert first.x == 5 and second.x == 5
                    assert one(await client.get(run_id, 1, "x")).value == 5
                # the second agent ended: its rank exited, the connection stays open for
                # the first agent (and the caller)
                assert not nc.is_closed
                assert (await client.rank(run_id, 1)).liveness == "exited"
                assert one(await client.set(run_id, 0, "x", 6)).changed and first.x == 6
                with pytest.raises(NotFound):
                    await client.ping(run_id, 1)
            assert not nc.is_closed and nc.is_connected
            assert (await client.rank(run_id, 0)).liveness == "exited"
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_heartbeat_serialises_the_state_once(
    nats_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dumps = 0
    dump_json = LiveState.dump_json

    def counted(self: LiveState[Any]) -> bytes:
        nonlocal dumps
        dumps += 1
        return dump_json(self)

    monkeypatch.setattr(LiveState, "dump_json", counted)
    async with Agent(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=0.1):
        nc = await nats.connect(nats_url)
        try:
            states = await Tap(nc, m.decode_state).start(state_subject(run_id, 0))
            await states.wait(lambda s: s.cause == "heartbeat")
            beats_before, dumps_before = len(states.items), dumps
            await states.wait(lambda s: states.items.index(s) >= beats_before + 4)
            beats, dumped = len(states.items) - beats_before, dumps - dumps_before
        finally:
            await nc.close()
    # one serialisation per beat (two before: one to compare, one to publish); a beat may be
    # under way as the count is taken
    assert all(s.cause == "heartbeat" for s in states.items)
    assert dumped <= beats + 1, (dumped, beats)


@pytest.mark.anyio
async def test_a_heartbeat_record_asks_for_no_acknowledgement(nats_url: str, run_id: str) -> None:
    """The server would answer an ack to every beat, waking the rank a second time per beat;
    a write somebody waits for (here a set's) still asks for one."""
    from runctl.bus.registry import KEY_PREFIX

    writes: list[tuple[str, m.RankRecord]] = []
    four_beats, acked_set = anyio.Event(), anyio.Event()

    async def on_write(msg: Any) -> None:
        record = m.decode_record(msg.data)
        writes.append((msg.reply, record))
        if sum(not reply for reply, _ in writes) >= 4:
            four_beats.set()
        if record.version >= 1 and msg.reply:
            acked_set.set()

    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(f"{KEY_PREFIX}{run_id}.0", cb=on_write)
        await nc.flush()
        async with Agent(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=0.1):
            with anyio.fail_after(10):
                await four_beats.wait()
            async with await Client.connect(nats_url) as client:
                await client.set(run_id, 0, "x", 5)
            with anyio.fail_after(10):
                await acked_set.wait()
    finally:
        await nc.close()
    beats = [record for reply, record in writes if not reply]
    assert len(beats) >= 4 and all(b.status == "running" for b in beats)
