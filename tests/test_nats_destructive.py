"""No login but an unrestricted one can roll up, delete, purge or edit what runctl keeps on
JetStream, beyond what its role is for. Measured with the secured nats.conf on a real server.

Each role (agent, operator, observer) tries each destructive operation on each stream
(the registry bucket, the step log, the change journal, the recent states, the artifact
store): a publish with ``Nats-Rollup: all`` / ``sub``, a KV delete or purge marker on a
run-wide record, the purge, message-delete, update and delete APIs. Afterwards every
stream holds exactly what it held (messages, sequences, config). The only destructive
rights any role has are the operator's purges (forgetting steps, a run's history, a rank's
registry entry, a forgotten step's files: the gateway's admin actions), listed in
``ALLOWED`` and checked to work, so this test would see a purge that did nothing.

The report that started it: the agent login could wipe every key of the registry,
other runs' run-wide stops included, with
``js.publish("$KV.RUNCTL_RANKS.<run>.<rank>", b"{}", headers={"Nats-Rollup": "all"})``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from runctl.bus import messages as m
from runctl.bus.artifact_store import ArtifactStore
from runctl.bus.credentials import Credentials, NatsRole, ensure_credentials
from runctl.bus.journalstore import ensure_journal
from runctl.bus.registry import Registry
from runctl.bus.server import NatsServer
from runctl.bus.statestore import ensure_stream as ensure_states
from runctl.bus.steps.store import ensure_stream as ensure_steps

ROOT = Path(__file__).resolve().parent.parent
NATS_CONF = ROOT / "nats.conf"
RUN = "victim"
ROLES: tuple[NatsRole, ...] = ("agent", "operator", "observer")
#: stream -> a subject in it that the agent and the operator may publish to, and one run-wide
#: record nobody but the operator writes
STREAMS: dict[str, tuple[str, str]] = {
    "KV_RUNCTL_RANKS": (f"$KV.RUNCTL_RANKS.{RUN}.0", f"$KV.RUNCTL_RANKS.{RUN}.all"),
    "RUNCTL_STEPS": (f"runctl.{RUN}.0.done.epoch.k1", f"runctl.{RUN}.run.done.epoch.k1"),
    "RUNCTL_JOURNAL": (f"runctl.{RUN}.0.journal.j1", f"runctl.{RUN}.all.journal.j2"),
    "RUNCTL_STATES": (f"runctl.{RUN}.0.state", f"runctl.{RUN}.1.state"),
    "OBJ_RUNCTL_ARTIFACTS": ("$O.RUNCTL_ARTIFACTS.C.x", "$O.RUNCTL_ARTIFACTS.M.eA=="),
}
#: (role, operation, stream) that may change a stream: the operator's purges
ALLOWED = {
    ("operator", "purge", stream)
    for stream in ("KV_RUNCTL_RANKS", "RUNCTL_STEPS", "RUNCTL_JOURNAL", "OBJ_RUNCTL_ARTIFACTS")
}
#: where the second subject of STREAMS is a record the role does not own (may not write):
#: a rollup or a KV delete marker on it is tried too. Elsewhere the role may write that
#: record anyway (one login for every rank: docs/security.md, "Limits of a shared agent
#: login"), so replacing it is not destruction by another means.
NOT_OWNED = {
    ("agent", "KV_RUNCTL_RANKS"),  # <run>.all: a run-wide stop is a command
    ("agent", "RUNCTL_JOURNAL"),  # the journal's run-wide records
    *(("observer", stream) for stream in STREAMS),
}
ON_RECORDS = {"rollup sub", "kv delete", "kv purge"}


def start_secured(store: Path, creds: Credentials) -> NatsServer:
    server = NatsServer(config_file=NATS_CONF, store_dir=store, extra_args=("-m", "0"))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in creds.server_env().items():
            mp.setenv(key, value)
        return server.start()


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    return ensure_credentials(tmp_path / "credentials", env={})


@pytest.fixture
def secured(tmp_path: Path, creds: Credentials) -> Iterator[NatsServer]:
    server = start_secured(tmp_path / "nats", creds)
    yield server
    server.stop()


async def connect(server: NatsServer, creds: Credentials, role: NatsRole) -> NATS:
    async def quiet(exc: Exception) -> None:  # permission violations are expected here
        return None

    return await nats.connect(
        f"nats://127.0.0.1:{server.port}",
        error_cb=quiet,
        allow_reconnect=False,
        **creds.auth(role),
    )


@pytest.fixture
async def seeded(secured: NatsServer, creds: Credentials) -> AsyncIterator[NatsServer]:
    """Every stream, created by runctl's own code as a rank would, with records in it."""
    agent = await connect(secured, creds, "agent")
    operator = await connect(secured, creds, "operator")
    try:
        js = agent.jetstream()
        await ensure_steps(js)
        await ensure_journal(js)
        await ensure_states(js)
        registry = await Registry.open(agent)
        now = time.time()
        for rank in ("0", "1"):
            await registry.put(
                m.RankRecord(
                    run=RUN,
                    rank=rank,
                    host="h",
                    pid=1,
                    started=now,
                    heartbeat=now,
                    heartbeat_interval=1.0,
                    version=0,
                    state={},
                )
            )
        run_wide = m.RunRecord(run=RUN, stop_requested=True, ts=now)
        await (await Registry.open(operator)).put_run(run_wide)
        store = await ArtifactStore.open(js)
        await store.put_bytes("a1", b"x" * 1000, "bytes")
        for stream, (subject, other) in STREAMS.items():
            if not stream.startswith(("KV_", "OBJ_")):
                await js.publish(subject, b"{}")
                sender = operator if ".all." in other else agent
                await sender.jetstream().publish(other, b"{}")
        yield secured
    finally:
        await agent.close()
        await operator.close()


