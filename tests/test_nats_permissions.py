"""The secured nats.conf (the one ``runctl up`` runs), measured with a real server: every role
can do its job, and each thing a role may not do is refused by the server.

A refused publish is not an exception in nats-py: the server reports a permissions violation
asynchronously (``error_cb``) and a request just gets no reply. So each denial test checks
three things: the violation was reported, nothing reached a subscriber that would have
seen it, and the state the publish aimed at did not change. Each one also does the same
thing with a role that may, so the test cannot pass because nothing works at all.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from runctl.agent import Agent
from runctl.bus import Client, Gathered, Result, statestore
from runctl.bus import messages as m
from runctl.bus.artifact_store import ArtifactStore
from runctl.bus.credentials import Credentials, NatsRole, ensure_credentials
from runctl.bus.errors import RunctlError, ServerStartError
from runctl.bus.journal import Record, encode_record
from runctl.bus.journalstore import STREAM as JOURNAL
from runctl.bus.journalstore import read_journal
from runctl.bus.registry import BUCKET, Registry
from runctl.bus.server import NatsServer
from runctl.bus.steps.store import STREAM, ensure_stream, forget, read_log
from runctl.bus.subjects import (
    command_subject,
    journal_subject,
    state_subject,
    step_record_subject,
)

ROOT = Path(__file__).resolve().parent.parent
NATS_CONF = ROOT / "nats.conf"


class Opt(BaseModel):
    lr: float = 0.1


class Cfg(BaseModel):
    epochs: int = 3
    opt: Opt = Opt()


# --- fixtures ---------------------------------------------------------------------------


def start_secured(store: Path, creds: Credentials) -> NatsServer:
    """The repo's nats.conf with a free port, a temp store, no monitoring port (flags win
    over the file's listen/http; the file sets no store dir so -sd is accepted)."""
    server = NatsServer(config_file=NATS_CONF, store_dir=store, extra_args=("-m", "0"))
    with pytest.MonkeyPatch.context() as mp:  # the passwords reach only the server process
        for key, value in creds.server_env().items():
            mp.setenv(key, value)
        return server.start()


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Credentials:
    return ensure_credentials(tmp_path_factory.mktemp("creds") / "credentials", env={})


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, creds: Credentials) -> Iterator[NatsServer]:
    server = start_secured(tmp_path_factory.mktemp("nats-secured"), creds)
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Logins come from each test's explicit arguments, never from the caller's env."""
    for var in (
        "RUNCTL_NATS_USER",
        "RUNCTL_NATS_PASSWORD",
        "RUNCTL_NATS_CREDS",
        "RUNCTL_NATS_NKEY",
        "RUNCTL_NATS_TOKEN",
        "RUNCTL_NATS_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RUNCTL_NATS_CREDENTIALS_DIR", str(tmp_path / "none"))


async def until(predicate: Callable[[], object], timeout: float = 3.0) -> None:
    """Poll ``predicate`` (something that arrives asynchronously) until it holds."""
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


def url_for(server: NatsServer, creds: Credentials, role: NatsRole) -> str:
    auth = creds.auth(role)
    return f"nats://{auth['user']}:{auth['password']}@127.0.0.1:{server.port}"


class Login:
    """A raw nats-py connection of one role that records the server's violations."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: NATS | None = None

    async def connect(self, server: NatsServer, creds: Credentials, role: NatsRole) -> NATS:
        async def error_cb(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            f"nats://127.0.0.1:{server.port}",
            error_cb=error_cb,
            allow_reconnect=False,
            **creds.auth(role),
        )
        return self.nc

    def violations(self, kind: str, subject: str) -> list[str]:
        return [
            e
            for e in self.errors
            if "permissions violation" in e and kind in e and subject.lower() in e.lower()
        ]

    async def wait_violation(self, kind: str, subject: str) -> None:
        await until(lambda: self.violations(kind, subject))

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


