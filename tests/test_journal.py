"""The change journal with in-process agents on a real nats-server: what a record holds,
history and its filters, undo, schedules, replay (order, resets, skips, opt-outs, ranks that
join later). The same with real rank processes and kill -9: test_journal_processes.py."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import nats
import pytest
from conftest import register_silent_rank
from nats.js import api
from pydantic import BaseModel, Field

from runctl.agent import Agent
from runctl.bus import Client, Gathered
from runctl.bus import messages as m
from runctl.bus.errors import BadRequest, Conflict, Timeout, TooLate
from runctl.bus.journalstore import read_journal, stream_config
from runctl.bus.server import NatsServer
from runctl.bus.subjects import journal_filter

pytestmark = pytest.mark.anyio


class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    momentum: float = 0.9


class Cfg(BaseModel):
    epochs: int = 3
    opt: Opt = Opt()
    tags: dict[str, int] = {}


class Renamed(BaseModel):
    """The next version of the program's code: ``epochs`` became ``max_epochs``."""

    max_epochs: int = 3
    opt: Opt = Opt()
    tags: dict[str, int] = {}


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Client]:
    async with await Client.connect(nats_url, by="alice@test") as c:
        yield c


def agent(url: str, run: str, rank: int, state: BaseModel | None = None, **kw: Any) -> Agent[Any]:
    return Agent(state if state is not None else Cfg(), run=run, rank=rank, url=url, **kw)


async def records(url: str, run: str) -> list[Any]:
    nc = await nats.connect(url)
    try:
        return [rec for _, rec in await read_journal(nc, run)]
    finally:
        await nc.close()


async def test_a_record_says_who_what_when_and_what_it_did(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0) as a:
        a.sync(7)
        res = await client.set(run_id, 0, "opt.lr", 0.5)
        assert res.journaled is True and res.change_id
        with pytest.raises(Exception, match="validation"):
            await client.set(run_id, 0, "opt.lr", -1)
    applied, rejected = await records(nats_url, run_id)
    assert applied.id == res.change_id and applied.verb == "set" and applied.target == "0"
    assert applied.by.name == "alice@test" and applied.by.via == "python"
    assert applied.request == {"t": "set/1", "path": "opt.lr", "value": 0.5}
    assert applied.step == 7 and (applied.version_before, applied.version_after) == (0, 1)
    assert [(c.path, c.before, c.after) for c in applied.diff] == [("opt.lr", 0.1, 0.5)]
    assert rejected.outcome == "rejected" and rejected.error == "validation"
    assert rejected.errors[0]["type"] == "greater_than" and rejected.errors[0]["loc"] == [
        "opt",
        "lr",
    ]


async def test_a_bare_nats_request_is_journaled_as_such(nats_url: str, run_id: str) -> None:
    async with agent(nats_url, run_id, 0):
        nc = await nats.connect(nats_url)
        sub = await nc.subscribe(journal_filter(run_id))  # `nats sub` shows the journal
        reply = m.decode_reply(
            (
                await nc.request(
                    f"runctl.{run_id}.0.cmd.patch", b'{"t":"patch/1","value":{"epochs":5}}'
                )
            ).data
        )
        seen = await sub.next_msg(timeout=2)
        await nc.close()
    assert isinstance(reply, m.Ok) and reply.journaled and reply.change_id
    assert seen.subject == f"runctl.{run_id}.0.journal.{reply.change_id}"
    record = msgspec.json.decode(seen.data)
    assert record["by"] == {"via": "nats"} and record["diff"] == [
        {"path": "epochs", "before": 3, "after": 5}
    ]


