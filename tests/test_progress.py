"""The stall rule and the step spread, as pure functions (bus/progress.py) and as the
agent's monitor sees a program's marks (agent/progress.py), with a fake clock."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from runctl.agent.progress import ExitErrors, Progress, ProgressMonitor
from runctl.bus.errors import BadRequest
from runctl.bus.messages import RankRecord
from runctl.bus.progress import StallPolicy, is_stalled, step_spread
from runctl.bus.registry import RankInfo, liveness


def test_threshold_is_factor_times_interval_with_a_floor() -> None:
    policy = StallPolicy(factor=10, floor=60)
    assert policy.threshold(None) == 60
    assert policy.threshold(0.5) == 60
    assert policy.threshold(30) == 300
    assert StallPolicy(enabled=False).threshold(30) == 0


def test_policy_from_env_and_bad_values() -> None:
    assert StallPolicy.from_env({}) == StallPolicy()
    env = {"RUNCTL_STALL_AFTER": "5", "RUNCTL_STALL_FACTOR": "3"}
    assert StallPolicy.from_env(env) == StallPolicy(factor=3, floor=5)
    assert not StallPolicy.from_env({"RUNCTL_STALL_AFTER": "off"}).enabled
    with pytest.raises(BadRequest, match="RUNCTL_STALL_AFTER"):
        StallPolicy.from_env({"RUNCTL_STALL_AFTER": "soon"})
    with pytest.raises(BadRequest, match="floor"):
        StallPolicy(floor=-1)
    with pytest.raises(BadRequest, match="factor"):
        StallPolicy(factor=math.nan)


def test_monitor_learns_the_interval_and_reports_stall_and_recovery() -> None:
    progress = Progress()
    monitor = ProgressMonitor(progress, StallPolicy(factor=10, floor=5.0))
    assert monitor.sample(now=0.0) is None  # no mark yet: nothing to judge
    assert monitor.idle(now=0.0) is None and monitor.progress_ts() is None
    # five marks between heartbeats 0.5 s apart: 0.1 s per mark, threshold the floor
    t = 0.0
    for _ in range(20):
        t += 0.5
        progress.count += 5
        assert monitor.sample(now=t) is None
    assert monitor.interval == pytest.approx(0.1)
    assert monitor.stall_after == 5.0
    # then one mark every 2 s (a heartbeat each 0.5 s): the interval follows, the
    # threshold becomes 10 x 2 s
    for _ in range(40):
        for _ in range(4):
            t += 0.5
            if t % 2 == 0:
                progress.count += 1
            assert monitor.sample(now=t) is None
    assert monitor.interval == pytest.approx(2.0, rel=0.01)
    assert monitor.stall_after == pytest.approx(20.0, rel=0.01)
    assert monitor.idle(now=t) == 0.0
    assert monitor.sample(now=t + 19.5) is None
    assert monitor.sample(now=t + 20.5) == "stalled"
    assert monitor.sample(now=t + 30.0) is None  # once
    # it advances again after 60 s: recovered, and that gap is not learnt
    progress.count += 1
    assert monitor.sample(now=t + 60) == "recovered"
    assert monitor.interval == pytest.approx(2.0, rel=0.01)
    assert monitor.idle(now=t + 61) == 1.0


def test_tick_counts() -> None:
    progress = Progress()
    progress.tick()
    progress.tick()
    assert progress.count == 2


def _record(**fields: object) -> RankRecord:
    base: dict[str, object] = {
        "run": "r",
        "rank": "0",
        "host": "h",
        "pid": 1,
        "started": 0.0,
        "heartbeat": 100.0,
        "heartbeat_interval": 1.0,
        "version": 0,
        "state": {},
    }
    return RankRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_liveness_orders_exited_stale_stalled_alive() -> None:
    assert liveness(_record(), now=100.5) == "alive"
    assert liveness(_record(progress_ts=90.0, stall_after=5.0), now=100.5) == "stalled"
    assert liveness(_record(progress_ts=99.0, stall_after=5.0), now=100.5) == "alive"
    # no heartbeat: we cannot tell what the program does
    assert liveness(_record(progress_ts=90.0, stall_after=5.0), now=110.0) == "stale"
    assert liveness(_record(status="exited", progress_ts=1.0, stall_after=5.0)) == "exited"
    assert not is_stalled(None, 5.0, 1e9)
    assert not is_stalled(0.0, 0.0, 1e9)  # detection off
    info = RankInfo.of(_record(progress_ts=90.0, stall_after=5.0), now=100.5)
    assert info.idle == pytest.approx(10.5)
    assert info.summary()["status"] == "stalled"


def test_step_spread_names_the_ranks_behind() -> None:
    spread = step_spread([("0", 1000), ("13", 960), ("2", 999), ("3", None), ("4", 1000)])
    assert spread.leader == 1000 and spread.slowest == 960 and spread.steps == 40
    assert spread.behind == {"13": 40, "2": 1}
    assert spread.describe() == (
        "rank 13 is 40 steps behind, rank 2 is 1 step behind; leader at step 1000"
    )
    assert step_spread([("0", 5), ("1", 5)]).behind == {}
    assert step_spread([]).leader is None
    many = step_spread([(str(i), i) for i in range(10)])
    assert many.describe(limit=2).endswith("(and 7 more); leader at step 9")


def test_exit_errors_keep_the_first_real_error() -> None:
    errors = ExitErrors()
    errors.record(SystemExit, SystemExit(0))
    assert errors.error == ""
    errors.record(ValueError, ValueError("loss is nan"))
    errors.record(RuntimeError, RuntimeError("later"))
    assert errors.error == "ValueError: loss is nan"


def test_uncaught_exception_reaches_the_hook_chain() -> None:
    code = textwrap.dedent(
        """
        import sys
        from runctl.agent.progress import ExitErrors
        errors = ExitErrors()
        errors.install()
        import atexit
        atexit.register(lambda: print("RECORDED", errors.error))
        raise ValueError("boom")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert "RECORDED ValueError: boom" in proc.stdout
    assert "Traceback" in proc.stderr  # the previous hook still printed it
