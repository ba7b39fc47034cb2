"""A state bigger than one bus message, against a real nats-server, gateway and rank process.

Never "applied but reported failed": a change that would make the state larger than a bus
message can carry (the server's ``max_payload``, 1 MiB by default, less the envelope) is
refused before it applies (413 ``too_large``, naming the limit and ``max_payload``); a
program whose own state is too large (2 MiB here) is told loudly, its registry record says
so instead of keeping an old state forever, and reads answer 413 instead of 504.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import GatewayFactory, wait_for
from rankkit import ProgramRank

from runctl.bus.server import NatsServer

MODELS = """
from pydantic import BaseModel

class Cfg(BaseModel):
    lr: float = 0.1
    a: str = ""
    b: str = ""
    blob: str = ""
"""
TWO_MIB = 2 << 20


@pytest.fixture
def http(gateway: GatewayFactory) -> httpx.Client:
    return gateway()


@pytest.fixture
def small(nats_url: str, run_id: str) -> Iterator[ProgramRank]:
    with ProgramRank(MODELS, "Cfg()", run=run_id, url=nats_url) as rank:
        yield rank


def fresh(http: httpx.Client, run: str, path: str) -> object:
    r = http.get(f"/runs/{run}/ranks/0/get/{path}", params={"fresh": "true"})
    assert r.status_code == 200, r.text
    return r.json()


def assert_names_the_limit(r: httpx.Response) -> None:
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "too_large", body
    message = body["message"]
    assert "max_payload" in message and "bytes" in message, message
    assert "1048576" in message.replace(",", ""), message  # the server's limit, named


def test_a_change_that_would_outgrow_a_bus_message_is_refused_before_it_applies(
    http: httpx.Client, small: ProgramRank, run_id: str
) -> None:
    run = run_id
    r = http.patch(f"/runs/{run}/ranks/0/set", json={"a": "x" * 700_000})
    assert r.status_code == 200, r.text[:300]
    # together 1.4 MB: more than one message can carry
    r = http.patch(f"/runs/{run}/ranks/0/set", json={"b": "y" * 700_000, "lr": 0.5})
    assert_names_the_limit(r)
    # nothing of it applied: not b, not lr (the rank and the registry agree)
    assert fresh(http, run, "b") == ""
    assert fresh(http, run, "lr") == 0.1
    registry = http.get(f"/runs/{run}/ranks/0/get")
    assert registry.status_code == 200, registry.text[:300]
    assert registry.json()["b"] == "" and registry.json()["lr"] == 0.1
    # the next change that fits applies, and the registry shows it (read-your-writes)
    r = http.patch(f"/runs/{run}/ranks/0/set", json={"lr": 0.01})
    assert r.status_code == 200, r.text[:300]
    assert http.get(f"/runs/{run}/ranks/0/get/lr").json() == 0.01
    assert "Traceback" not in small.output


def test_a_2_mib_state_is_named_loudly_and_never_applied_then_reported_failed(
    http: httpx.Client, nats_url: str, run_id: str
) -> None:
    run = run_id
    state = f"Cfg(blob='z' * {TWO_MIB})"
    with ProgramRank(MODELS, state, run=run, url=nats_url) as rank:
        # control() says it loudly, with the size, the limit and how to raise it
        wait_for(lambda: "max_payload" in rank.output, timeout=20)
        warning = next(line for line in rank.output.splitlines() if "max_payload" in line)
        size = int(re.search(r" is ([0-9,]+) bytes", warning).group(1).replace(",", ""))  # type: ignore[union-attr]
        assert TWO_MIB < size < TWO_MIB + 100, warning
        assert "1048576" in warning.replace(",", ""), warning
        # the registry says why it holds no state (not an old one kept forever, not a 504)
        r = http.get(f"/runs/{run}/ranks/0/get")
        assert_names_the_limit(r)
        r = http.get(f"/runs/{run}/ranks/0/get", params={"fresh": "true"})
        assert_names_the_limit(r)
        # a change is refused before it applies: never applied, then 504
        r = http.patch(f"/runs/{run}/ranks/0/set", json={"lr": 0.01})
        assert_names_the_limit(r)
        r = http.put(f"/runs/{run}/ranks/0/set/lr", params={"value": "0.01"})
        assert_names_the_limit(r)
        assert fresh(http, run, "lr") == 0.1
        # one field still reads (its value fits in a message)
        assert http.get(f"/runs/{run}/ranks/0/get/lr").status_code == 413
        # the program shrinks its state: control is back, the registry follows
        rank.do("state.blob = ''")
        wait_for(
            lambda: http.get(f"/runs/{run}/ranks/0/get").status_code == 200,
            timeout=20,
        )
        r = http.patch(f"/runs/{run}/ranks/0/set", json={"lr": 0.01})
        assert r.status_code == 200, r.text[:300]
        assert http.get(f"/runs/{run}/ranks/0/get/lr").json() == 0.01
        # and grows it again: told again, registry again says why
        rank.do(f"state.blob = 'q' * {TWO_MIB}")
        wait_for(lambda: http.get(f"/runs/{run}/ranks/0/get").status_code == 413, timeout=20)
        assert rank.output.count("max_payload") >= 2, rank.output[-3000:]
        assert "Traceback" not in rank.output


def test_a_2_mib_state_works_end_to_end_once_max_payload_is_raised(
    gateway: GatewayFactory, tmp_path: Path, run_id: str
) -> None:
    """The documented way to carry a larger state: ``max_payload`` in nats.conf."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 8MB\n")
    server = NatsServer(store_dir=tmp_path / "nats", config_file=conf).start()
    try:
        http = gateway(nats_url=server.url)
        state = f"Cfg(blob='z' * {TWO_MIB})"
        with ProgramRank(MODELS, state, run=run_id, url=server.url) as rank:
            r = http.patch(f"/runs/{run_id}/ranks/0/set", json={"lr": 0.01})
            assert r.status_code == 200, r.text[:300]
            r = http.get(f"/runs/{run_id}/ranks/0/get")
            assert r.status_code == 200, r.text[:300]
            assert r.json()["lr"] == 0.01 and len(r.json()["blob"]) == TWO_MIB
            assert "max_payload" not in rank.output, rank.output[-2000:]
    finally:
        server.stop()
