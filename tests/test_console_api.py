"""What the console reads, over real HTTP, NATS and rank processes (no browser here; see
test_console_browser.py): the state history the bus keeps, the live bridge and its end,
the pages with their headers, the shipped static files, and /whoami."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from conftest import GatewayFactory, spawn_python, wait_for
from nats.js import api

from runctl.bus import statestore
from runctl.bus.server import NatsServer
from runctl.gateway.auth import parse_env
from runctl.gateway.console import STATIC_DIR, UPLOT_VERSION
from runctl.gateway.series import _every, numbers

ROOT = Path(__file__).resolve().parent.parent
READ = "read-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"

PROGRAM = """
    import os, sys, time
    from typing import Literal
    from pydantic import BaseModel, Field
    from runctl import control

    class Opt(BaseModel):
        kind: Literal["sgd", "adam"] = "sgd"
        lr: float = Field(0.01, gt=0, le=1)

    class S(BaseModel):
        opt: Opt = Opt()
        loss: float = 2.0
        tags: list[float] = [1.0, 2.0]
        verbose: bool = False

    state = S()
    ctl = control(state, heartbeat=0.2).wait_ready()
    print("READY", flush=True)
    step = 0
    while not ctl.stop_requested:
        ctl.sync(step)
        with ctl.lock:
            state.loss = round(2.0 / (1 + step * 0.05), 4)
        step += 1
        time.sleep(0.02)
    print("STOPPED", flush=True)
    ctl.close()
"""


def start_rank(run: str, url: str, rank: int = 0) -> subprocess.Popen[str]:
    proc = spawn_python(
        textwrap.dedent(PROGRAM),
        env={"RUNCTL_RUN": run, "RUNCTL_RANK": str(rank), "RUNCTL_NATS_URL": url},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "READY" in line:
            return proc
    proc.kill()
    raise AssertionError(f"rank {rank} did not start: {proc.communicate()}")


@pytest.fixture
def ranks(nats_url: str, run_id: str) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [start_rank(run_id, nats_url, rank) for rank in range(2)]
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


# --- the numbers of a state ---------------------------------------------------------------


def test_numbers_walk_objects_not_lists_and_keep_gaps() -> None:
    state = {
        "opt": {"lr": 0.1, "kind": "sgd", "betas": [0.9, 0.99], "deep": {"x": 3}},
        "loss": float("nan"),
        "grad_norm": "Infinity",  # how the bus writes a non-finite float
        "label": "NaN-free",
        "flag": True,
        "big": 10**400,
        "huge_int": 2**60,
        "name": None,
    }
    assert numbers(state) == {
        "opt.lr": 0.1,
        "opt.deep.x": 3,
        "loss": None,  # a gap, not a crash
        "grad_norm": None,
        "big": None,  # no double can hold it
        "huge_int": float(2**60),  # beyond what a JavaScript number holds exactly
    }
    assert len(numbers({f"f{i}": i for i in range(500)})) == 64


def test_the_lazy_view_reads_every_field_of_a_state_message() -> None:
    from runctl.bus.messages import StateMsg
    from runctl.gateway.series import StateView

    assert StateView.__struct_fields__ == StateMsg.__struct_fields__


def test_thinning_keeps_the_newest_point() -> None:
    assert _every(10, 20) is None
    keep = _every(10_000, 100)
    assert keep is not None and len(keep) == 100 and keep[0] == 0 and keep[-1] == 9_999


# --- the history the bus keeps --------------------------------------------------------------


def test_series_come_from_the_bus_even_from_before_the_gateway_started(
    nats_url: str, run_id: str, ranks: list[subprocess.Popen[str]], gateway: GatewayFactory
) -> None:
    async def stored(rank: str) -> int:
        nc = await nats.connect(nats_url)
        try:
            got = await statestore.read_states(nc, run_id, since=0)
        finally:
            await nc.close()
        return sum(1 for p in got.payloads if json.loads(p)["rank"] == rank)

    wait_for(lambda: min(anyio.run(stored, "0"), anyio.run(stored, "1")) >= 6, timeout=20)
    http = gateway()  # started after the points were published: it keeps nothing itself
    body = http.get(f"/runs/{run_id}/series", params={"since": 600}).json()
    assert body["available"] is True and body["sampled"] is False
    assert set(body["ranks"]) == {"0", "1"}
    rank0 = body["ranks"]["0"]
    assert len(rank0["t"]) >= 6 and rank0["t"] == sorted(rank0["t"])
    assert set(rank0["fields"]) == {"opt.lr", "loss"}  # no list, no bool, no string
    assert all(len(col) == len(rank0["t"]) for col in rank0["fields"].values())
    assert rank0["fields"]["loss"][-1] < rank0["fields"]["loss"][0]  # the curve moves
    assert max(rank0["step_rate"]) > 0 and rank0["step"][-1] > 0
    one = http.get(f"/runs/{run_id}/series", params={"rank": "1", "points": 3}).json()
    assert set(one["ranks"]) == {"1"} and len(one["ranks"]["1"]["t"]) == 3
    for bad in ({"since": 0}, {"since": 10**9}, {"rank": "a.b"}, {"points": 1}):
        assert http.get(f"/runs/{run_id}/series", params=bad).status_code in (400, 422), bad
    assert http.get("/runs/bad.run/series").status_code == 400


@pytest.mark.anyio
async def test_the_stream_is_created_once_and_keeps_an_operators_limits() -> None:
    server = NatsServer().start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        empty = await statestore.read_states(nc, "r", since=0)
        assert not empty.available and not empty.payloads
        await js.add_stream(
            api.StreamConfig(
                name=statestore.STREAM,
                subjects=["runctl.*.*.state"],
                max_age=60.0,
                max_bytes=1 << 20,
            )
        )
        await statestore.ensure_stream(js)  # exists with other limits: left alone
        info = await js.stream_info(statestore.STREAM)
        assert info.config.max_age == 60.0 and info.config.max_bytes == 1 << 20
        await js.delete_stream(statestore.STREAM)
        await statestore.ensure_stream(js)
        await statestore.ensure_stream(js)  # twice: the same config is accepted
        info = await js.stream_info(statestore.STREAM)
        assert info.config.max_age == statestore.MAX_AGE
        assert info.config.max_msgs_per_subject == statestore.MAX_PER_RANK
        await nc.close()
    finally:
        server.stop()


# --- the live bridge ------------------------------------------------------------------------


def read_events(lines: Iterator[str], wanted: Any, limit: int = 2000) -> list[dict[str, Any]]:
    """Server-sent events until ``wanted(events)`` holds (bounded by ``limit`` lines)."""
    events: list[dict[str, Any]] = []
    kind = ""
    for n, line in enumerate(lines):
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append({"event": kind, **json.loads(line[6:])})
            if wanted(events):
                return events
        assert n < limit, events[-5:]
    raise AssertionError(f"the stream ended: {events[-5:]}")


async def has_listener(url: str, subject: str) -> bool:
    """Whether something that never answers (a bridge) subscribes to ``subject``: a request
    to a subject nobody subscribes gets the server's no-responders answer at once."""
    nc = await nats.connect(url)
    try:
        await nc.request(subject, b"", timeout=0.5)
    except nats.errors.NoRespondersError:
        return False
    except nats.errors.TimeoutError:
        return True
    finally:
        await nc.close()
    return False  # answered: a stream capturing the subject, not a bridge


