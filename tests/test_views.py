"""The views and formatting the gateway, the CLI and the console share (one place each), and
that the CLI never loads the web stack."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT

from runctl.bus.client import Result
from runctl.bus.formatting import ago, cut, format_duration, render_table
from runctl.bus.messages import RankRecord, RankStatus
from runctl.bus.registry import RankInfo
from runctl.bus.subjects import rank_key
from runctl.bus.views import by_rank, rank_summary, run_counts, write_outcome


def _info(rank: str, *, status: RankStatus = "running", heartbeat_age: float = 0.0) -> RankInfo:
    now = time.time()
    record = RankRecord(
        run="exp1",
        rank=rank,
        host="h",
        pid=1,
        started=now - 10,
        heartbeat=now - heartbeat_age,
        heartbeat_interval=1.0,
        version=2,
        state={"lr": 0.1},
        status=status,
    )
    return RankInfo.of(record, now)


def test_ranks_sort_as_numbers_then_names() -> None:
    assert sorted(["10", "2", "b", "0", "a"], key=rank_key) == ["0", "2", "10", "a", "b"]
    assert [r for r, _ in by_rank({"10": 1, "9": 2, "x": 3})] == ["9", "10", "x"]


def test_durations_and_ago() -> None:
    durations = [format_duration(s) for s in (0.25, 42, 600, 9000)]
    assert durations == ["250ms", "42.0s", "10.0m", "2.5h"]
    assert ago(90) == "90.0s ago"
    assert ago(-3) == "0ms ago"  # clock skew is not the future
    assert cut("abcdefgh", 6) == "abc..." and cut("abc", 6) == "abc"


def test_one_table_renderer() -> None:
    table = render_table([("RANK", "STATUS"), ("0", "alive"), ("12", "stale")])
    assert table.splitlines() == ["RANK  STATUS", "0     alive", "12    stale"]


def test_rank_views() -> None:
    infos = [_info("0"), _info("1", heartbeat_age=60), _info("2", status="exited")]
    assert run_counts(infos) == {"alive": 1, "stalled": 0, "stale": 1, "exited": 1}
    summary = rank_summary(infos[0])
    assert summary["rank"] == "0" and summary["status"] == "alive" and summary["version"] == 2
    assert {"step", "pending", "world_size", "heartbeat_age_s"} <= set(summary)


def test_write_outcome() -> None:
    view = write_outcome("exp1", Result("3", 7, {"lr": 0.2}, changed=True))
    assert view == {
        "run": "exp1",
        "rank": "3",
        "outcome": "applied",
        "version": 7,
        "changed": True,
        "value": {"lr": 0.2},
    }


def test_the_cli_never_loads_the_gateway_or_the_web_stack() -> None:
    code = (
        "import sys, runctl.cli.app as app\n"
        "app.build_parser()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fastapi', 'starlette', 'uvicorn')"
        " or m.startswith('runctl.gateway')]\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_journaled_as_keeps_every_other_field() -> None:
    """A result marked journaled keeps everything else, including a field added later: each
    field gets a value of its own, unlike its default and every other field's."""
    import dataclasses

    values: dict[str, object] = {}
    for index, f in enumerate(dataclasses.fields(Result)):
        kind = str(f.type)
        if kind.startswith("str"):
            values[f.name] = f"{f.name}-value"
        elif kind.startswith("int"):
            values[f.name] = 100 + index
        elif kind.startswith("float"):
            values[f.name] = index + 0.5
        elif kind.startswith("bool"):
            values[f.name] = True
        else:
            values[f.name] = {"field": f.name}
    values["journaled"] = None
    full = Result(**values)  # type: ignore[arg-type]  # built field by field on purpose
    for journaled in (True, False):
        copy = full.journaled_as(journaled)
        assert copy.journaled is journaled
        for f in dataclasses.fields(Result):
            if f.name != "journaled":
                assert getattr(copy, f.name) == values[f.name], f.name
