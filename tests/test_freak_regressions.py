"""Regression tests for every measured defect of Freak, the tool runctl replaces.

One test per defect, named after it, through the real bus and the real client (not only
LiveState): what Freak got wrong must stay right here.
"""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import msgspec
import nats
import pydantic
import pytest
from pydantic import BaseModel, Field, PrivateAttr, computed_field, model_validator

from runctl.agent import Control, control
from runctl.bus import (
    BadPath,
    Client,
    PayloadTooLarge,
    Result,
    Unavailable,
    ValidationRejected,
)
from runctl.bus import messages as m
from runctl.bus.server import NatsServer
from runctl.bus.subjects import command_subject


class Optimizer(BaseModel):
    lr: Annotated[float, Field(gt=0)] = 0.1
    momentum: float = 0.9
    kind: Literal["sgd", "adam"] = "sgd"


class Config(BaseModel):
    epochs: int = 3
    seed: int | None = None
    optimizer: Optimizer = Optimizer()

    MAX_EPOCHS: ClassVar[int] = 100
    _cache: str = PrivateAttr("hidden-value")

    @model_validator(mode="after")
    def _bounded(self) -> Config:
        if self.epochs > self.MAX_EPOCHS:
            raise ValueError("too many epochs")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def steps(self) -> int:
        return self.epochs * 10


@pytest.fixture
def ctl(nats_url: str, run_id: str) -> Iterator[Control[Config]]:
    with control(Config(), run=run_id, rank=0, url=nats_url) as handle:
        handle.wait_ready()
        yield handle


def one(result: object) -> Result:
    assert isinstance(result, Result)
    return result


@pytest.mark.anyio
async def test_works_with_pydantic_v2(ctl: Control[Config], nats_url: str, run_id: str) -> None:
    """Freak used pydantic v1 APIs and broke on v2."""
    assert pydantic.VERSION.startswith("2.")
    async with await Client.connect(nats_url) as client:
        res = one(await client.set(run_id, 0, "epochs", 7))
        assert res.changed and ctl.state.epochs == 7
        assert res.value["steps"] == 70  # a v2 computed field, recomputed
        with pytest.raises(ValidationRejected) as info:  # a v2 model_validator
            await client.set(run_id, 0, "epochs", 101)
        assert "too many epochs" in info.value.errors[0]["msg"]
        assert await client.schema(run_id, 0) == Config.model_json_schema()
    assert ctl.state.epochs == 7


@pytest.mark.anyio
async def test_literal_field_rejects_any_other_string(
    ctl: Control[Config], nats_url: str, run_id: str
) -> None:
    """Freak accepted any string for a Literal field."""
    async with await Client.connect(nats_url) as client:
        for bad in ("rmsprop", "SGD", "adam ", ""):
            with pytest.raises(ValidationRejected) as info:
                await client.set(run_id, 0, "optimizer.kind", bad)
            assert info.value.errors[0]["type"] == "literal_error"
            assert info.value.errors[0]["loc"] == ["optimizer", "kind"]
        assert ctl.state.optimizer.kind == "sgd" and ctl.version == 0
        assert one(await client.get(run_id, 0, "optimizer.kind")).value == "sgd"
        assert one(await client.set(run_id, 0, "optimizer.kind", "adam")).changed


@pytest.mark.anyio
async def test_optional_int_that_is_none_can_be_set_to_an_int(
    ctl: Control[Config], nats_url: str, run_id: str
) -> None:
    """Freak inferred the type from the current value (None) and refused an int."""
    assert ctl.state.seed is None
    async with await Client.connect(nats_url) as client:
        assert one(await client.set(run_id, 0, "seed", 1234)).changed
        assert ctl.state.seed == 1234 and isinstance(ctl.state.seed, int)
        assert one(await client.patch(run_id, 0, {"seed": None})).changed
        assert ctl.state.seed is None
        with pytest.raises(ValidationRejected):
            await client.set(run_id, 0, "seed", "not a number")


@pytest.mark.anyio
async def test_root_patch_with_partial_nested_model_keeps_siblings(
    ctl: Control[Config], nats_url: str, run_id: str
) -> None:
    """Freak's root PATCH replaced a nested model with only the keys it was given."""
    async with await Client.connect(nats_url) as client:
        # every sibling away from its default first: a shallow merge would bring one back
        await client.set(run_id, 0, "optimizer.kind", "adam")
        await client.set(run_id, 0, "optimizer.momentum", 0.5)
        await client.set(run_id, 0, "epochs", 7)
        res = one(await client.patch(run_id, 0, {"optimizer": {"lr": 0.5}}))
        assert res.value["optimizer"] == {"lr": 0.5, "momentum": 0.5, "kind": "adam"}
    assert ctl.state.optimizer.model_dump() == {"lr": 0.5, "momentum": 0.5, "kind": "adam"}
    assert ctl.state.epochs == 7


@pytest.mark.anyio
async def test_held_references_to_nested_models_see_new_values(
    ctl: Control[Config], nats_url: str, run_id: str
) -> None:
    """Freak replaced nested model objects, so ``opt = state.optimizer`` went stale."""
    opt = ctl.state.optimizer
    async with await Client.connect(nats_url) as client:
        await client.patch(run_id, 0, {"optimizer": {"lr": 0.01}})
        assert opt.lr == 0.01
        await client.set(run_id, 0, "optimizer", {"lr": 0.02, "kind": "adam"})
        assert (opt.lr, opt.kind) == (0.02, "adam")
        await client.reset(run_id, 0)
        assert (opt.lr, opt.kind) == (0.1, "sgd")
    assert ctl.state.optimizer is opt