def test_the_live_bridge_follows_the_run_and_ends_with_the_page(
    nats_url: str, run_id: str, ranks: list[subprocess.Popen[str]], gateway: GatewayFactory
) -> None:
    http = gateway()
    probe = f"runctl.{run_id}.probe.evt.probe"  # no agent publishes or subscribes here
    assert not anyio.run(has_listener, nats_url, probe)
    with http.stream("GET", f"/runs/{run_id}/live") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        lines = stream.iter_lines()
        seen = read_events(
            lines, lambda e: len({x.get("rank") for x in e if x["event"] == "state"}) == 2
        )
        assert seen[0]["event"] == "hello" and seen[0]["stale_after_beats"] == 3
        first = next(x for x in seen if x["event"] == "state")
        assert {"opt.lr", "loss"} <= set(first["numbers"]) and first["state"]["opt"][
            "kind"
        ] == "sgd"
        assert first["age"] >= 0 and "step_rate" in first
        assert anyio.run(has_listener, nats_url, probe)  # the bridge listens on the bus
        r = http.patch(f"/runs/{run_id}/ranks/1/set", json={"opt": {"kind": "adam"}})
        assert r.status_code == 200

        def adam(x: dict[str, Any]) -> bool:
            return bool(
                x["event"] == "state" and x.get("state", {}).get("opt", {}).get("kind") == "adam"
            )

        def patched(x: dict[str, Any]) -> bool:
            return bool(x["event"] == "event" and x["kind"] == "patch")

        changed = read_events(lines, lambda e: any(map(adam, e)) and any(map(patched, e)))
        assert {x["rank"] for x in changed if adam(x) or patched(x)} == {"1"}
    # the page went away: the gateway's subscriptions go with it
    wait_for(lambda: not anyio.run(has_listener, nats_url, probe), timeout=15)


