# ruff: noqa: PT003, UP006, UP035 - Freak's tests as Freak wrote them
"""Freak's own test suite (freak 0.0.2, tests/test_freak.py), ported to runctl.

The five tests and their assertions are Freak's, unchanged. What differs is the fixture:
Freak mounted its routes on a FastAPI app and called it in-process (TestClient); here the
state gets the one line, ``control(state)``, with nothing configured, and the client is
plain HTTP to the gateway it brought up, through Freak's root routes (which act on the
only live run). The embedded ports are moved to free ones: 4222 and 4444 may be taken on
this machine.

Freak's tests call pydantic v1's ``.json()`` and ``.copy()``, deprecated in pydantic v2:
their warnings are allowed here, as Freak's users' code would raise them too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import List, Tuple

import httpx
import pytest
from conftest import free_port
from pydantic import BaseModel
from pydantic.warnings import PydanticDeprecatedSince20

from runctl import control

pytestmark = pytest.mark.filterwarnings(
    f"ignore::{PydanticDeprecatedSince20.__module__}.{PydanticDeprecatedSince20.__name__}"
)


class TestClient(httpx.Client):
    """Freak's tests call FastAPI's TestClient; here it is HTTP to the real gateway."""

    __test__ = False


class Head(BaseModel):
    activation: str = "relu"


class Model(BaseModel):
    hidden_dim: List[int] = [128, 256, 512]
    head: Head = Head()


class Checkpoints(BaseModel):
    every_epochs: int = 2
    save_dir: str = "checkpoints"


class State(BaseModel):
    lr: float = 1e-3
    checkpoints: Checkpoints = Checkpoints()
    model: Model = Model()


@pytest.fixture(scope="function")
def state() -> State:
    return State()


@pytest.fixture(scope="function")
def state_and_client(
    state: State, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Tuple[State, TestClient]]:
    for key in ("RUNCTL_NATS_URL", "RUNCTL_RUN", "RUNCTL_RANK", "RUNCTL_GATEWAY"):
        monkeypatch.delenv(key, raising=False)
    gateway_port = free_port()
    monkeypatch.setenv("RUNCTL_NATS_PORT", str(free_port()))
    monkeypatch.setenv("RUNCTL_GATEWAY_PORT", str(gateway_port))
    monkeypatch.chdir(tmp_path)  # the embedded server's store: ./.runctl

    ctl = control(state)  # Freak: control(state, app, serve=False)
    ctl.wait_ready(40)
    url, why_not = ctl.agent.lease.gateway() if ctl.agent.lease else (None, "no lease")
    assert url is not None, why_not
    client = TestClient(base_url=url, timeout=20)
    try:
        yield state, client
    finally:
        client.close()
        ctl.close()


def test_full_state(state_and_client: Tuple[State, TestClient]):
    state, client = state_and_client
    init_state = state.copy(deep=True)
    assert json.loads(state.json()) == client.get("/get").json()

    # let's test these references will still work
    # after we update the upper objects
    def get_lr():
        return state.lr

    def get_activation():
        return state.model.head.activation

    assert get_lr() == 0.001
    assert get_activation() == "relu"

    new_state = State(
        lr=2.0,
        model=Model(hidden_dim=[256, 512, 1024], head=Head(activation="sigmoid")),
    )

    resp = client.patch("/set", json=json.loads(new_state.json()))
    assert resp.status_code == 200
    assert json.loads(new_state.json()) == json.loads(state.json())

    assert get_lr() == 2.0
    assert get_activation() == "sigmoid"

    resp = client.patch("/set", json=json.loads(init_state.json()))
    assert resp.status_code == 200
    assert json.loads(init_state.json()) == json.loads(state.json())


def test_simple_types(state_and_client: Tuple[State, TestClient]):
    state, client = state_and_client
    assert state.lr == float(client.get("/get/lr").text)
    assert state.lr == client.get("/get_from_path?path=lr").json()

    resp = client.put("/set/lr?value=2.0")
    assert resp.status_code == 200
    assert state.lr == 2.0


def test_pydantic_types_full_update(state_and_client: Tuple[State, TestClient]):
    state, client = state_and_client

    assert (
        json.loads(state.checkpoints.json()) == client.get("/get_from_path?path=checkpoints").json()
    )

    resp = client.patch("/set/checkpoints", json={"every_epochs": 3, "save_dir": "other_dir"})
    assert resp.status_code == 200
    assert state.checkpoints.every_epochs == 3
    assert state.checkpoints.save_dir == "other_dir"


def test_pydantic_types_partial_update(state_and_client: Tuple[State, TestClient]):
    state, client = state_and_client

    assert (
        json.loads(state.checkpoints.json()) == client.get("/get_from_path?path=checkpoints").json()
    )

    resp = client.patch("/set/checkpoints", json={"every_epochs": 3})
    assert resp.status_code == 200
    assert state.checkpoints.every_epochs == 3
    assert state.checkpoints.save_dir == "checkpoints"

    # check the update doesn't revert other fields to default values
    resp = client.patch("/set/checkpoints", json={"save_dir": "other_dir"})
    assert resp.status_code == 200
    assert state.checkpoints.every_epochs == 3
    assert state.checkpoints.save_dir == "other_dir"

    # check the inner field update doesn't affect outer fields
    resp = client.patch("/set/model", json={"hidden_dim": [256, 512, 1024]})
    assert resp.status_code == 200
    assert state.model.hidden_dim == [256, 512, 1024]

    assert state.model.head.activation == "relu"
    resp = client.patch("/set/model/head", json={"activation": "sigmoid"})
    assert resp.status_code == 200
    resp = client.put("/set/lr?value=10.")
    assert resp.status_code == 200
    assert state.model.head.activation == "sigmoid"
    assert state.model.hidden_dim == [256, 512, 1024]
    assert state.lr == 10.0
    resp = client.put("/set/model/head/activation?value=silu")
    assert resp.status_code == 200
    assert state.model.head.activation == "silu"
    assert state.model.hidden_dim == [256, 512, 1024]


def test_reset(state_and_client: Tuple[State, TestClient]):
    state, client = state_and_client
    init_state = state.copy(deep=True)
    new_state = State(
        lr=2.0,
        model=Model(hidden_dim=[256, 512, 1024], head=Head(activation="sigmoid")),
    )

    client.patch("/set", json=json.loads(new_state.json()))
    assert state != init_state
    resp = client.delete("/reset")
    assert resp.status_code == 200
    assert init_state == state