@pytest.fixture
async def logins() -> AsyncIterator[list[Login]]:
    made: list[Login] = []
    yield made
    for login in made:
        await login.close()


async def login(
    logins: list[Login], server: NatsServer, creds: Credentials, role: NatsRole
) -> tuple[Login, NATS]:
    entry = Login()
    logins.append(entry)
    return entry, await entry.connect(server, creds, role)


class Tap:
    def __init__(self) -> None:
        self.subjects: list[str] = []

    async def on(self, nc: NATS, subject: str) -> Tap:
        async def cb(msg: Any) -> None:
            self.subjects.append(msg.subject)

        await nc.subscribe(subject, cb=cb)
        await nc.flush()
        return self


class ServerLog:
    """The server's own log from now on: every refused publish or subscribe is there."""

    def __init__(self, server: NatsServer) -> None:
        self.path = server.log_path
        self.offset = self.path.stat().st_size

    def violations(self) -> list[str]:
        with self.path.open(errors="replace") as f:
            f.seek(self.offset)
            return [line for line in f if "Violation" in line]


async def settle(*conns: NATS) -> None:
    """Every publish so far has been processed by the server and delivered."""
    for nc in conns:
        await nc.flush()
    await anyio.sleep(0.1)


# --- the server and logins --------------------------------------------------------------


def test_server_refuses_to_start_without_passwords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RUNCTL_AGENT_PASSWORD", "RUNCTL_OPERATOR_PASSWORD", "RUNCTL_OBSERVER_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    server = NatsServer(config_file=NATS_CONF, store_dir=tmp_path, extra_args=("-m", "0"))
    with pytest.raises(ServerStartError) as info:
        server.start()
    assert "RUNCTL_AGENT_PASSWORD" in str(info.value)


@pytest.mark.anyio
async def test_anonymous_and_wrong_password_logins_are_refused(
    secured: NatsServer, creds: Credentials
) -> None:
    url = f"nats://127.0.0.1:{secured.port}"
    with pytest.raises(RunctlError, match="cannot connect"):
        await Client.connect(url)
    with pytest.raises(RunctlError, match="cannot connect") as info:
        await Client.connect(f"nats://runctl-operator:wrong-password@127.0.0.1:{secured.port}")
    assert "wrong-password" not in str(info.value)  # the URL is redacted in the message
    async with await Client.connect(url_for(secured, creds, "operator")) as client:
        assert await client.runs() is not None  # the right password works


# --- what each role may do --------------------------------------------------------------