async def test_a_run_wide_stop_is_one_record_naming_the_ranks_that_acknowledged(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0), agent(nats_url, run_id, 1):
        stopped = await client.stop(run_id, "all", "enough", mode="graceful")
        assert isinstance(stopped, Gathered) and sorted(stopped.results) == ["0", "1"]
        assert all(r.journaled is True for r in stopped.results.values())
        one_rank = await client.stop(run_id, 1, "again")  # one rank: its own record
        await anyio.sleep(0.3)  # a rank's record of its own would be on its way by now
    written = [rec for rec in await records(nats_url, run_id) if rec.verb == "stop"]
    run_wide = [rec for rec in written if rec.id == stopped.change_id]
    assert len(run_wide) == 1, "the ranks wrote no record of the run-wide stop"
    (record,) = run_wide
    assert (record.rank, record.target, record.acknowledged) == ("all", "all", ["0", "1"])
    assert record.by.name == "alice@test" and record.outcome == "applied"
    assert record.request["t"] == "stop/1" and record.request["reason"] == "enough"
    assert "journaled_by_writer" not in record.request  # how it travelled, not what it asked
    assert [rec.rank for rec in written if rec.id == one_rank.change_id] == ["1"]
    # the history shows it as each rank's outcome, and under each rank's filter
    (entry,) = [e for e in await client.history(run_id) if e.id == stopped.change_id]
    assert sorted(entry.ranks) == ["0", "1"] and entry.status == "applied"
    assert [e.id for e in await client.history(run_id, rank="0")] == [stopped.change_id]


async def test_a_run_wide_stop_nobody_answered_in_time_is_journaled_as_such(
    nats_url: str, run_id: str
) -> None:
    await register_silent_rank(nats_url, run_id, "0")  # registered, never answers
    silent = await nats.connect(nats_url)  # receives the broadcast (a frozen agent's part)
    try:
        await silent.subscribe(f"runctl.{run_id}.all.cmd.>")
        await silent.flush()
        async with await Client.connect(nats_url, by="bob@test", timeout=0.3) as client:
            with pytest.raises(Timeout):
                await client.stop(run_id, "all", "stuck")
    finally:
        await silent.close()
    (record,) = [rec for rec in await records(nats_url, run_id) if rec.verb == "stop"]
    assert (record.rank, record.outcome, record.acknowledged) == ("all", "unanswered", [])
    assert record.by.name == "bob@test"


async def test_a_stop_to_one_rank_is_journaled_by_the_rank_whatever_it_says(
    nats_url: str, run_id: str
) -> None:
    async with agent(nats_url, run_id, 0):
        nc = await nats.connect(nats_url)
        try:
            stop = m.Stop(reason="x", change_id="c" * 32, journaled_by_writer=True)
            await nc.request(f"runctl.{run_id}.0.cmd.stop", m.encode(stop), timeout=5)
        finally:
            await nc.close()
        await anyio.sleep(0.3)
    assert [(rec.rank, rec.id) for rec in await records(nats_url, run_id)] == [("0", "c" * 32)]


async def test_history_newest_first_with_filters(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0), agent(nats_url, run_id, 1):
        first = await client.set(run_id, "all", "opt.lr", 0.2)
        middle = time.time()
        second = await client.set(run_id, 1, "epochs", 9)
        third = await client.patch(run_id, 0, {"opt": {"momentum": 0.5}})
        history = await client.history(run_id)
        assert [e.id for e in history] == [third.change_id, second.change_id, first.change_id]
        entry = history[-1].to_json()
        assert entry["target"] == "all" and entry["status"] == "applied"
        assert entry["by"]["name"] == "alice@test"
        assert set(entry["ranks"]) == {"0", "1"}
        assert entry["ranks"]["1"]["diff"] == [{"path": "opt.lr", "before": 0.1, "after": 0.2}]
        only1 = [e.id for e in await client.history(run_id, rank="1")]
        assert only1 == [second.change_id, first.change_id]
        lr = [e.id for e in await client.history(run_id, path="opt")]
        assert lr == [third.change_id, first.change_id]
        assert [e.id for e in await client.history(run_id, path="opt.momentum")] == [
            third.change_id
        ]
        later = [e.id for e in await client.history(run_id, since=middle)]
        assert later == [third.change_id, second.change_id]
        assert [e.id for e in await client.history(run_id, until=middle)] == [first.change_id]
        assert len(await client.history(run_id, limit=1)) == 1


