"""schemathesis against the gateway's own OpenAPI document: random (and the documented
example) input on every operation, through a real uvicorn socket, a real nats-server and a
real rank behind it (run ``demo``, rank ``0``: the examples in the schema).

Holds: no 5xx other than the documented 502/503/504, no crash of the gateway or of the
rank's program, and no answer that echoes a large input back. Bounded: a fixed number of
examples per operation, derandomised, so it runs the same every time in well under 60 s.
"""

from __future__ import annotations

import signal
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
    """The rank behind the gateway. It ends only when a stop with ``mode=terminate`` was
    answered (SIGTERM, then SIGKILL, after its grace): then it is started again before the
    next case. Dead for any other reason, it fails the run with its output: a crash that
    gateway input caused is never hidden by a restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        #: a terminating stop was answered since the last start: its end is expected
        self.terminate_asked = False

    def ensure(self, after: object = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.proc is not None:
            _, err = self.proc.communicate()
            code = self.proc.returncode
            if not (self.terminate_asked and code in (-signal.SIGTERM, -signal.SIGKILL)):
                raise AssertionError(
                    f"the rank died (exit {code}) with no terminating stop asked; "
                    f"last request: {after!r}\n{err[-3000:]}"
                )
        self.proc = spawn_python(RANK, env={"RUNCTL_NATS_URL": self.url})
        self.starts += 1
        self.terminate_asked = False
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "READY" in line:  # the agent thread's log line may share the line
                return
        raise AssertionError(f"rank did not start: {self.proc.communicate()[1][-2000:]}")

    def saw(self, method: str, path: str, query: Any, status: int) -> None:
        """Note a request the gateway answered: a terminating stop may end the rank."""
        if (
            method.upper() == "POST"
            and path.endswith("/stop")
            and status < 300
            and "terminate" in str(query or "")
        ):
            self.terminate_asked = True

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
#: the last request sent (named when the rank died after it)
LAST: list[object] = []


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
    rank.ensure(after=LAST[0] if LAST else None)
    response = case.call(base_url=url, timeout=30)
    STATUSES[response.status_code] += 1
    what = (case.method, case.formatted_path, response.status_code, response.text[:300])
    LAST[:] = [(case.method, case.formatted_path, case.query)]
    rank.saw(case.method, case.formatted_path, case.query, response.status_code)
    assert response.status_code < 500 or response.status_code in DOCUMENTED_5XX, what
    assert len(response.content) < 1_000_000, what  # never an input echoed at size
    if response.status_code >= 500:
        body = response.json()
        assert body["error"] in ("internal", "unavailable", "timeout"), what


#: every spelling of a non-finite number a client may send
NON_FINITE_TEXT = ("NaN", "nan", "Infinity", "-Infinity", "inf", "-inf", "1e999", "-1e999")
#: JSON bodies with non-finite numbers (bare tokens, as json.dumps writes them, the
#: strings runctl writes, and numbers beyond a float) in every kind of place
NON_FINITE_BODIES = (
    b"NaN",
    b"Infinity",
    b"-1e999",
    b'"NaN"',
    b'{"epochs": NaN}',
    b'{"epochs": 1e999}',
    b'{"epochs": "Infinity"}',
    b'{"opt": {"lr": Infinity}}',
    b'{"opt": {"lr": -Infinity}}',
    b'{"opt": {"lr": "NaN"}}',
    b'{"tags": {"a": NaN}}',
    b'{"layers": [NaN, Infinity, -1e999]}',
    b'{"name": NaN}',
)
#: a value for each path parameter (the rank's run and fields)
PATH_VALUES = {
    "run": RUN,
    "rank": "0",
    "path": "opt.lr",
    "step": "item",
    "change": "nothing",
}


def _numeric(param: dict[str, Any]) -> bool:
    text = str(param.get("schema"))
    return "'number'" in text or "'integer'" in text or param["name"] == "value"


def _non_finite_requests() -> Iterator[tuple[str, str, dict[str, str], bytes | None]]:
    """Every numeric parameter of every operation with each non-finite spelling, and each
    non-finite body on every operation that takes a body."""
    document = create_app(Settings()).openapi()
    for template, operations in document["paths"].items():
        if template.endswith("/live"):
            continue
        path = template.format(**PATH_VALUES)
        for method, op in operations.items():
            extra = {"mode": "terminate"} if path.endswith("/stop") else {}
            for param in op.get("parameters", []):
                if param["in"] == "query" and _numeric(param):
                    for text in NON_FINITE_TEXT:
                        yield method, path, {**extra, param["name"]: text}, None
            if "requestBody" in op:
                for body in NON_FINITE_BODIES:
                    yield method, path, {}, body


def test_non_finite_numbers_in_every_numeric_parameter_and_body_are_never_a_5xx(
    stack: tuple[str, Rank],
) -> None:
    import httpx

    url, rank = stack
    seen: Counter[int] = Counter()
    with httpx.Client(base_url=url, timeout=30) as http:
        for method, path, query, body in _non_finite_requests():
            rank.ensure(after=LAST[0] if LAST else None)
            headers = {"content-type": "application/json"} if body is not None else {}
            r = http.request(method.upper(), path, params=query, content=body, headers=headers)
            seen[r.status_code] += 1
            LAST[:] = [(method, path, query, body)]
            rank.saw(method, path, query, r.status_code)
            what = (method, path, query, body, r.status_code, r.text[:300])
            assert r.status_code < 500 or r.status_code in DOCUMENTED_5XX, what
            if r.status_code in DOCUMENTED_5XX:
                assert r.json()["error"] in ("unavailable", "timeout"), what
        rank.ensure(after=LAST[0] if LAST else None)
        state = http.get(f"/runs/{RUN}/ranks/0/get", params={"fresh": "true"})
        assert state.status_code == 200, state.text
    assert sum(seen.values()) > 150, seen
    figures(
        "schemathesis-non-finite", requests=sum(seen.values()), statuses=dict(sorted(seen.items()))
    )


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


def test_a_rank_that_died_without_a_terminating_stop_fails_the_run(nats_url: str) -> None:
    """The harness restarts the rank only after a terminating stop it saw answered."""
    rank = Rank(nats_url)
    rank.proc = spawn_python("import sys; sys.exit(3)")
    rank.proc.wait(20)
    with pytest.raises(AssertionError, match=r"died \(exit 3\) with no terminating stop"):
        rank.ensure(after=("PATCH", "/runs/demo/ranks/0/set", None))
    rank.proc = spawn_python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    rank.proc.wait(20)
    rank.saw("POST", "/runs/demo/ranks/all/stop", {"mode": "terminate"}, 200)
    try:
        rank.ensure()  # expected: started again
        assert rank.starts == 1 and rank.proc.poll() is None
    finally:
        rank.stop()
