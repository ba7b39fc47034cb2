"""The step log on a real nats-server: the stream, dedup, read-back, live forget, run-wide
steps between live agents, and the async API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from conftest import wait_for
from nats.js import api
from pydantic import BaseModel

from runctl.agent import Agent, control
from runctl.agent.steps.log import StepLog
from runctl.bus.canonical import hashed, key_digest
from runctl.bus.errors import Unavailable
from runctl.bus.server import NatsServer
from runctl.bus.steps.records import StepRecord, encode_entry
from runctl.bus.steps.store import STREAM, ensure_stream, forget, read_log, stream_config
from runctl.bus.subjects import command_subject, step_record_subject


class S(BaseModel):
    x: int = 0


def record(run: str, name: str, key: Any, *, scope: str = "0") -> StepRecord:
    h = hashed({})
    return StepRecord(
        run=run,
        scope=scope,
        name=name,
        key=key,
        key_hash=key_digest(key)[1],
        config=h.value,
        config_hash=h.hash,
        status="done",
        started=time.time(),
        rank=scope,
        host="test",
        pid=1,
    )


@pytest.mark.anyio
async def test_stream_is_created_once_and_a_changed_config_is_updated(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        await ensure_stream(js)  # the same config again: accepted, not duplicated
        changed = stream_config()
        changed.duplicate_window = 30.0
        await js.update_stream(changed)
        await ensure_stream(js)  # a drifted config is put back
        info = await js.stream_info(STREAM)
        assert info.config.duplicate_window == stream_config().duplicate_window
        assert info.config.max_msgs_per_subject == 1
        assert info.config.storage == api.StorageType.FILE
        assert info.config.retention == api.RetentionPolicy.LIMITS
        assert [s.config.name for s in await js.streams_info()].count(STREAM) == 1
        # an operator's own limit is kept: agents enforce only what runctl relies on
        operator = stream_config()
        operator.max_age = 3600.0
        await js.update_stream(operator)
        await ensure_stream(js)
        assert (await js.stream_info(STREAM)).config.max_age == 3600.0
        # no command subject is captured: a request still finds no responder (not a PubAck)
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(command_subject("nobody", 0, "get"), b"", timeout=2)
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_a_resent_completion_is_stored_once(nats_url: str, run_id: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        log = await StepLog.open(nc, run=run_id, rank="0", host="test", pid=1)
        rec = record(run_id, "epoch", 1)
        assert await log.complete(rec)
        pending = log.submit(rec)
        resend = log.submit(rec)
        resend.msg_id = pending.msg_id  # a retry: same Nats-Msg-Id
        assert await log.flush(5)
        js = nc.jetstream()
        subject = step_record_subject(run_id, "0", "epoch", rec.id)
        info = await js.stream_info(STREAM, subjects_filter=subject)
        assert info.state.subjects == {subject: 1}
        dup = await js.publish(subject, encode_entry(rec), headers={"Nats-Msg-Id": pending.msg_id})
        assert dup.duplicate
        await log.aclose()
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_read_back_of_many_records_is_complete_and_ordered(
    nats_url: str, run_id: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        n = 3000
        futures = []
        for i in range(n):
            rec = record(run_id, "shard", i, scope=str(i % 3))
            subject = step_record_subject(run_id, rec.scope, "shard", rec.id)
            futures.append(await js.publish_async(subject, encode_entry(rec)))
        await js.publish_async_completed()
        runlog = await read_log(nc, run_id)
        assert len(runlog.records) == n
        seqs = [seq for seq, _ in runlog.records.values()]
        assert seqs == sorted(seqs) and len(set(seqs)) == n
        mine = await read_log(nc, run_id, rank="1")
        assert {r.scope for _, r in mine.records.values()} == {"1"}
        assert len(mine.records) == n // 3
        assert (await read_log(nc, run_id + "-empty")).records == {}
    finally:
        await nc.close()


@pytest.mark.anyio
async def test_async_program_resumes_with_every_form(nats_url: str, run_id: str) -> None:
    calls: list[Any] = []

    async def program() -> dict[str, Any]:
        async with Agent(S(), run=run_id, rank=0, url=nats_url) as agent:
            steps = agent.steps
            seen = [e async for e in steps.aiter("epoch", range(4), config={"lr": 0.1})]

            @steps.cached
            async def square(x: int) -> tuple[int, int]:
                calls.append(x)
                return x, x * x

            sq = await square(3)
            async with steps.step("merge", config={"k": 1}) as s:
                was = s.done
                if not s.done:
                    s.result = {"merged": True}
            marked = await steps.adone("export", "v1", result=[1, 2])
            assert await steps.aflush(5)
            return {
                "seen": seen,
                "sq": sq,
                "merge_was_done": was,
                "marked": marked,
                "export": steps.result("export", "v1"),
                "merge": steps.result("merge", config={"k": 1}),
            }

    first = await program()
    assert first["seen"] == [0, 1, 2, 3] and first["sq"] == [3, 9]  # JSON: lists
    assert first["merge_was_done"] is False and first["marked"] is True
    second = await program()
    assert second["seen"] == [] and second["sq"] == [3, 9]
    assert second["merge_was_done"] is True and second["merge"] == {"merged": True}
    assert second["export"] == [1, 2]
    assert calls == [3]


def test_a_forget_reaches_a_live_agent(nats_url: str, run_id: str) -> None:
    with control(S(), run=run_id, rank=0, url=nats_url) as ctl:
        assert list(ctl.steps("epoch", range(3))) == [0, 1, 2]
        assert all(ctl.is_done("epoch", i) for i in range(3))

        async def forget_from_outside() -> int:
            nc = await nats.connect(nats_url)
            try:
                return (await forget(nc, run_id, "epoch:1+", by="test")).forgotten
            finally:
                await nc.close()

        assert anyio.run(forget_from_outside) == 2
        wait_for(lambda: not ctl.is_done("epoch", 1))
        assert ctl.is_done("epoch", 0) and not ctl.is_done("epoch", 2)
        assert list(ctl.steps("epoch", range(3))) == [1, 2]
        assert ctl.forget("epoch").forgotten == 3  # from the program: applied at once
        assert not ctl.is_done("epoch", 0)


def test_a_run_wide_step_done_by_one_live_rank_counts_for_the_other(
    nats_url: str, run_id: str
) -> None:
    with (
        control(S(), run=run_id, rank=0, url=nats_url) as r0,
        control(S(), run=run_id, rank=1, url=nats_url) as r1,
    ):
        r1.wait_ready()
        assert not r1.is_done("prepare", scope="run")
        with r0.once("prepare", scope="run") as s:
            s.result = {"rows": 10}
        assert s.done
        wait_for(lambda: r1.is_done("prepare", scope="run"))
        assert r1.agent.steps.result("prepare", scope="run") == {"rows": 10}
        with r1.once("prepare", scope="run") as s1:
            assert s1.done and s1.result == {"rows": 10}
        assert not r1.is_done("prepare")  # the rank scope is separate


def test_exceptions_and_breaks_leave_steps_not_done(nats_url: str, run_id: str) -> None:
    with control(S(), run=run_id, rank=0, url=nats_url) as ctl:

        def body_fails_at_2() -> None:
            for i in ctl.steps("a", range(5)):
                if i == 2:
                    raise RuntimeError("body failed")

        with pytest.raises(RuntimeError):
            body_fails_at_2()
        for i in ctl.steps("b", range(5)):
            if i == 1:
                break
        with pytest.raises(ZeroDivisionError), ctl.once("c"):
            _ = 1 / 0
        with ctl.once("d") as s:
            s.skip()
        assert [ctl.is_done("a", i) for i in range(5)] == [True, True, False, False, False]
        assert [ctl.is_done("b", i) for i in range(3)] == [True, False, False]
        assert not ctl.is_done("c") and not ctl.is_done("d")

        @ctl.cached()
        def bad() -> object:
            return object()

        with pytest.raises(TypeError, match="must be JSON"):
            bad()
        assert not ctl.is_done("bad", {})
        log = ctl.agent.steplog
        assert log is not None and ctl.agent.steps.flush(5)

    async def statuses() -> dict[str, str]:
        nc = await nats.connect(nats_url)
        try:
            runlog = await read_log(nc, run_id)
        finally:
            await nc.close()
        return {f"{r.name}[{r.key}]": r.status for _, r in runlog.records.values()}

    seen = anyio.run(statuses)
    assert seen["a[2]"] == "failed" and seen["b[1]"] == "failed"
    assert seen["c[None]"] == "failed" and seen["d[None]"] == "failed"
    assert "a[3]" not in seen
    assert msgspec.json.encode(seen)  # plain data


class NoJetStream(NatsServer):
    def argv(self) -> list[str]:
        return [a for a in super().argv() if a != "-js"]


def test_without_jetstream_the_agent_serves_and_steps_say_why(tmp_path: Path) -> None:
    with (
        NoJetStream(store_dir=tmp_path) as server,
        control(S(), run="nojs", rank=0, url=server.url) as ctl,
    ):
        ctl.wait_ready()
        with pytest.raises(Unavailable, match="step log is unavailable: JetStream is not "):
            ctl.steps("epoch", range(3))


def test_after_close_steps_are_refused_clearly(nats_url: str, run_id: str) -> None:
    with control(S(), run=run_id, rank=0, url=nats_url) as ctl:
        ctl.done("a")
    with pytest.raises(Unavailable, match="closed"):
        ctl.done("b")
    assert ctl.is_done("a")  # what is known stays readable