async def test_undo_restores_exactly_the_fields_it_changed(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0) as a:
        change = await client.patch(run_id, 0, {"opt": {"lr": 0.3}, "tags": {"x": 1}})
        await client.set(run_id, 0, "epochs", 8)  # another field: the undo leaves it
        a.state.opt.momentum = 0.7  # the program's own change: left alone too
        result = await client.undo(run_id, change.change_id[:8])
        assert result.plan.values == {"0": {"opt.lr": 0.1, "tags": {}}}
        assert a.state == Cfg(epochs=8, opt=Opt(lr=0.1, momentum=0.7), tags={})
        undo = (await client.history(run_id, limit=1))[0].to_json()
        assert undo["undo_of"] == change.change_id and undo["by"]["name"] == "alice@test"
        assert undo["verb"] == "assign"
        # undoing it again is refused: it was undone already
        with pytest.raises(Conflict, match="already undone"):
            await client.undo(run_id, change.change_id)


async def test_undo_refuses_when_a_later_change_touched_the_same_field(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0) as a:
        first = await client.set(run_id, 0, "opt.lr", 0.3)
        await client.set(run_id, 0, "opt.lr", 0.4)
        with pytest.raises(Conflict, match="followed by 1 change"):
            await client.undo(run_id, first.change_id)
        assert a.state.opt.lr == 0.4
        forced = await client.undo(run_id, first.change_id, force=True)
        assert [e.id for e in forced.plan.conflicts]
        assert a.state.opt.lr == 0.1
        with pytest.raises(BadRequest, match="at least 4"):
            await client.undo(run_id, "ab")


async def test_undo_of_the_latest_walks_back(nats_url: str, run_id: str, client: Client) -> None:
    async with agent(nats_url, run_id, 0) as a:
        await client.set(run_id, 0, "opt.lr", 0.3)
        await client.set(run_id, 0, "opt.lr", 0.4)
        await client.undo(run_id)
        assert a.state.opt.lr == 0.3
        await client.undo(run_id)  # the undone pair no longer counts as "later"
        assert a.state.opt.lr == 0.1


async def test_replay_in_order_with_a_reset_and_a_rejection(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0):
        await client.set(run_id, 0, "epochs", 5)
        await client.reset(run_id, 0)
        await client.set(run_id, 0, "opt.lr", 0.2)
        with pytest.raises(Exception, match="validation"):
            await client.set(run_id, 0, "opt.lr", 0)
        await client.set(run_id, 0, "tags.a", 1)
    async with agent(nats_url, run_id, 0, Cfg(epochs=4)) as again:
        # the reset returned to *this* code's initial state (epochs=4), before lr and tags
        assert again.state == Cfg(epochs=4, opt=Opt(lr=0.2), tags={"a": 1})
        assert [c.verb for c in again.replay_report.replayed] == ["set", "reset", "set", "set"]
        assert again.replay_report.replayed[0].by == "alice@test"
        info = await client.rank(run_id, 0)
        assert info.record.replayed == 4 and info.record.replay_skipped == 0


async def test_a_change_that_no_longer_applies_is_skipped_and_reported(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0):
        gone = await client.set(run_id, 0, "epochs", 5)
        kept = await client.set(run_id, 0, "opt.lr", 0.2)
    nc = await nats.connect(nats_url)
    events = await nc.subscribe(f"runctl.{run_id}.0.evt.replay_skipped")
    async with agent(nats_url, run_id, 0, Renamed()) as again:
        assert again.state == Renamed(opt=Opt(lr=0.2))  # it started, with what still applies
        assert [c.id for c in again.replay_report.replayed] == [kept.change_id]
        (skipped,) = again.replay_report.skipped
        assert skipped.id == gone.change_id and "epochs" in skipped.reason + str(skipped.errors)
        event = m.decode_event((await events.next_msg(timeout=2)).data)
        assert event.data["change_id"] == gone.change_id
        info = await client.rank(run_id, 0)
        assert info.record.replay_skipped == 1
    await nc.close()
    (entry,) = [e for e in await client.history(run_id) if e.id == gone.change_id]
    assert entry.to_json()["replay_skipped"][0]["rank"] == "0"


