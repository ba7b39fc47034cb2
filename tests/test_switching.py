"""The GIL switch interval runctl uses while it needs the GIL (agent/switching.py): low
while a command is handled and restored right after, low at rest only while at most one of
the program's threads runs, the program's own value always wins, everything restored when
the last agent ends. No timing is asserted: only which interval is set when."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator

import anyio
import pytest
from pydantic import BaseModel

from runctl.agent import control
from runctl.agent.switching import LOW, Switching, low_interval, switching
from runctl.bus import Client, Result
from runctl.bus.errors import BadRequest

PROGRAM = 0.005


@pytest.fixture(autouse=True)
def program_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(PROGRAM)
    yield
    sys.setswitchinterval(before)


class Spinner:
    """``n`` threads of the program that run pure Python until stopped."""

    def __init__(self, n: int) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.spin, name=f"spin-{i}") for i in range(n)]

    def spin(self) -> None:
        total = 0
        while not self.stop.is_set():
            for i in range(1000):
                total += i

    def __enter__(self) -> Spinner:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def test_the_environment_chooses_the_low_value_or_turns_it_off() -> None:
    assert low_interval({}) == LOW
    assert low_interval({"RUNCTL_SWITCH_INTERVAL": "auto"}) == LOW
    assert low_interval({"RUNCTL_SWITCH_INTERVAL": "off"}) is None
    assert low_interval({"RUNCTL_SWITCH_INTERVAL": "0.001"}) == 0.001
    for bad in ("0", "-1", "nan", "inf", "fast", "2"):
        with pytest.raises(BadRequest, match="RUNCTL_SWITCH_INTERVAL"):
            low_interval({"RUNCTL_SWITCH_INTERVAL": bad})


def test_a_command_lowers_the_interval_and_restores_it_right_after() -> None:
    gil = Switching()
    gil.attach()
    try:
        with Spinner(2):  # a busy program: nothing low at rest
            gil.sample()
            threading.Event().wait(0.3)
            gil.sample()
            assert not gil.quiet
            assert sys.getswitchinterval() == PROGRAM
            with gil.command():
                assert sys.getswitchinterval() == LOW
                with gil.command():  # two in flight: the first to end does not restore
                    pass
                assert sys.getswitchinterval() == LOW
            assert sys.getswitchinterval() == PROGRAM
    finally:
        gil.detach()
    assert sys.getswitchinterval() == PROGRAM


def test_a_command_that_fails_restores_the_interval_too() -> None:
    gil = Switching()
    gil.attach()
    try:
        inside: list[float] = []

        def handle() -> None:
            with gil.command():
                inside.append(sys.getswitchinterval())
                raise RuntimeError("handler failed")

        with pytest.raises(RuntimeError):
            handle()
        assert inside == [LOW]
        assert sys.getswitchinterval() == PROGRAM
    finally:
        gil.detach()


def test_low_at_rest_only_while_at_most_one_program_thread_runs() -> None:
    gil = Switching()
    gil.attach()
    try:
        with Spinner(1):  # the main thread sleeps in the test: one busy thread
            gil.sample()
            threading.Event().wait(0.3)
            gil.sample()
            assert gil.quiet
            assert sys.getswitchinterval() == LOW
        with Spinner(2):  # two busy threads of its own: the program's interval at rest
            gil.sample()
            threading.Event().wait(0.3)
            gil.sample()
            assert not gil.quiet
            assert sys.getswitchinterval() == PROGRAM
    finally:
        gil.detach()
    assert sys.getswitchinterval() == PROGRAM


def test_the_programs_own_interval_wins() -> None:
    gil = Switching()
    gil.attach()
    try:
        with gil.command():
            sys.setswitchinterval(0.002)  # the program decides, mid-command
        assert sys.getswitchinterval() == 0.002
        with gil.command():
            assert sys.getswitchinterval() == 0.002
        gil.sample()
        assert sys.getswitchinterval() == 0.002
    finally:
        gil.detach()
    assert sys.getswitchinterval() == 0.002


def test_turned_off_it_never_touches_the_interval() -> None:
    gil = Switching(low=None)
    gil.attach()
    try:
        with gil.command():
            assert sys.getswitchinterval() == PROGRAM
    finally:
        gil.detach()


def wait_until_detached(timeout: float = 30.0) -> None:
    """Until no agent of this process serves (bounded: fails naming how many are left)."""
    deadline = time.monotonic() + timeout
    while switching().attached:
        assert time.monotonic() < deadline, f"{switching().attached} agent(s) never ended"
        time.sleep(0.05)


def test_a_set_through_a_real_agent_restores_the_programs_interval(
    nats_url: str, run_id: str
) -> None:
    """A program with two busy threads of its own: during the set the agent lowers the
    interval; once answered, the program's is back; after close() nothing is left."""
    seen: list[float] = []
    # agents of earlier tests in this process may still be closing: the policy is
    # process-wide, so start once they are gone, from the program's interval
    wait_until_detached()
    sys.setswitchinterval(PROGRAM)

    class Watch(BaseModel):
        x: int = 0

    state = Watch()
    with Spinner(2), control(state, run=run_id, rank=0, url=nats_url, heartbeat=0.2) as ctl:
        ctl.wait_ready()
        threading.Event().wait(0.5)  # two heartbeats: the spinners are measured
        assert not switching().quiet

        def record(*_: object) -> None:
            seen.append(sys.getswitchinterval())

        ctl.on_stop(record)  # runs on the agent's thread, inside the command

        async def main() -> None:
            async with await Client.connect(nats_url, timeout=10) as client:
                result = await client.set(run_id, 0, "x", 7)
                assert isinstance(result, Result) and result.version >= 1
                await client.stop(run_id, 0, reason="check")

        anyio.run(main)
        assert state.x == 7
        assert seen == [LOW]
        assert sys.getswitchinterval() == PROGRAM
    assert sys.getswitchinterval() == PROGRAM


class Plain(BaseModel):
    x: int = 0


def test_a_bad_setting_is_refused_when_the_agent_is_made(
    monkeypatch: pytest.MonkeyPatch, nats_url: str
) -> None:
    import runctl.agent.switching as module

    monkeypatch.setattr(module, "_switching", None)  # read the environment again
    monkeypatch.setenv("RUNCTL_SWITCH_INTERVAL", "fast")
    with pytest.raises(BadRequest, match="RUNCTL_SWITCH_INTERVAL"):
        control(Plain(), run="bad-interval", rank=0, url=nats_url)
    monkeypatch.setattr(module, "_switching", None)  # the next agent reads it again


def test_a_later_agent_starts_afresh_after_the_program_took_over() -> None:
    gil = Switching()
    gil.attach()
    with gil.command():
        sys.setswitchinterval(0.002)  # the program decides: runctl leaves it from now on
    assert not gil.active
    gil.detach()
    # every agent ended; a new one (a new control() in the same process) manages it again
    gil.attach()
    try:
        assert gil.active
        with gil.command():
            assert sys.getswitchinterval() == LOW
        assert sys.getswitchinterval() == 0.002
    finally:
        gil.detach()
