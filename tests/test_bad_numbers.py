"""One bad number must not become a lasting failure: non-finite numbers are refused at every
parameter (HTTP, CLI, the Python client, a raw command on the bus), and a registry record
that cannot be decoded is reported and skipped, never a 500 for the whole run.

Real nats-server, gateway and rank process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import anyio
import httpx
import msgspec
import nats
import pytest
from conftest import GatewayFactory
from rankkit import ProgramRank, runctl_cli

from runctl.bus import messages as m
from runctl.bus.client import Client
from runctl.bus.errors import BadRequest
from runctl.bus.registry import BUCKET, Registry
from runctl.bus.subjects import command_subject

MODELS = """
from pydantic import BaseModel

class Cfg(BaseModel):
    lr: float = 0.1
"""
NON_FINITE = ["inf", "Infinity", "-inf", "nan", "NaN", "1e999", "-1e999"]


@pytest.fixture
def rank(nats_url: str, run_id: str) -> Iterator[ProgramRank]:
    with ProgramRank(MODELS, "Cfg()", run=run_id, url=nats_url) as rank:
        yield rank


async def run_record(url: str, run: str) -> bytes | None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        try:
            return (await kv.get(f"{run}.all")).value
        except Exception:
            return None
    finally:
        await nc.close()


def test_stop_with_grace_inf_is_refused_and_writes_nothing(
    rank: ProgramRank, gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    http: httpx.Client = gateway()
    for grace in [*NON_FINITE, "0", "-5"]:
        # the request of the report
        r = http.post(f"/runs/{run_id}/ranks/all/stop?mode=terminate&grace={grace}")
        assert r.status_code == 422, (grace, r.text)
        assert "grace" in r.text
    assert anyio.run(run_record, nats_url, run_id) is None  # no run-wide stop recorded
    r = http.get(f"/runs/{run_id}")
    assert r.status_code == 200, r.text
    assert r.json()["ranks"][0]["stop_requested"] is False
    rank.do("assert not ctl.stop_requested")
    for margin in ("inf", "nan", "1e999"):
        r = http.post(f"/runs/{run_id}/ranks/all/stop", params={"sync": "true", "margin": margin})
        assert r.status_code == 422, (margin, r.text)


def test_cli_and_client_refuse_non_finite_numbers(
    rank: ProgramRank, nats_url: str, run_id: str
) -> None:
    for grace in ("inf", "nan", "-inf", "0"):
        out = runctl_cli("stop", run_id, "--terminate", "--grace", grace, url=nats_url)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "grace" in out.stderr, out.stderr
    for timeout in ("inf", "nan", "-1", "0"):
        out = runctl_cli("--timeout", timeout, "ls", url=nats_url)
        assert out.returncode == 2, out.stdout + out.stderr
        assert "timeout" in out.stderr, out.stderr

    async def client() -> None:
        async with await Client.connect(nats_url) as c:
            for grace in (math.inf, math.nan, -1.0, 0.0):
                with pytest.raises(BadRequest, match="grace"):
                    await c.stop(run_id, "all", mode="terminate", grace=grace)
                with pytest.raises(BadRequest, match="grace"):
                    await c.stop(run_id, 0, mode="terminate", grace=grace)

    anyio.run(client)
    assert anyio.run(run_record, nats_url, run_id) is None
    rank.do("assert not ctl.stop_requested")


def test_a_raw_stop_with_a_bad_grace_is_refused_by_the_rank(
    rank: ProgramRank, nats_url: str, run_id: str
) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_url)
        try:
            for grace in (b"1e999", b"-1", b"0", b"null", b'"NaN"'):
                payload = b'{"t":"stop/1","mode":"terminate","grace":' + grace + b"}"
                msg = await nc.request(command_subject(run_id, "0", "stop"), payload, timeout=5)
                reply = m.decode_reply(msg.data)
                assert isinstance(reply, m.Err) and reply.code == "bad_request", (grace, reply)
        finally:
            await nc.close()

    anyio.run(main)
    rank.do("assert not ctl.stop_requested")  # and it was never signalled: it answers


def test_an_undecodable_record_is_reported_and_skipped(
    rank: ProgramRank, gateway: GatewayFactory, nats_url: str, run_id: str
) -> None:
    """What the old bug left behind (a run-wide stop with ``grace: null``), a rank record
    that is not JSON, and one of another shape: the run still reads."""

    async def plant() -> None:
        nc = await nats.connect(nats_url)
        try:
            registry = await Registry.open(nc)
            bad_stop = {
                "t": "run/1",
                "run": run_id,
                "stop_requested": True,
                "reason": "",
                "ts": 1.0,
                "mode": "terminate",
                "grace": None,
            }
            await registry.kv.put(f"{run_id}.all", msgspec.json.encode(bad_stop))
            await registry.kv.put(f"{run_id}.7", b"not json {")
            await registry.kv.put(f"{run_id}.8", b'{"t":"rank/1","run":1}')
        finally:
            await nc.close()

    anyio.run(plant)
    http: httpx.Client = gateway()
    r = http.get(f"/runs/{run_id}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["rank"] for x in body["ranks"]] == ["0"]
    unreadable = {u["key"]: u for u in body["unreadable"]}
    assert set(unreadable) == {f"{run_id}.all", f"{run_id}.7", f"{run_id}.8"}, body
    assert all(u["error"] for u in unreadable.values())
    assert "run_record" not in body
    r = http.get("/runs")
    assert r.status_code == 200, r.text
    mine = [x for x in r.json()["runs"] if x["run"] == run_id]
    assert [x["rank"] for x in mine[0]["ranks"]] == ["0"]
    r = http.get(f"/runs/{run_id}/ranks/all/get")
    assert r.status_code == 200, r.text
    r = http.get(f"/runs/{run_id}/ranks/0/get")
    assert r.status_code == 200, r.text
    r = http.get(f"/runs/{run_id}/ranks/7/get")
    assert r.status_code == 502, r.text  # that one record is broken: said so, not a 500
    assert r.json()["error"] == "unreadable_record"
    out = runctl_cli("ls", run_id, url=nats_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{run_id}.7" in out.stdout + out.stderr
    # a correct stop replaces the bad record, and a later rank of the run obeys it
    r = http.post(f"/runs/{run_id}/ranks/all/stop?mode=terminate&grace=30")
    assert r.status_code == 200, r.text
    body = http.get(f"/runs/{run_id}").json()
    assert body["run_record"]["grace"] == 30.0
    assert {u["key"] for u in body["unreadable"]} == {f"{run_id}.7", f"{run_id}.8"}