async def test_replay_can_be_turned_off(
    nats_url: str, run_id: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with agent(nats_url, run_id, 0):
        await client.set(run_id, 0, "epochs", 5)
    async with agent(nats_url, run_id, 0, replay=False) as off:
        assert off.state.epochs == 3 and not off.replay_report.replayed
    monkeypatch.setenv("RUNCTL_REPLAY", "0")
    async with agent(nats_url, run_id, 0) as off:
        assert off.state.epochs == 3
    monkeypatch.delenv("RUNCTL_REPLAY")
    async with agent(nats_url, run_id, 0) as on:
        assert on.state.epochs == 5


async def test_a_rank_that_joins_later_gets_the_run_wide_changes(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0), agent(nats_url, run_id, 1):
        await client.set(run_id, "all", "opt.lr", 0.3)
        await client.set(run_id, 1, "epochs", 9)  # rank 1's own: not for a new rank
        await client.patch(run_id, "all", {"tags": {"k": 2}})
        async with agent(nats_url, run_id, 5) as late:
            assert late.state == Cfg(opt=Opt(lr=0.3), tags={"k": 2})
            assert len(late.replay_report.replayed) == 2


async def test_a_change_scheduled_at_a_step_survives_a_restart_before_it(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0) as a, agent(nats_url, run_id, 1) as b:
        a.sync(10)
        b.sync(10)
        sched = await client.set(run_id, "all", "opt.lr", 0.01, at_step=20)
        assert isinstance(sched, Gathered)
        assert sched.journaled and sched.at_step == 20
        listed = await client.schedules(run_id)
        assert [e.id for e in listed] == [sched.change_id]
        with pytest.raises(TooLate):
            await client.set(run_id, "all", "epochs", 1, at_step=5)
    async with agent(nats_url, run_id, 0) as a:  # rank 0 restarted at step 12, before 20
        a.sync(12)
        assert a.state.opt.lr == 0.1
        a.sync(20)
        assert a.state.opt.lr == 0.01
        await anyio.sleep(0.2)
    entry = (await client.schedules(run_id, include_done=True))[0].to_json()
    assert entry["ranks"]["0"]["step"] == 20 and entry["status"] == "applied"


async def test_a_cancelled_schedule_is_not_restored(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0) as a:
        a.sync(1)
        sched = await client.set(run_id, "all", "epochs", 7, at_step=50)
        cancelled = await client.unschedule(run_id, sched.change_id)
        assert cancelled["cancelled"] == sched.change_id
        assert await client.schedules(run_id) == []
    async with agent(nats_url, run_id, 0) as again:
        again.sync(60)
        assert again.state.epochs == 3


async def test_synchronised_changes_are_durable_too(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0) as a:
        a.sync(3)
        sync = await client.set(run_id, "all", "epochs", 6, sync=True, margin=100)
        assert isinstance(sync, Gathered)
        assert sync.journaled and not sync.cancelled
    async with agent(nats_url, run_id, 0) as again:
        again.sync(50)
        assert again.state.epochs == 3
        assert sync.at_step is not None
        again.sync(sync.at_step)
        assert again.state.epochs == 6


async def test_forget_history_removes_a_runs_journal(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0):
        await client.set(run_id, 0, "epochs", 5)
    assert await client.forget_history(run_id) == 1
    assert await client.history(run_id) == []
    async with agent(nats_url, run_id, 0) as again:
        assert again.state.epochs == 3


def test_retention_defaults_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNCTL_JOURNAL_MAX_AGE", raising=False)
    monkeypatch.delenv("RUNCTL_JOURNAL_MAX_BYTES", raising=False)
    config = stream_config()
    assert config.max_age == 90 * 24 * 3600 and config.max_bytes == 1 << 30
    assert config.storage == api.StorageType.FILE and config.discard == api.DiscardPolicy.OLD
    monkeypatch.setenv("RUNCTL_JOURNAL_MAX_AGE", "3600")
    monkeypatch.setenv("RUNCTL_JOURNAL_MAX_BYTES", "0")  # unlimited, as in JetStream
    config = stream_config(replicas=3)
    assert config.max_age == 3600 and config.max_bytes == -1 and config.num_replicas == 3
    monkeypatch.setenv("RUNCTL_JOURNAL_MAX_AGE", "a week")
    with pytest.raises(BadRequest, match="RUNCTL_JOURNAL_MAX_AGE"):
        stream_config()


async def test_a_full_journal_drops_its_oldest_records(
    nats_server: NatsServer, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNCTL_JOURNAL_MAX_BYTES", "20000")  # when the stream is created
    async with (
        await Client.connect(nats_server.url) as client,
        agent(nats_server.url, run_id, 0),
    ):
        ids = [(await client.set(run_id, 0, "epochs", i)).change_id for i in range(60)]
        kept = [e.id for e in await client.history(run_id, limit=1000)]
    assert kept and len(kept) < 60 and kept == list(reversed(ids))[: len(kept)]


class Blob(BaseModel):
    blob: str = ""
    epochs: int = 3


async def test_a_huge_change_is_journaled_without_its_values(
    nats_url: str, run_id: str, client: Client
) -> None:
    big = "x" * 400_000  # before and after together are over what one record may hold
    async with agent(nats_url, run_id, 0, Blob(blob="y" * 400_000)):
        res = await client.set(run_id, 0, "blob", big)
        assert res.journaled is True
        (entry,) = await client.history(run_id)
        (change,) = entry.to_json()["ranks"]["0"]["diff"]
        assert change["path"] == "blob" and change["elided"] is True
        assert len(change["before"]) < 100
        with pytest.raises(BadRequest, match="too large"):
            await client.undo(run_id)
    async with agent(nats_url, run_id, 0, Blob()) as again:
        assert again.state.blob == big  # the request itself was kept: it replays


async def test_a_change_too_large_to_keep_is_reported_at_replay(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0, Blob()):
        res = await client.set(run_id, 0, "blob", "z" * 950_000)  # near the 1 MiB limit
        assert res.journaled is True
        await client.set(run_id, 0, "epochs", 4)
    async with agent(nats_url, run_id, 0, Blob()) as again:
        assert again.state == Blob(epochs=4)
        (skipped,) = again.replay_report.skipped
        assert skipped.id == res.change_id and "too large" in skipped.reason


async def test_a_synchronised_change_cancelled_everywhere_is_not_replayed(
    nats_url: str, run_id: str, client: Client
) -> None:
    """Rank 0 took a synchronised change (pending), rank 1 was past its step, so the client
    cancelled it on every rank: rank 0 restarted before that step must not apply it."""
    async with agent(nats_url, run_id, 0) as a, agent(nats_url, run_id, 1) as b:
        a.sync(5)
        b.sync(20)
        sync = await client.set(run_id, "all", "epochs", 6, sync=True, margin=0)
        assert isinstance(sync, Gathered)
        assert sync.cancelled, sync.to_json()
        assert sync.at_step is not None and sync.at_step >= 20
    async with agent(nats_url, run_id, 0) as again:
        for step in range(6, sync.at_step + 5):
            again.sync(step)
        assert again.state.epochs == 3
    (entry,) = [e for e in await client.history(run_id) if e.id == sync.change_id]
    assert entry.to_json()["status"] != "applied", entry.to_json()


async def test_a_change_applied_at_a_step_is_undone_like_any_change(
    nats_url: str, run_id: str, client: Client
) -> None:
    """A synchronised (or scheduled) change, once applied, is the latest change for undo and
    a later change for another undo's conflict check; one not applied yet is cancelled."""
    async with agent(nats_url, run_id, 0) as a, agent(nats_url, run_id, 1) as b:
        a.sync(1)
        b.sync(1)
        first = await client.set(run_id, "all", "opt.lr", 0.3)
        sync = await client.set(run_id, "all", "opt.lr", 0.5, sync=True, margin=5)
        assert isinstance(sync, Gathered) and sync.at_step is not None
        for step in range(2, sync.at_step + 1):
            a.sync(step)
            b.sync(step)
        assert a.state.opt.lr == b.state.opt.lr == 0.5
        await anyio.sleep(0.2)  # the ranks' records of the applied change reach the journal
        # the synchronised change is later and touched the same field: the first waits
        assert isinstance(first, Gathered)
        with pytest.raises(Conflict, match="followed by 1 change"):
            await client.undo(run_id, first.change_id)
        # "undo the latest" takes back the synchronised change, not the one before it
        undone = await client.undo(run_id)
        assert undone.plan.change.id == sync.change_id
        assert a.state.opt.lr == b.state.opt.lr == 0.3
        later = await client.set(run_id, "all", "epochs", 9, at_step=sync.at_step + 100)
        with pytest.raises(BadRequest, match="cancel"):
            await client.undo(run_id, later.change_id)


async def test_a_synchronised_change_does_not_wait_for_a_far_scheduled_one(
    nats_url: str, run_id: str, client: Client
) -> None:
    """A change scheduled at step 100,000 is the user's own step: a synchronised change sent
    after it still applies a few steps ahead (synchronised changes keep their order among
    themselves only)."""
    async with agent(nats_url, run_id, 0) as a:
        a.sync(1)
        far = await client.set(run_id, "all", "epochs", 9, at_step=100_000)
        first = await client.set(run_id, "all", "opt.lr", 0.2, sync=True, margin=3)
        assert isinstance(far, Gathered) and isinstance(first, Gathered)
        assert first.at_step == 4, first.at_step
        # ... and a second synchronised change never applies before the first one
        second = await client.set(run_id, "all", "opt.lr", 0.3, sync=True, margin=1)
        assert isinstance(second, Gathered) and second.at_step == 4
        for step in range(2, 5):
            a.sync(step)
        assert a.state.opt.lr == 0.3 and a.state.epochs == 3


async def test_a_change_some_ranks_still_hold_pending_is_not_undone_yet(
    nats_url: str, run_id: str, client: Client
) -> None:
    """Rank 0 applied a synchronised change at its step, rank 1 has not reached it: an undo
    now would leave rank 1 applying it afterwards. Refused until every rank applied it."""
    async with agent(nats_url, run_id, 0) as a, agent(nats_url, run_id, 1) as b:
        a.sync(1)
        b.sync(1)
        sync = await client.set(run_id, "all", "epochs", 6, sync=True, margin=5)
        assert isinstance(sync, Gathered) and sync.at_step is not None
        a.sync(sync.at_step)
        assert (a.state.epochs, b.state.epochs) == (6, 3)
        await anyio.sleep(0.2)  # rank 0's record of the applied change reaches the journal
        with pytest.raises(Conflict, match="pending on rank 1"):
            await client.undo(run_id, sync.change_id)
        b.sync(sync.at_step)
        await anyio.sleep(0.2)
        await client.undo(run_id, sync.change_id)
        assert (a.state.epochs, b.state.epochs) == (3, 3)


async def test_a_rank_that_joins_later_keeps_what_was_undone_undone(
    nats_url: str, run_id: str, client: Client
) -> None:
    async with agent(nats_url, run_id, 0), agent(nats_url, run_id, 1):
        await client.set(run_id, 1, "opt.lr", 0.2)  # the ranks' before-values differ, so
        await client.set(run_id, "all", "opt.lr", 0.3)  # the undo goes to each rank alone
        undo = await client.undo(run_id)
        assert sorted(undo.results) == ["0", "1"]
        async with agent(nats_url, run_id, 5) as late:  # never had the change: not now
            assert late.state.opt.lr == Cfg().opt.lr
        await client.undo(run_id, undo.change_id)  # undo the undo: a redo
        async with agent(nats_url, run_id, 6) as later:
            assert later.state.opt.lr == 0.3
