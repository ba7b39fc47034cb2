"""A write's stores acknowledged straight to the writer (bus/acks.py): the rank sends its
registry and journal records with the writer's inbox as reply subject and says how many in
its reply; the writer waits for those instead of reading the registry and the journal.
Read-your-writes and the journal guarantee hold either way; a header that is not a plain
inbox is ignored; a rank that sends no acknowledgements is read back as before."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import nats
import pytest
from conftest import wait_for
from nats.aio.msg import Msg
from pydantic import BaseModel

import runctl.agent.agent as agent_module
import runctl.bus.client as client_module
from runctl.agent import Control, control
from runctl.bus import Client, Gathered, Result
from runctl.bus import messages as m
from runctl.bus.acks import ACK_TO, Acks, ack_to_of
from runctl.bus.subjects import command_subject


class Cfg(BaseModel):
    x: int = 0


@pytest.fixture
def ctl(nats_url: str, run_id: str) -> Iterator[Control[Cfg]]:
    with control(Cfg(), run=run_id, rank=0, url=nats_url, heartbeat=0.2) as handle:
        handle.wait_ready()
        yield handle


class Reads:
    """Counts the writer's registry and journal reads (the real ones run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        caught_up, confirm = client_module.caught_up, client_module.confirm  # type: ignore[attr-defined]

        async def counted_caught_up(*args: Any, **kwargs: Any) -> int:
            self.calls.append("registry")
            return await caught_up(*args, **kwargs)

        async def counted_confirm(*args: Any, **kwargs: Any) -> set[str]:
            self.calls.append("journal")
            return await confirm(*args, **kwargs)

        monkeypatch.setattr(client_module, "caught_up", counted_caught_up)
        monkeypatch.setattr(client_module, "confirm", counted_confirm)


def _msg(headers: dict[str, str] | None) -> Msg:
    return Msg(_client=None, subject="runctl.r.0.cmd.set", reply="_INBOX.x", headers=headers)  # type: ignore[arg-type]


def test_only_a_plain_inbox_is_taken_as_where_acks_go() -> None:
    assert ack_to_of(_msg({ACK_TO: "_INBOX.abc.7"})) == "_INBOX.abc.7"
    for bad in ("runctl.r.0.cmd.stop", "_INBOX.>", "_INBOX.*", "_INBOX.a b", "_INBOX..a", "x"):
        assert ack_to_of(_msg({ACK_TO: bad})) == "", bad
    assert ack_to_of(_msg(None)) == ""


@pytest.mark.anyio
async def test_acks_are_counted_per_stream_and_a_refusal_ends_the_wait() -> None:
    acks = Acks("_INBOX.t.1")
    acks.add(b'{"stream":"KV_RUNCTL_RANKS","seq":4}')
    acks.add(b'{"stream":"RUNCTL_JOURNAL","seq":9,"duplicate":true}')
    with anyio.fail_after(5):
        assert await acks.wait({"KV_RUNCTL_RANKS": 1, "RUNCTL_JOURNAL": 1})
    acks.add(b'{"error":{"code":503,"description":"no space"}}')
    with anyio.fail_after(5):
        assert not await acks.wait({"KV_RUNCTL_RANKS": 2})