@pytest.mark.anyio
@pytest.mark.parametrize(
    "path",
    [
        "__dict__",
        "optimizer.__dict__",
        "_cache",
        "__pydantic_private__",
        "MAX_EPOCHS",
        "__class__",
        "model_config",
        "optimizer.__class__.__init__",
    ],
)
async def test_get_from_path_refuses_dunder_dict_private_attributes_and_class_variables(
    ctl: Control[Config], nats_url: str, run_id: str, path: str
) -> None:
    """Freak resolved paths with getattr: ``__dict__`` leaked private data."""
    async with await Client.connect(nats_url) as client:
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: client.get(run_id, 0, path, fresh=True),
            lambda: client.get(run_id, 0, path),
            lambda: client.set(run_id, 0, path, 1),
            lambda: client.patch(run_id, 0, {"x": 1}, path=path),
        ]
        for call in calls:
            with pytest.raises(BadPath) as info:
                await call()
            assert path in str(info.value)
            assert "hidden-value" not in str(info.value)  # the private value never leaks
    assert Config.MAX_EPOCHS == 100 and ctl.state._cache == "hidden-value"
    assert ctl.version == 0


@pytest.fixture
def mute_tcp_server() -> Iterator[int]:
    """A TCP server that accepts connections and never says a word (not NATS)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    srv.close()


def test_port_in_use_does_not_hang_control(
    mute_tcp_server: int, monkeypatch: pytest.MonkeyPatch, run_id: str
) -> None:
    """Freak blocked the program forever when its port was taken by something else."""
    url = f"nats://127.0.0.1:{mute_tcp_server}"
    monkeypatch.setenv("RUNCTL_NATS_URL", url)
    state = Config()
    ctl = control(state, run=run_id, rank=0)  # returns at once: the agent thread connects
    try:
        assert ctl.url == url
        state.epochs = 4  # the program carries on
        assert not ctl.stop_requested and ctl.version == 0
        with pytest.raises(Unavailable) as info:
            ctl.wait_ready(timeout=0.5)  # reports instead of hanging
        assert url in str(info.value)
        assert not ctl.agent.ready.is_set()
    finally:
        ctl.close()
    assert ctl.agent.closed.is_set()
    # close() ended the connecting agent itself, rather than waiting out its timeout and
    # then cancelling it (which left a half-open socket behind)
    assert ctl._future.done() and not ctl._future.cancelled()
    assert ctl._future.exception() is None
    gc.collect()  # a leaked socket would warn here (warnings are errors)


@pytest.fixture
def big_payload_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A server that lets a 10 MB message through, so the agent itself must refuse it."""
    conf = tmp_path / "big.conf"
    conf.write_text("max_payload: 16MB\nmax_pending: 64MB\n")
    server = NatsServer(config_file=conf, store_dir=tmp_path / "nats").start()
    yield server
    server.stop()


TEN_MB = 10 * 1024 * 1024


@pytest.mark.anyio
async def test_ten_megabyte_invalid_body_is_not_echoed_back(
    big_payload_server: NatsServer, run_id: str
) -> None:
    """Freak put the whole rejected body into its error reply."""
    url = big_payload_server.url
    body = "9" * TEN_MB + "x"  # not an int
    state = Config()
    # default agent limit (1 MiB): refused as too large, not echoed
    with control(state, run=run_id, rank=0, url=url) as ctl:
        ctl.wait_ready()
        nc = await nats.connect(url)
        try:
            raw = await nc.request(
                command_subject(run_id, 0, "set"),
                m.encode(m.Set(path="epochs", value=body)),
                timeout=10,
            )
        finally:
            await nc.close()
        assert len(raw.data) < 1_000
        reply = m.decode_reply(raw.data)
        assert isinstance(reply, m.Err) and reply.code == "too_large" and reply.detail == []
        async with await Client.connect(url, max_payload=16 << 20, timeout=10) as client:
            with pytest.raises(PayloadTooLarge) as too_large:
                await client.set(run_id, 0, "epochs", body)
            assert len(str(too_large.value)) < 200
        # and the client's own limit refuses it before sending
        async with await Client.connect(url) as client:
            with pytest.raises(PayloadTooLarge):
                await client.set(run_id, 0, "epochs", body)
    assert state.epochs == 3

    # an agent that accepts big commands: validation refuses it, and does not echo it
    with control(state, run=run_id, rank=1, url=url, max_payload=16 << 20) as ctl:
        ctl.wait_ready()
        nc = await nats.connect(url)
        try:
            raw = await nc.request(
                command_subject(run_id, 1, "set"),
                m.encode(m.Set(path="epochs", value=body)),
                timeout=10,
            )
        finally:
            await nc.close()
        assert len(raw.data) < 2_000
        reply = m.decode_reply(raw.data)
        assert isinstance(reply, m.Err) and reply.code == "validation"
        assert len(reply.message) < 200
        assert len(msgspec.json.encode(reply.detail)) < 1_000
        async with await Client.connect(url, max_payload=16 << 20, timeout=10) as client:
            with pytest.raises(ValidationRejected) as rejected:
                await client.patch(run_id, 1, {"optimizer": {"kind": body}})
            assert len(str(rejected.value)) < 200
            assert len(msgspec.json.encode(rejected.value.errors)) < 1_000
    assert state.epochs == 3 and state.optimizer.kind == "sgd"
