"""schemathesis against the gateway's own OpenAPI document: random (and the documented
example) input on every operation, through a real uvicorn socket, a real nats-server and a
real rank behind it (run ``demo``, rank ``0``: the examples in the schema).

Holds: no 5xx other than the documented 502/503/504, no crash of the gateway or of the
rank's program, and no answer that echoes a large input back. Bounded: a fixed number of
examples per operation, derandomised, so it runs the same every time in well under 60 s.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import spawn_python, wait_for
from faultkit import figures
from hypothesis import HealthCheck, settings

from runctl.bus.server import NatsServer
from runctl.gateway.app import create_app
from runctl.gateway.serve import GatewayThread
from runctl.gateway.settings import Settings

RUN = "demo"  # the example value of {run} in the schema
EXAMPLES = 12
DOCUMENTED_5XX = {502, 503, 504}

#: the rank: a program that keeps running whatever it is sent (a stop is a request, and a
#: terminating stop kills it: it is started again before the next case)
RANK = f"""
import time
from typing import Literal
from pydantic import BaseModel, Field
from runctl.agent import control

class Opt(BaseModel):
    lr: float = Field(0.1, gt=0)
    kind: Literal["sgd", "adam"] = "sgd"

class Cfg(BaseModel):
    epochs: int = 3
    name: str = "x"
    tags: dict[str, int] = {{}}
    layers: list[int] = [1, 2]
    opt: Opt = Opt()

ctl = control(Cfg(), run={RUN!r}, rank=0, heartbeat=0.5).wait_ready()
for i in ctl.steps("item", range(3)):
    pass
print("READY", flush=True)
while True:
    time.sleep(0.05)
    ctl.sync(int(time.time() * 10))
"""


class Rank:
    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def ensure(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            self.proc.communicate()
        self.proc = spawn_python(RANK, env={"RUNCTL_NATS_URL": self.url})
        self.starts += 1
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "READY" in line:  # the agent thread's log line may share the line
                return
        raise AssertionError(f"rank did not start: {self.proc.communicate()[1][-2000:]}")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Rank]]:
    with NatsServer(store_dir=tmp_path_factory.mktemp("nats-schemathesis")) as server:
        rank = Rank(server.url)
        rank.ensure()
        settings_ = Settings(nats_url=server.url, port=0, default_run=RUN, timeout=2)
        try:
            with GatewayThread(settings_) as gateway:
                yield gateway.url, rank
        finally:
            rank.stop()


# The document the gateway serves at /openapi.json, built the same way (schemathesis's
# from_fixture does not work with pytest 9: it sets Function._nodeid, which is gone).
# The live streams (server-sent events, GET .../live) never end by design: a fuzzer would
# wait on them forever; tests/test_console_api.py checks their input and their end.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi()).exclude(
    path_regex=r"/live$"
)
STATUSES: Counter[int] = Counter()


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_gateway_never_fails_on_its_own_input(
    case: schemathesis.Case[Any], stack: tuple[str, Rank]
) -> None:
    url, rank = stack
    rank.ensure()
    response = case.call(base_url=url, timeout=30)
    STATUSES[response.status_code] += 1
    what = (case.method, case.formatted_path, response.status_code, response.text[:300])
    assert response.status_code < 500 or response.status_code in DOCUMENTED_5XX, what
    assert len(response.content) < 1_000_000, what  # never an input echoed at size
    if response.status_code >= 500:
        body = response.json()
        assert body["error"] in ("internal", "unavailable", "timeout"), what


def test_afterwards_the_gateway_and_the_rank_still_serve(stack: tuple[str, Rank]) -> None:
    import httpx

    url, rank = stack
    rank.ensure()
    with httpx.Client(base_url=url, timeout=10) as http:
        wait_for(
            lambda: (
                http.get(f"/runs/{RUN}/ranks/0/get", params={"fresh": "true"}).status_code == 200
            ),
            timeout=20,
        )
    if STATUSES:  # the cases above ran in this session: record what they saw
        figures(
            "schemathesis",
            cases=sum(STATUSES.values()),
            statuses=dict(sorted(STATUSES.items())),
            rank_restarts=rank.starts - 1,
            examples_per_operation=EXAMPLES,
        )