@pytest.mark.anyio
async def test_agent_and_operator_run_the_whole_product(
    secured: NatsServer, creds: Credentials, run_id: str
) -> None:
    agent_url = url_for(secured, creds, "agent")
    server_log = ServerLog(secured)
    async with (
        Agent(Cfg(), run=run_id, rank=0, url=agent_url, heartbeat=0.2) as a0,
        Agent(Cfg(), run=run_id, rank=1, url=agent_url, heartbeat=0.2) as a1,
        await Client.connect(url_for(secured, creds, "operator"), timeout=2) as client,
    ):
        assert a0.registry is not None and a0.steplog is not None  # JetStream works for it
        runs = await client.runs()
        assert {(i.record.run, i.record.rank) for i in runs} >= {(run_id, "0"), (run_id, "1")}
        read = await client.get(run_id, 0, "opt.lr")
        assert isinstance(read, Result) and read.source == "registry" and read.value == 0.1
        changed = await client.set(run_id, 1, "opt.lr", 0.5)
        assert isinstance(changed, Result) and changed.changed
        assert changed.acks == 2 and changed.journaled  # stores acknowledged to the writer
        assert a1.state.opt.lr == 0.5 and a0.state.opt.lr == 0.1
        # the change journal names the NATS user the change came in as, beside its author
        (entry,) = [e for e in await client.history(run_id) if e.id == changed.change_id]
        by = entry.by if isinstance(entry.by, dict) else msgspec.to_builtins(entry.by)
        assert by["user"] == "runctl-operator" and by["via"] == "python", by
        gathered = await client.patch(run_id, "all", {"epochs": 7})
        assert sorted(gathered.results) == ["0", "1"]  # type: ignore[union-attr]
        assert a0.state.epochs == a1.state.epochs == 7
        fresh = await client.get(run_id, 1, fresh=True)
        assert isinstance(fresh, Result) and fresh.value["opt"]["lr"] == 0.5
        assert (await client.schema(run_id, 0))["title"] == "Cfg"
        await client.reset(run_id, 1)
        assert a1.state.opt.lr == 0.1
        # steps: the agent logs them, the operator reads and forgets, the agent obeys
        for epoch in range(3):
            assert await a0.steps.adone("epoch", epoch)
        assert await a1.steps.adone("tokenize", "shard-0", scope="run")
        log = await read_log(client.nc, run_id)
        assert len(log.records) == 4
        forgotten = await forget(client.nc, run_id, "epoch:1")
        assert forgotten.forgotten == 1
        await until(lambda: not a0.steps.is_done("epoch", 1))
        assert a0.steps.is_done("epoch", 2)
        # a run-wide stop is recorded in the registry, and every rank gets it
        stopped = await client.stop(run_id, "all", "maintenance")
        assert sorted(stopped.results) == ["0", "1"]  # type: ignore[union-attr]
        assert a0.stop_requested and a1.stop_requested
        registry = await client.registry()
        record = await registry.get_run(run_id)
        assert record is not None and record.stop_requested
    assert not server_log.violations()  # nothing any role did here was refused


@pytest.mark.anyio
async def test_a_rank_starting_after_an_old_run_wide_stop_reads_the_registry(
    secured: NatsServer, creds: Credentials, run_id: str
) -> None:
    """The agent's rarest registry path (an old stop record and another live rank: a watch
    of the run's records) works with the agent's permissions."""
    agent_url = url_for(secured, creds, "agent")
    server_log = ServerLog(secured)
    async with Agent(Cfg(), run=run_id, rank=0, url=agent_url, heartbeat=0.2):
        async with await Client.connect(url_for(secured, creds, "operator")) as client:
            registry = await client.registry()
            await registry.put_run(
                m.RunRecord(run=run_id, stop_requested=True, reason="old", ts=time.time() - 3600)
            )
        async with Agent(Cfg(), run=run_id, rank=1, url=agent_url, heartbeat=0.2) as late:
            assert late.stop_requested and late.stop_reason == "old"
    assert not server_log.violations()