async def snapshot(nc: NATS) -> dict[str, Any]:
    js = nc.jetstream()
    out: dict[str, Any] = {}
    for stream in STREAMS:
        info = await js.stream_info(stream, subjects_filter=">")
        out[stream] = (
            info.state.messages,
            info.state.first_seq,
            info.state.last_seq,
            sorted((info.state.subjects or {}).items()),
            msgspec.json.encode(info.config.as_dict()),
        )
    return out


async def attempt(nc: NATS, op: str, stream: str) -> None:
    """One destructive try; a refusal (an error, a timeout) is not a failure here."""
    assert op in OPERATIONS, op
    subject, other = STREAMS[stream]
    js = nc.jetstream()
    try:
        with anyio.fail_after(2):
            if op == "rollup all":
                await js.publish(subject, b"{}", headers={"Nats-Rollup": "all"})
            elif op == "rollup sub":
                await js.publish(other, b"{}", headers={"Nats-Rollup": "sub"})
            elif op == "kv delete":
                await js.publish(other, b"", headers={"KV-Operation": "DEL"})
            elif op == "kv purge":
                headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub"}
                await js.publish(other, b"", headers=headers)
            elif op == "purge":
                await nc.request(f"$JS.API.STREAM.PURGE.{stream}", b"", timeout=0.5)
            elif op == "delete message":
                await nc.request(f"$JS.API.STREAM.MSG.DELETE.{stream}", b'{"seq": 1}', timeout=0.5)
            elif op == "edit":
                config = api.StreamConfig(name=stream, subjects=["runctl.edited.>"], max_msgs=1)
                payload = msgspec.json.encode(config.as_dict())
                await nc.request(f"$JS.API.STREAM.UPDATE.{stream}", payload, timeout=0.5)
            else:  # delete stream
                await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=0.5)
    except (Exception, TimeoutError):  # noqa: S110 - refused: what most of these must be
        pass


OPERATIONS = [
    "rollup all",
    "rollup sub",
    "kv delete",
    "kv purge",
    "purge",
    "delete message",
    "edit",
    "delete stream",
]


@pytest.mark.anyio
@pytest.mark.parametrize("role", ROLES)
async def test_no_role_can_wipe_or_edit_what_it_does_not_own(
    seeded: NatsServer, creds: Credentials, role: NatsRole
) -> None:
    watcher = await connect(seeded, creds, "agent")  # may read every stream's info
    nc = await connect(seeded, creds, role)
    changed: list[tuple[str, str]] = []
    try:
        before = await snapshot(watcher)
        for stream in STREAMS:
            for op in OPERATIONS:
                if (role, op, stream) in ALLOWED:
                    continue
                if op in ON_RECORDS and (role, stream) not in NOT_OWNED:
                    continue
                await attempt(nc, op, stream)
                await nc.flush()
                after = await snapshot(watcher)
                if after != before:
                    changed.append((op, stream))
                    before = after
        assert changed == [], f"{role} changed: {changed}"
    finally:
        await nc.close()
        await watcher.close()


@pytest.mark.anyio
async def test_the_reported_rollup_leaves_the_registry_whole(
    seeded: NatsServer, creds: Credentials
) -> None:
    agent = await connect(seeded, creds, "agent")
    try:
        with pytest.raises(Exception, match=r"(?i)rollup"):
            await agent.jetstream().publish(
                f"$KV.RUNCTL_RANKS.{RUN}.0", b"{}", headers={"Nats-Rollup": "all"}
            )
        registry = await Registry.open(agent)
        assert {r.rank for r in await registry.records(RUN)} == {"0", "1"}
        record = await registry.get_run(RUN)
        assert record is not None and record.stop_requested
    finally:
        await agent.close()


@pytest.mark.anyio
async def test_the_operators_purges_work(seeded: NatsServer, creds: Credentials) -> None:
    """What ALLOWED leaves out is a right the product uses: it must do what it says."""
    operator = await connect(seeded, creds, "operator")
    try:
        registry = await Registry.open(operator)
        await registry.delete(RUN, "1")  # forget a rank
        assert {r.rank for r in await registry.records(RUN)} == {"0"}
        js = operator.jetstream()
        for stream in ("RUNCTL_STEPS", "RUNCTL_JOURNAL", "OBJ_RUNCTL_ARTIFACTS"):
            await js.purge_stream(stream)
            assert (await js.stream_info(stream)).state.messages == 0, stream
    finally:
        await operator.close()
