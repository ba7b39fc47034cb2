"""Non-finite floats (a diverged loss: NaN, ±Infinity) through every path, against a real
nats-server, gateway and rank process.

The JSON form is the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (valid JSON for
every reader: jq, a browser, msgspec, any NATS client; docs/reliability.md says why). A
non-finite value is never shown as ``null``, round-trips exactly through set, patch,
reset, the registry, state messages, replies, HTTP, the CLI and the Python client, is
accepted only where the model accepts it, and never blocks a later, unrelated change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import msgspec
import nats
import pytest
from conftest import GatewayFactory, wait_for
from rankkit import ProgramRank, runctl_cli

from runctl.bus import messages as m
from runctl.bus.client import Client, Result

MODELS = """
from pydantic import BaseModel, Field

class Optimizer(BaseModel):
    lr: float = Field(0.1, gt=0)
    momentum: float = 0.9
    clip: float = Field(1.0, allow_inf_nan=False)

class Cfg(BaseModel):
    optimizer: Optimizer = Optimizer()
    loss: float = 0.0
    best: float | None = None
    metrics: dict[str, float] = {}
    extra: dict[str, object] = {}
"""
#: the program starts with a diverged loss: reset must bring NaN back, not null
INITIAL = "Cfg(loss=float('nan'))"
FIVE_THOUSAND_DIGITS = "1" + "0" * 4999


@pytest.fixture
def rank(nats_url: str, run_id: str) -> Iterator[ProgramRank]:
    with ProgramRank(MODELS, INITIAL, run=run_id, url=nats_url) as rank:
        yield rank


@pytest.fixture
def http(gateway: GatewayFactory) -> httpx.Client:
    return gateway()


def check_state(http: httpx.Client, run: str, path: list[str], shown: str) -> None:
    """Registry and fresh reads both show ``shown`` at ``path``; never null."""
    for fresh in (False, True):
        r = http.get(f"/runs/{run}/ranks/0/get", params={"fresh": str(fresh).lower()})
        assert r.status_code == 200, r.text
        node: Any = r.json()
        for part in path:
            node = node[part]
        assert node == shown, (fresh, r.text)
        assert r.json()["loss"] == "NaN", r.text  # the program's own NaN is kept too


def then_an_unrelated_change_applies(
    http: httpx.Client, run: str, field: str = "optimizer.clip"
) -> None:
    r = http.put(f"/runs/{run}/ranks/0/set/{field}", params={"value": "0.01"})
    assert r.status_code == 200, r.text
    r = http.patch(f"/runs/{run}/ranks/0/set", json={"metrics": {"acc": 0.5}})
    assert r.status_code == 200, r.text
    fresh = http.get(f"/runs/{run}/ranks/0/get", params={"fresh": "true"}).json()
    group, name = field.split(".")
    assert fresh[group][name] == 0.01 and fresh["metrics"]["acc"] == 0.5


def _put(field: str, value: str) -> Callable[[httpx.Client, str, str], None]:
    def send(h: httpx.Client, run: str, url: str) -> None:
        _ok(h.put(f"/runs/{run}/ranks/0/set/{field}", params={"value": value}))

    return send


MOMENTUM = ["optimizer", "momentum"]
POISON: list[tuple[str, Callable[[httpx.Client, str, str], None], list[str], str]] = [
    ("PUT ?value=NaN", _put("optimizer.momentum", "NaN"), MOMENTUM, "NaN"),
    ("PUT ?value=Infinity", _put("optimizer.momentum", "Infinity"), MOMENTUM, "Infinity"),
    ("PUT ?value=-Infinity", _put("optimizer.momentum", "-Infinity"), MOMENTUM, "-Infinity"),
    (
        'PATCH {"momentum": "-Infinity"}',
        lambda h, run, url: _ok(
            h.patch(f"/runs/{run}/ranks/0/set/optimizer", json={"momentum": "-Infinity"})
        ),
        MOMENTUM,
        "-Infinity",
    ),
    (
        "PATCH with the NaN token Python's json.dumps writes",
        lambda h, run, url: _ok(
            h.patch(
                f"/runs/{run}/ranks/0/set",
                content=json.dumps({"optimizer": {"momentum": float("nan")}}),
                headers={"Content-Type": "application/json"},
            )
        ),
        MOMENTUM,
        "NaN",
    ),
    (
        "runctl set R optimizer.momentum=NaN",
        lambda h, run, url: _cli_ok(runctl_cli("set", run, "optimizer.momentum=NaN", url=url)),
        MOMENTUM,
        "NaN",
    ),
    (
        "a 5000-digit integer on a float field with gt=0 (the model reads it as inf)",
        _put("optimizer.lr", FIVE_THOUSAND_DIGITS),
        ["optimizer", "lr"],
        "Infinity",
    ),
]


def _ok(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text


def _cli_ok(proc: Any) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("what", "send", "path", "shown"), POISON, ids=[p[0] for p in POISON])
def test_a_non_finite_value_round_trips_and_never_blocks_a_change(
    rank: ProgramRank,
    http: httpx.Client,
    nats_url: str,
    run_id: str,
    what: str,
    send: Callable[[httpx.Client, str, str], None],
    path: list[str],
    shown: str,
) -> None:
    send(http, run_id, nats_url)
    check_state(http, run_id, path, shown)
    then_an_unrelated_change_applies(http, run_id)
    check_state(http, run_id, path, shown)  # still there, exactly


def test_the_program_setting_nan_itself_never_blocks_the_operator(
    rank: ProgramRank, http: httpx.Client, run_id: str
) -> None:
    """The common case: the loss diverged, the program stored it; lowering the learning
    rate must still work."""
    rank.do("state.optimizer.momentum = float('nan'); state.best = float('-inf')")
    rank.do("state.extra['loss_history'] = [1.0, float('inf'), float('nan')]")

    def published() -> bool:
        r = http.get(f"/runs/{run_id}/ranks/0/get")
        return r.status_code == 200 and r.json()["optimizer"]["momentum"] == "NaN"

    wait_for(published, timeout=15)
    got = http.get(f"/runs/{run_id}/ranks/0/get").json()
    assert got["best"] == "-Infinity"  # an Optional float: never null for -inf
    assert got["extra"]["loss_history"] == [1.0, "Infinity", "NaN"]
    then_an_unrelated_change_applies(http, run_id, "optimizer.lr")  # lower the rate
    rank.do(
        "assert math.isnan(state.optimizer.momentum) and state.best == -math.inf "
        "and state.extra['loss_history'][1] == math.inf "
        "and math.isnan(state.extra['loss_history'][2]) and state.optimizer.lr == 0.01"
    )


def test_reset_restores_the_initial_nan(rank: ProgramRank, http: httpx.Client, run_id: str) -> None:
    assert (
        http.put(f"/runs/{run_id}/ranks/0/set/loss", params={"value": "1.5"}).status_code == 200
    ), "setup"
    r = http.delete(f"/runs/{run_id}/ranks/0/reset")
    assert r.status_code == 200, r.text
    assert r.json()["value"]["loss"] == "NaN"
    rank.do("assert math.isnan(state.loss)")


def test_non_finite_only_where_the_model_accepts_it(
    rank: ProgramRank, http: httpx.Client, run_id: str
) -> None:
    before = http.get(f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"}).content
    for value in ("NaN", "Infinity", "-Infinity"):
        r = http.put(f"/runs/{run_id}/ranks/0/set/optimizer.clip", params={"value": value})
        assert r.status_code == 422, r.text
        assert "finite" in r.text
    r = http.put(f"/runs/{run_id}/ranks/0/set/optimizer.lr", params={"value": "-Infinity"})
    assert r.status_code == 422, r.text  # gt=0
    after = http.get(f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"}).content
    assert after == before


def test_the_python_client_sends_and_reads_non_finite_values(
    rank: ProgramRank, nats_url: str, run_id: str
) -> None:
    async def main() -> None:
        async with await Client.connect(nats_url) as client:
            res = await client.set(run_id, 0, "optimizer.momentum", float("nan"))
            assert isinstance(res, Result)
            assert res.value["optimizer"]["momentum"] == "NaN"
            # an Optional float: NaN must never arrive as None
            res = await client.patch(run_id, 0, {"best": float("inf"), "metrics": {"x": -math.inf}})
            assert isinstance(res, Result)
            assert res.value["best"] == "Infinity" and res.value["metrics"]["x"] == "-Infinity"
            read = await client.get(run_id, 0)  # the registry
            assert isinstance(read, Result)
            assert read.value["best"] == "Infinity" and read.value["loss"] == "NaN"
            assert float(read.value["metrics"]["x"]) == -math.inf  # float() reads the form
            res = await client.set(run_id, 0, "optimizer.lr", 0.02)
            assert isinstance(res, Result) and res.value["optimizer"]["lr"] == 0.02

    anyio.run(main)
    rank.do(
        "assert math.isnan(state.optimizer.momentum) and state.best == math.inf "
        "and state.metrics['x'] == -math.inf"
    )


def test_state_messages_and_cli_show_the_json_form(
    rank: ProgramRank, http: httpx.Client, nats_url: str, run_id: str
) -> None:
    async def watch() -> m.StateMsg:
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.subscribe(f"runctl.{run_id}.0.state")
            r = await anyio.to_thread.run_sync(
                lambda: http.put(
                    f"/runs/{run_id}/ranks/0/set/optimizer.momentum", params={"value": "NaN"}
                )
            )
            assert r.status_code == 200, r.text
            while True:
                msg = await sub.next_msg(timeout=10)
                state = m.decode_state(msg.data)  # any reader (msgspec: strict JSON) decodes it
                if state.state["optimizer"]["momentum"] == "NaN":
                    return state
        finally:
            await nc.close()

    state = anyio.run(watch)
    assert state.state["loss"] == "NaN"
    out = runctl_cli("get", f"{run_id}/0", "optimizer.momentum", url=nats_url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == "NaN"
    out = runctl_cli("get", f"{run_id}/0", "optimizer.momentum", "--fresh", url=nats_url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == "NaN"
    assert msgspec.json.decode(http.get(f"/runs/{run_id}").content)  # the run listing too


def test_the_journal_keeps_and_undoes_non_finite_values(
    rank: ProgramRank, nats_url: str, run_id: str
) -> None:
    """History shows the JSON form, and undoing a change back to NaN restores NaN."""

    async def main() -> None:
        async with await Client.connect(nats_url) as client:
            await client.set(run_id, 0, "optimizer.momentum", "NaN")
            await client.set(run_id, 0, "optimizer.momentum", 0.5)
            entries = await client.history(run_id)
            latest = entries[0].ranks["0"]
            assert "NaN" in json.dumps(msgspec.to_builtins(latest)), latest
            await client.undo(run_id)
            res = await client.get(run_id, 0, "optimizer.momentum", fresh=True)
            assert isinstance(res, Result) and res.value == "NaN"

    anyio.run(main)
    rank.do("assert math.isnan(state.optimizer.momentum)")
