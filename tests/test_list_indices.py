"""A list index is ``-?[0-9]+`` in ASCII, nothing else, and the unknown-field rule holds on
every path, against a real rank process and gateway.

``int()`` takes ``+1``, `` 1``, ``1_0`` and fullwidth digits; a path that reached a list
element that way once slipped past the check for undeclared keys (``bogus`` was dropped
and the answer was 200).
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from conftest import GatewayFactory
from rankkit import ProgramRank

from runctl.agent.state import LiveState
from runctl.bus.errors import BadPath
from runctl.bus.paths import parse_index, resolve

MODELS = """
from pydantic import BaseModel

class Layer(BaseModel):
    width: int = 64

class Cfg(BaseModel):
    layers: list[Layer] = [Layer(), Layer(width=32)]
    sizes: list[int] = [1, 2, 3]
"""
# ("1.0" is two tokens of a dotted path: index 1, then a field "0" that does not exist)
NOT_INDICES = ["+1", " 1", "1 ", "\uff11", "1_0", "0x1", "\u0661", "--1", "+0", "²"]


@pytest.fixture
def rank(nats_url: str, run_id: str) -> Iterator[ProgramRank]:
    with ProgramRank(MODELS, "Cfg()", run=run_id, url=nats_url) as rank:
        yield rank


def test_patch_through_a_plus_one_index_is_refused(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http: httpx.Client = gateway()
    before = http.get(f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"}).content
    # the request of the report: PATCH .../set/layers.+1 -d '{"bogus": 1}'
    r = http.patch(f"/runs/{run_id}/ranks/0/set/layers.%2B1", json={"bogus": 1})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_path"
    for bad in NOT_INDICES:
        for method, extra in (
            ("PATCH", {"json": {"width": 8}}),
            ("PUT", {"params": {"value": "8"}}),
        ):
            suffix = "" if method == "PATCH" else ".width"
            url = f"/runs/{run_id}/ranks/0/set/layers.{quote(bad, safe='')}{suffix}"
            r = http.request(method, url, **extra)
            assert r.status_code == 400, (bad, method, r.text)
        r = http.get(f"/runs/{run_id}/ranks/0/get/sizes.{quote(bad, safe='')}")
        assert r.status_code == 400, (bad, r.text)
        r = http.get(f"/runs/{run_id}/ranks/0/get/sizes.{quote(bad, safe='')}?fresh=true")
        assert r.status_code == 400, (bad, r.text)
    after = http.get(f"/runs/{run_id}/ranks/0/get", params={"fresh": "true"}).content
    assert after == before


def test_unknown_fields_are_refused_on_every_path(
    rank: ProgramRank, gateway: GatewayFactory, run_id: str
) -> None:
    http: httpx.Client = gateway()
    base = f"/runs/{run_id}/ranks/0/set"
    for path in ("layers.1", "layers.-1", "layers.0", "layers.01"):
        r = http.patch(f"{base}/{path}", json={"bogus": 1})
        assert r.status_code == 422, (path, r.text)
        assert r.json()["detail"][0]["type"] == "extra_forbidden", r.text
        r = http.put(f"{base}/{path}", params={"value": '{"width": 1, "bogus": 1}'})
        assert r.status_code == 422, (path, r.text)
    r = http.patch(base, json={"layers": [{"width": 1, "bogus": 1}]})
    assert r.status_code == 422, r.text
    r = http.patch(f"{base}/layers.-1", json={"width": 7})  # a real index still works
    assert r.status_code == 200, r.text
    assert r.json()["value"]["layers"][1]["width"] == 7


@pytest.mark.parametrize("bad", NOT_INDICES)
def test_every_reader_of_a_path_agrees_on_what_an_index_is(bad: str) -> None:
    from pydantic import BaseModel

    class Cfg(BaseModel):
        sizes: list[int] = [1, 2, 3]

    assert parse_index(bad) is None
    with pytest.raises(BadPath):
        resolve({"sizes": [1, 2, 3]}, f"sizes.{bad}")
    state = LiveState(Cfg())
    for call in (
        lambda: state.get(f"sizes.{bad}"),
        lambda: state.set(f"sizes.{bad}", 5),
    ):
        with pytest.raises(BadPath):
            call()
    assert parse_index("-1") == -1 and parse_index("007") == 7