def test_every_runs_bridge_sends_no_states(
    run_id: str, ranks: list[subprocess.Popen[str]], gateway: GatewayFactory
) -> None:
    http = gateway()
    with http.stream("GET", "/live") as stream:
        seen = read_events(
            stream.iter_lines(),
            lambda e: any(x["event"] == "state" and x["run"] == run_id for x in e),
        )
    mine = next(x for x in seen if x["event"] == "state" and x["run"] == run_id)
    assert "state" not in mine and "numbers" not in mine and mine["version"] >= 0


# --- pages, static files, roles -------------------------------------------------------------


def test_pages_have_stable_urls_and_refuse_to_be_framed(gateway: GatewayFactory) -> None:
    http = gateway()
    for path in ("/", "/console", "/console/exp1", "/console/exp1/0"):
        r = http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert '<script type="module" src="/static/js/main.js"' in r.text
    assert http.get("/console/bad.run").status_code == 400
    assert http.get("/runs/bad.run/live").status_code == 400
    assert http.get("/console/exp1/all").status_code == 400
    js = http.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert f"(v{UPLOT_VERSION})" in js.text[:200]
    assert "MIT License" in http.get("/static/vendor/uplot/LICENSE").text
    assert http.get("/static/../app.py").status_code == 404


def test_the_wheel_ships_every_static_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["runctl.gateway"]
    files = [
        p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()
    ]
    assert {"static/js/main.js", "static/vendor/uplot/LICENSE"} <= set(files)
    for name in files:
        assert any(fnmatch(name, g) for g in globs), name


def test_whoami_tells_the_page_its_role(gateway: GatewayFactory) -> None:
    assert gateway().get("/whoami").json() == {"role": "admin", "tokens": False}
    http = gateway(tokens=parse_env(f"read:{READ},admin:{ADMIN}"))
    assert http.get("/whoami").status_code == 401
    assert http.get("/whoami", headers={"Authorization": "Bearer nope"}).status_code == 401
    auth = {"Authorization": f"Bearer {READ}"}
    assert http.get("/whoami", headers=auth).json() == {"role": "read", "tokens": True}
    assert http.get("/live", headers={}).status_code == 401
    # a token in a cookie or the query is not a token: bearer only
    assert http.get("/whoami", params={"token": READ}).status_code == 401
    http.cookies.set("Authorization", f"Bearer {READ}")
    assert http.get("/whoami").status_code == 401


def test_a_long_window_is_read_as_evenly_spread_samples(nats_url: str, run_id: str) -> None:
    async def publish_and_read() -> tuple[statestore.StoredStates, statestore.StoredStates]:
        from runctl.bus import messages as m

        nc = await nats.connect(nats_url)
        try:
            await statestore.ensure_stream(nc.jetstream())
            since = time.time() - 60
            for i in range(160):
                for rank in ("0", "1"):
                    msg = m.StateMsg(run=run_id, rank=rank, version=i, ts=time.time(), state={})
                    await nc.publish(f"runctl.{run_id}.{rank}.state", m.encode(msg))
            await nc.flush()
            whole = statestore.StoredStates(run_id)
            with anyio.fail_after(10):
                while whole.matching < 320:
                    whole = await statestore.read_states(nc, run_id, since=since)
            return whole, await statestore.read_states(nc, run_id, since=since, limit=40)
        finally:
            await nc.close()

    whole, sampled = anyio.run(publish_and_read)
    assert not whole.sampled and whole.matching == 320
    assert sampled.sampled and sampled.matching == 320 and len(sampled.payloads) <= 42
    seen = [(json.loads(p)["rank"], json.loads(p)["version"]) for p in sampled.payloads]
    for rank in ("0", "1"):
        versions = [v for r, v in seen if r == rank]
        assert versions == sorted(versions)  # oldest first
        assert versions[0] == 0 and versions[-1] == 159  # from the start of the window to now
        assert len({v // 20 for v in versions}) >= 6  # and spread along it, not one clump


def test_a_large_state_is_announced_not_streamed(
    nats_url: str, run_id: str, gateway: GatewayFactory
) -> None:
    from pydantic import BaseModel

    from runctl import control

    class Big(BaseModel):
        blob: str = "x" * (300 << 10)  # over what the bridge inlines
        loss: float = 1.5

    http = gateway()
    with control(Big(), run=run_id, url=nats_url, heartbeat=0.2) as ctl:
        ctl.wait_ready()
        with http.stream("GET", f"/runs/{run_id}/live") as stream:
            seen = read_events(
                stream.iter_lines(), lambda e: sum(x["event"] == "state" for x in e) >= 3
            )
    states = [x for x in seen if x["event"] == "state"]
    assert all("state" not in x and x["numbers"] == {"loss": 1.5} for x in states)
    # said once per version (the page then reads it with GET .../get if it shows it)
    assert [x.get("state_omitted", False) for x in states] == [True] + [False] * (len(states) - 1)