@pytest.mark.anyio
async def test_observer_sees_state_and_events(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    server_log = ServerLog(secured)
    observer, onc = await login(logins, secured, creds, "observer")
    tap = await Tap().on(onc, "runctl.>")
    async with (
        Agent(Cfg(), run=run_id, rank=0, url=url_for(secured, creds, "agent"), heartbeat=0.2),
        await Client.connect(url_for(secured, creds, "operator")) as client,
    ):
        await client.set(run_id, 0, "epochs", 9)
        await until(lambda: f"runctl.{run_id}.0.evt.set" in tap.subjects)
    assert state_subject(run_id, 0) in tap.subjects
    assert not observer.errors and not server_log.violations()


class Collect:
    """A watch destination that keeps what it is given."""

    name = "collect"

    def __init__(self) -> None:
        self.notices: list[Any] = []

    async def send(self, notice: Any, watcher: str) -> None:
        self.notices.append(notice)


@pytest.mark.anyio
async def test_a_watcher_needs_only_the_observer_login_unless_it_acts(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    from runctl.bus.conditions import parse
    from runctl.cli.watch import Action, Watcher, WatchOptions

    server_log = ServerLog(secured)
    observer, onc = await login(logins, secured, creds, "observer")
    operator, opnc = await login(logins, secured, creds, "operator")
    watched, acted = Collect(), Collect()
    look = WatchOptions(run=run_id, conditions=[parse("epochs > 5")])
    act = WatchOptions(run=run_id, conditions=[parse("epochs > 7")], action=Action("stop"))
    async with (
        Agent(Cfg(), run=run_id, rank=0, url=url_for(secured, creds, "agent"), heartbeat=0.2),
        await Client.connect(url_for(secured, creds, "operator")) as client,
        anyio.create_task_group() as tasks,
    ):
        await tasks.start(Watcher(Client(onc), look, [watched]).run)
        await tasks.start(Watcher(Client(opnc, by="guard"), act, [acted]).run)
        await client.set(run_id, 0, "epochs", 6)
        await until(lambda: [n for n in watched.notices if n.kind == "condition"], 10)
        await client.set(run_id, 0, "epochs", 9)  # the acting watcher stops the run
        await until(lambda: [n for n in acted.notices if n.kind == "action"], 10)
        tasks.cancel_scope.cancel()
    (action,) = [n for n in acted.notices if n.kind == "action"]
    assert action.data["acknowledged"] == ["0"] and action.data["complete"]
    assert not observer.errors and not operator.errors and not server_log.violations()


@pytest.mark.anyio
async def test_operator_reads_a_large_registry_and_step_log(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    """Big reads need the operator's flow-control replies ($JS.FC.*): without them both
    reads stall (measured: the step log read then never ends)."""
    _, anc = await login(logins, secured, creds, "agent")
    registry = await Registry.open(anc)
    state = msgspec.Raw(msgspec.json.encode({"blob": "x" * 200_000}))
    for rank in range(120):
        await registry.put(
            m.RankRecord(
                run=run_id,
                rank=str(rank),
                host="h",
                pid=1,
                started=0,
                heartbeat=time.time(),
                heartbeat_interval=1,
                version=0,
                state=state,
            )
        )
    js = anc.jetstream()
    await ensure_stream(js)
    acks = [
        await js.publish_async(step_record_subject(run_id, 0, "s", f"{i:x}-0"), b"y" * 10_000)
        for i in range(2000)
    ]
    for ack in acks:
        await ack
    operator, onc = await login(logins, secured, creds, "operator")
    server_log = ServerLog(secured)
    with anyio.fail_after(10):
        records = await (await Registry.open(onc, create=False)).records(run_id)
        read = await read_log(onc, run_id)
    assert len(records) == 120
    assert read.run == run_id  # the entries are not step records: counted, not decoded
    assert not operator.errors and not server_log.violations()


# --- what each role may not do ----------------------------------------------------------


@pytest.mark.anyio
async def test_agent_credentials_cannot_command_another_rank(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    agent_url = url_for(secured, creds, "agent")
    async with (
        Agent(Cfg(), run=run_id, rank=0, url=agent_url, heartbeat=0.2),
        Agent(Cfg(), run=run_id, rank=1, url=agent_url, heartbeat=0.2) as target,
    ):
        errors: list[str] = []

        async def error_cb(exc: Exception) -> None:
            errors.append(str(exc))

        async with await Client.connect(agent_url, timeout=0.5, error_cb=error_cb) as rogue:
            with pytest.raises(RunctlError):
                await rogue.set(run_id, 1, "opt.lr", 9.0)
            with pytest.raises(RunctlError):
                await rogue.stop(run_id, "all", "hijack")
        subject = command_subject(run_id, 1, "set")
        assert any("permissions violation" in e and subject in e for e in errors), errors
        assert target.state.opt.lr == 0.1 and target.version == 0
        assert not target.stop_requested
        # the same command with the operator's login does arrive (so the denial is real)
        async with await Client.connect(url_for(secured, creds, "operator")) as client:
            await client.set(run_id, 1, "opt.lr", 0.2)
        assert target.state.opt.lr == 0.2


@pytest.mark.anyio
async def test_agent_cannot_snoop_or_forge_what_is_not_its_own(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    """No reading others' state stream, no forget markers, no run-wide stop record, no
    purging the step log, no touching streams it did not need (delete, update)."""
    agent, anc = await login(logins, secured, creds, "agent")
    _, onc = await login(logins, secured, creds, "operator")
    tap = await Tap().on(onc, "runctl.>")
    await anc.subscribe("runctl.*.*.state")
    await agent.wait_violation("subscription", "runctl.*.*.state")
    marker = step_record_subject(run_id, 0, "epoch", "_forgotten")
    await anc.publish(marker, b"{}")
    await agent.wait_violation("publish", marker)
    run_stop = f"$KV.{BUCKET}.{run_id}.all"  # a run-wide stop record is a command too
    await anc.publish(run_stop, m.encode(m.RunRecord(run=run_id, stop_requested=True)))
    await agent.wait_violation("publish", run_stop)
    for api in (
        f"$JS.API.STREAM.PURGE.{STREAM}",
        f"$JS.API.STREAM.DELETE.{STREAM}",
        f"$JS.API.STREAM.UPDATE.{STREAM}",
        f"$JS.API.STREAM.DELETE.KV_{BUCKET}",
        f"$JS.API.DIRECT.GET.{statestore.STREAM}",  # other ranks' states, kept for the console
        f"$JS.API.STREAM.UPDATE.{statestore.STREAM}",
        f"$JS.API.STREAM.DELETE.{statestore.STREAM}",
    ):
        with pytest.raises(nats.errors.TimeoutError):
            await anc.request(api, b"{}", timeout=0.3)
        await agent.wait_violation("publish", api)
    await settle(anc, onc)
    assert marker not in tap.subjects
    registry = await Registry.open(onc)
    assert await registry.get_run(run_id) is None


@pytest.mark.anyio
async def test_an_agent_cannot_forget_steps(
    secured: NatsServer, creds: Credentials, run_id: str
) -> None:
    """Forgetting is the operator's: a program's own ``aforget`` is refused with the agent's
    login (it fails after the JetStream timeout, 5 s; the test gives up after 1 s) and its
    steps stay done, in the agent and in the stream."""
    async with Agent(Cfg(), run=run_id, rank=0, url=url_for(secured, creds, "agent")) as a0:
        assert await a0.steps.adone("epoch", 0)
        with anyio.move_on_after(1) as waited:
            await a0.steps.aforget("epoch")
        assert waited.cancel_called
        assert a0.steps.is_done("epoch", 0)
        async with await Client.connect(url_for(secured, creds, "operator")) as client:
            assert len((await read_log(client.nc, run_id)).records) == 1


@pytest.mark.anyio
async def test_observer_cannot_publish_anything(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    observer, obs = await login(logins, secured, creds, "observer")
    operator, opc = await login(logins, secured, creds, "operator")
    tap = await Tap().on(opc, "runctl.>")
    inbox_tap = await Tap().on(opc, "_INBOX.observer-test.>")
    async with Agent(
        Cfg(), run=run_id, rank=0, url=url_for(secured, creds, "agent"), heartbeat=0.2
    ) as target:
        cmd = command_subject(run_id, 0, "set")
        payload = m.encode(m.Set(path="epochs", value=99))
        forged_state = state_subject(run_id, 5)
        for subject in (
            cmd,
            forged_state,
            f"runctl.{run_id}.0.evt.started",
            step_record_subject(run_id, 0, "epoch", "0-0"),
            f"$KV.{BUCKET}.{run_id}.0",
            "_INBOX.observer-test.x",
        ):
            await obs.publish(subject, payload)
            await observer.wait_violation("publish", subject)
        with pytest.raises(nats.errors.TimeoutError):
            await obs.request(f"$JS.API.STREAM.INFO.KV_{BUCKET}", b"", timeout=0.3)
        await settle(obs, opc)
        assert cmd not in tap.subjects and forged_state not in tap.subjects
        assert not inbox_tap.subjects
        assert target.state.epochs == 3 and target.version == 0
        # nor read replies or the registry behind the scenes
        await obs.subscribe("_INBOX.>")
        await observer.wait_violation("subscription", "_INBOX.>")
        # the operator doing the same does get through (the test can fail)
        await opc.request(cmd, payload, timeout=2)
        assert target.state.epochs == 99
    assert not operator.errors


# --- the change journal: agents write their own records, observers read, operators remove


def forged(run: str, rank: str) -> Record:
    return Record(id="forged", run=run, rank=rank, target="all", verb="set", ts=0.0)


@pytest.mark.anyio
async def test_agents_write_and_replay_operators_read_schedule_and_forget(
    secured: NatsServer, creds: Credentials, run_id: str
) -> None:
    agent_url = url_for(secured, creds, "agent")
    async with await Client.connect(url_for(secured, creds, "operator"), by="op") as client:
        async with Agent(Cfg(), run=run_id, rank=0, url=agent_url) as rank:
            res = await client.set(run_id, 0, "epochs", 5)
            assert res.journaled is True  # the agent wrote it, the operator confirmed it
            rank.sync(1)
            sched = await client.set(run_id, "all", "epochs", 6, at_step=100)
            assert sched.journaled is True  # a run-wide record, written by the operator
        async with Agent(Cfg(), run=run_id, rank=0, url=agent_url) as again:
            assert again.state.epochs == 5  # read back with the agent's permissions
            assert [c.id for c in again.replay_report.replayed] == [res.change_id]
            assert again.replay_report.restored == [(sched.change_id, 100)]
        history = await client.history(run_id)
        assert {e.id for e in history} >= {res.change_id, sched.change_id}
        assert await client.forget_history(run_id) >= 3
        assert await client.history(run_id) == []


@pytest.mark.anyio
async def test_an_agent_cannot_write_run_wide_records_nor_remove_any(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    agent, anc = await login(logins, secured, creds, "agent")
    operator, onc = await login(logins, secured, creds, "operator")
    run_wide = journal_subject(run_id, "all", "forged")
    await anc.publish(run_wide, encode_record(forged(run_id, "all")))
    await agent.wait_violation("publish", run_wide)
    purge = f"$JS.API.STREAM.PURGE.{JOURNAL}"
    await anc.publish(purge, b"{}")
    await agent.wait_violation("publish", purge)
    # its own rank's record goes through, and the operator's run-wide one does
    js = anc.jetstream()
    async with Agent(Cfg(), run=run_id, rank=0, url=url_for(secured, creds, "agent")):
        pass  # creates the stream with the agent's rights
    await js.publish(journal_subject(run_id, 0, "own"), encode_record(forged(run_id, "0")))
    await onc.jetstream().publish(run_wide, encode_record(forged(run_id, "all")))
    await settle(anc, onc)
    stored = await read_journal(onc, run_id)
    assert sorted((rec.rank, rec.id) for _, rec in stored) == [("0", "forged"), ("all", "forged")]
    assert not operator.errors


@pytest.mark.anyio
async def test_observers_read_the_journal_and_change_nothing(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    operator_url = url_for(secured, creds, "operator")
    agent_url = url_for(secured, creds, "agent")
    async with (
        await Client.connect(operator_url) as client,
        Agent(Cfg(), run=run_id, rank=0, url=agent_url),
    ):
        res = await client.set(run_id, 0, "epochs", 7)
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(str(exc))

    observer = await nats.connect(
        f"nats://127.0.0.1:{secured.port}",
        inbox_prefix="_INBOX_observer",
        error_cb=error_cb,
        allow_reconnect=False,
        **creds.auth("observer"),
    )
    try:
        stored = await read_journal(observer, run_id)
        assert [rec.id for _, rec in stored] == [res.change_id]
        subject = journal_subject(run_id, 0, "forged")
        await observer.publish(subject, encode_record(forged(run_id, "0")))
        await observer.publish(f"$JS.API.STREAM.PURGE.{JOURNAL}", b"{}")
        await observer.flush()
        await until(lambda: len([e for e in errors if "permissions violation" in e.lower()]) == 2)
        async with await Client.connect(operator_url) as client:
            assert [e.id for e in await client.history(run_id)] == [res.change_id]
    finally:
        await observer.close()


@pytest.mark.anyio
async def test_agents_store_and_read_results_operators_delete_them(
    secured: NatsServer, creds: Credentials, run_id: str, logins: list[Login]
) -> None:
    """Step results in the object store: the agent login stores and reads them back, but
    cannot purge; the operator's forget deletes them; the observer reaches none of it."""
    blob = bytes(range(256)) * 2048  # 512 KiB of bytes: an object, not an inline result
    async with Agent(Cfg(), run=run_id, rank=0, url=url_for(secured, creds, "agent")) as a0:
        assert await a0.steps.adone("blob", 0, result=blob)
        entry = a0.steps._opened().lookup("0", a0.steps._sid("blob", 0, None))
        assert entry is not None and entry[1].artifact is not None
        assert await a0.steps.aresult("blob", 0) == blob  # read back through the agent login
    agent, anc = await login(logins, secured, creds, "agent")
    with pytest.raises(nats.errors.TimeoutError):
        await anc.request("$JS.API.STREAM.PURGE.OBJ_RUNCTL_ARTIFACTS", b"{}", timeout=0.5)
    await agent.wait_violation("publish", "$JS.API.STREAM.PURGE.OBJ_RUNCTL_ARTIFACTS")
    observer, obs = await login(logins, secured, creds, "observer")
    with pytest.raises(nats.errors.TimeoutError):
        await obs.request("$JS.API.STREAM.INFO.OBJ_RUNCTL_ARTIFACTS", b"", timeout=0.3)
    await observer.wait_violation("publish", "$JS.API.STREAM.INFO.OBJ_RUNCTL_ARTIFACTS")
    async with await Client.connect(url_for(secured, creds, "operator")) as client:
        store = await ArtifactStore.open(client.nc.jetstream(), create=False)
        assert len(await store.list(f"{run_id}/")) == 1
        report = await forget(client.nc, run_id, "blob")
        assert report.objects == 1
        assert await store.list(f"{run_id}/") == []


@pytest.mark.anyio
async def test_agents_sharing_a_connection_cannot_answer_broadcasts_under_these_accounts(
    secured: NatsServer, creds: Credentials, run_id: str
) -> None:
    """What the docs say of ``Agent(connection=...)``: runctl's agent user may answer a
    request only as ``allow_responses`` allows, and the server refuses the replies of agents
    that share one connection to a broadcast they both received; a request to one of them
    is answered. With a connection each, both answer the broadcast."""
    login = Login()
    shared = await login.connect(secured, creds, "agent")
    url = url_for(secured, creds, "agent")
    try:
        async with await Client.connect(url_for(secured, creds, "operator"), timeout=1) as client:
            async with (
                Agent(Cfg(), run=run_id, rank=0, connection=shared, replay=False),
                Agent(Cfg(), run=run_id, rank=1, connection=shared, replay=False),
            ):
                assert isinstance(await client.get(run_id, 1, fresh=True), Result)
                with pytest.raises(RunctlError):  # Timeout: no rank's reply got through
                    await client.get(run_id, "all", fresh=True)
                await until(lambda: login.violations("publish", "_INBOX"))
            async with (
                Agent(Cfg(), run=f"{run_id}-own", rank=0, url=url, replay=False),
                Agent(Cfg(), run=f"{run_id}-own", rank=1, url=url, replay=False),
            ):
                got = await client.get(f"{run_id}-own", "all", fresh=True)
                assert isinstance(got, Gathered) and sorted(got.results) == ["0", "1"]
    finally:
        await shared.close()
