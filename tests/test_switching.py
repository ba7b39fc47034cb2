"""The GIL switch interval runctl uses while it needs the GIL (agent/switching.py): low
while a command is handled and restored right after, low at rest only while at most one of
the program's threads runs, the program's own value always wins, everything restored when
the last agent ends. No timing is asserted: only which interval is set when."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Self

import anyio
import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel

import runctl.agent.switching as switching_module
import runctl.bus.direct as direct_module
from runctl.agent import control
from runctl.agent.switching import LOW, QUICK_SAMPLE, Switching, low_interval, switching
from runctl.bus import Client, Result
from runctl.bus.direct import write_now
from runctl.bus.errors import BadRequest

PROGRAM = 0.005


@pytest.fixture(autouse=True)
def program_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(PROGRAM)
    yield
    sys.setswitchinterval(before)


class Threads:
    """``n`` threads of the program running :meth:`body` until ``stop`` is set."""

    def __init__(self, n: int) -> None:
        self.stop = threading.Event()
        kind = type(self).__name__.lower()
        self.threads = [threading.Thread(target=self.body, name=f"{kind}-{i}") for i in range(n)]

    def body(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


class Spinner(Threads):
    """Threads that run pure Python until stopped."""

    def body(self) -> None:
        total = 0
        while not self.stop.is_set():
            for i in range(1000):
                total += i


class Idle(Threads):
    """Threads that wait, doing nothing, until stopped."""

    def body(self) -> None:
        self.stop.wait()


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


def test_low_at_rest_is_sampled_quickly_only_where_threads_could_start_working() -> None:
    """Sampling between heartbeats is asked for while the interval is low at rest and the
    program has two threads or more of its own; by one agent of the process only. (Here the
    test's thread is the agent's: the program's threads are the ones started below.)"""
    gil = Switching()
    gil.attach()
    first, second = object(), object()

    def settle() -> None:  # two samples, each far enough from the last to be taken
        for _ in range(2):
            threading.Event().wait(0.1)
            gil.sample()

    try:
        with Idle(1):  # one thread of the program: nobody could compete with it
            settle()
            assert gil.quiet and sys.getswitchinterval() == LOW
            assert gil.resample_in(first) is None
        with Idle(2):  # two, idle: either could start working any time
            settle()
            assert gil.quiet and sys.getswitchinterval() == LOW
            assert gil.resample_in(first) == QUICK_SAMPLE
            assert gil.resample_in(second) is None  # one agent samples for the process
            gil.release_sampling(first)
            assert gil.resample_in(second) == QUICK_SAMPLE
            with Spinner(2):  # busy: the program's interval, the heartbeat is enough
                threading.Event().wait(0.1)
                gil.sample()
                assert gil.resample_in(second) == QUICK_SAMPLE  # new threads: measure soon
                threading.Event().wait(0.3)
                gil.sample()
                assert not gil.quiet and sys.getswitchinterval() == PROGRAM
                assert gil.resample_in(second) is None
    finally:
        gil.detach()
    assert gil.resample_in(second) is None  # no agent: nothing to sample


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
    nats_url: str, run_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program with two busy threads of its own: during the set the agent lowers the
    interval; once answered, the program's is back (the answer leaves after it is
    restored, not before); after close() nothing is left."""
    seen: list[float] = []
    written: list[float] = []

    def write_now_watched(nc: NATS) -> None:
        written.append(sys.getswitchinterval())
        write_now(nc)

    monkeypatch.setattr(direct_module, "write_now", write_now_watched)  # the command's write
    # the two spinners must count as busy at every sample, or the interval at rest may go
    # low beside the command's: on a starved machine one of them can get under the usual
    # share of a short sample (waiting for the GIL held by the other), yet never stays at
    # zero (its wait for the GIL wakes every switch interval)
    monkeypatch.setattr(switching_module, "BUSY_SHARE", 0.0)
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
        # each answer was written with the program's interval back in place
        assert written and set(written) == {PROGRAM}
    assert sys.getswitchinterval() == PROGRAM


class Workers(Spinner):
    """Threads idle until ``go`` is set, then running pure Python until stopped."""

    def __init__(self, n: int) -> None:
        self.go = threading.Event()
        super().__init__(n)

    def body(self) -> None:
        self.go.wait()
        super().body()

    def __exit__(self, *exc: object) -> None:
        self.go.set()
        super().__exit__(*exc)


def wait_for_interval(value: float, why: str) -> None:
    """Until the switch interval is ``value`` (bounded: 10 s, a third of the heartbeat the
    tests below use, so only sampling between heartbeats gets there in time)."""
    deadline = time.monotonic() + 10
    while sys.getswitchinterval() != value:
        assert time.monotonic() < deadline, why
        time.sleep(0.02)


def test_threads_that_start_working_after_a_quiet_spell_get_the_programs_interval_back(
    nats_url: str, run_id: str
) -> None:
    """A quiet program with idle threads of its own gets the low interval at rest; when two
    of them start working, the agent notices long before its next heartbeat (30 s away)
    and gives the program its own interval back."""
    wait_until_detached()
    sys.setswitchinterval(PROGRAM)

    class Quiet(BaseModel):
        x: int = 0

    with Workers(2) as workers, control(Quiet(), run=run_id, rank=0, url=nats_url, heartbeat=30):
        wait_for_interval(LOW, "the quiet program never got the low interval at rest")
        workers.go.set()
        wait_for_interval(PROGRAM, "two busy threads kept the low interval until the heartbeat")
        assert not switching().quiet
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