@pytest.mark.anyio
async def test_a_set_waits_for_its_acks_and_reads_nothing_back(
    ctl: Control[Cfg], nats_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Reads(monkeypatch)
    async with await Client.connect(nats_url) as client:
        for value in range(1, 21):
            res = await client.set(run_id, 0, "x", value)
            assert isinstance(res, Result)
            assert res.acks == 2 and res.journaled is True  # registry record + journal record
            record = await (await client.registry()).get(run_id, "0")
            assert record is not None and record.version >= res.version  # read-your-writes
        history = await client.history(run_id)
        assert len([e for e in history if e.verb == "set"]) == 20
    assert reads.calls == []


@pytest.mark.anyio
async def test_a_set_to_every_rank_is_one_wait_for_all_their_acks(
    nats_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = [control(Cfg(), run=run_id, rank=r, url=nats_url, heartbeat=0.2) for r in range(3)]
    try:
        for handle in handles:
            handle.wait_ready()
        reads = Reads(monkeypatch)
        seen: dict[str, bool] = {}  # verb -> whether the broadcast asked for acks
        both = anyio.Event()

        async def observe(msg: Msg) -> None:
            seen[msg.subject.rsplit(".", 1)[-1]] = ACK_TO in (msg.headers or {})
            if len(seen) == 2:
                both.set()

        observer = await nats.connect(nats_url)
        await observer.subscribe(f"runctl.{run_id}.all.cmd.*", cb=observe)
        await observer.flush()
        async with await Client.connect(nats_url) as client:
            gathered = await client.set(run_id, "all", "x", 5)
            assert isinstance(gathered, Gathered)
            assert sorted(gathered.results) == ["0", "1", "2"]
            assert all(r.acks == 2 and r.journaled for r in gathered.results.values())
            versions = {r.rank: r.version for r in await (await client.registry()).records(run_id)}
            assert all(versions[k] >= r.version for k, r in gathered.results.items())
            stopped = await client.stop(run_id, "all", reason="done")
            assert isinstance(stopped, Gathered)
            # a stop to every rank is one record, the writer's: no rank's ack to wait for
            assert all(r.acks == 0 and r.journaled for r in stopped.results.values())
            one_rank = await client.stop(run_id, 2, reason="again")
            assert isinstance(one_rank, Result) and one_rank.acks == 1 and one_rank.journaled
        assert reads.calls == []
        with anyio.fail_after(5):
            await both.wait()
        await observer.close()
        # the ranks store nothing for a run-wide stop: none of them parses the header
        assert seen == {"set": True, "stop": False}
    finally:
        for handle in handles:
            handle.close()


@pytest.mark.anyio
async def test_a_rank_that_sends_no_acks_is_read_back_as_before(
    ctl: Control[Cfg], nats_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "ack_to_of", lambda msg: "")  # an older rank
    reads = Reads(monkeypatch)
    async with await Client.connect(nats_url) as client:
        res = await client.set(run_id, 0, "x", 3)
        assert isinstance(res, Result) and res.acks == 0 and res.journaled is True
        record = await (await client.registry()).get(run_id, "0")
        assert record is not None and record.version >= res.version
    assert sorted(reads.calls) == ["journal", "registry"]


@pytest.mark.anyio
async def test_a_header_naming_another_subject_is_ignored(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        seen: list[bytes] = []

        async def spy(msg: Msg) -> None:
            seen.append(msg.data)

        await nc.subscribe(command_subject(run_id, 0, "stop"), cb=spy)
        cmd = m.encode(m.Set(path="x", value=9))
        headers = {ACK_TO: command_subject(run_id, 0, "stop")}
        reply = m.decode_reply(
            (await nc.request(command_subject(run_id, 0, "set"), cmd, 5, headers=headers)).data
        )
        assert isinstance(reply, m.Ok) and reply.acks == 0 and reply.changed
        await nc.flush()
        await anyio.sleep(0.2)
        assert seen == []  # no acknowledgement was sent to the stop subject
        assert not ctl.stop_requested
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_records_acknowledged_to_the_writer_are_confirmed_by_the_rank_too(
    ctl: Control[Cfg], nats_url: str, run_id: str
) -> None:
    """The rank sends such a record once more (a duplicate the server drops) and awaits
    that ack itself: nothing is left to confirm or re-send afterwards, nothing stored twice."""
    async with await Client.connect(nats_url) as client:
        for value in (1, 2, 3):
            await client.set(run_id, 0, "x", value)
        journal = ctl.agent.journal

        def confirmed() -> bool:
            running = journal._confirmer is not None and not journal._confirmer.done()
            return not journal._confirm and not running

        await anyio.to_thread.run_sync(wait_for, confirmed)
        assert journal.unsent == 0
        sets = [e for e in await client.history(run_id) if e.verb == "set"]
        assert len(sets) == 3
