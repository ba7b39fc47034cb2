"""The control-path benchmark harness runs end to end at a tiny size (no timing asserted:
numbers from a 2-core machine shared with other tests mean nothing here)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import discover
from bench.control import freakenv
from bench.control.report import Figure, Target, evaluate, median_interval, percentile, render

ROOT = Path(__file__).resolve().parent.parent


def run_quick(
    module: str, out: Path, *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """``python -m <module> --quick --out <out> ...`` in the repo; it must exit 0."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    assert math.isnan(percentile([], 50))


def test_figure_pools_rounds_and_reports_the_spread_of_round_medians() -> None:
    fig = Figure("s")
    fig.add_round([1.0, 2.0, 3.0])
    fig.add_round([10.0, 20.0, 30.0])
    assert fig.p50 == 6.5
    assert fig.spread == (2.0, 20.0)
    assert fig.to_json()["samples"] == 6


def test_targets_compare_runctl_with_freak_in_the_same_run() -> None:
    figs = {
        "freak.hold.set": Figure("s", [[0.010, 0.012]]),
        "runctl.hold.set": Figure("s", [[0.004, 0.004]]),
        "runctl.hold.land": Figure("s", [[0.0035]]),
        "runctl.threads.idle_ratio": Figure("ratio", [[0.99]]),
        "runctl.threads.sets_ratio": Figure("ratio", [[0.97]]),
        "runctl.threads.burst_ratio": Figure("ratio", [[0.93]]),
        "runctl.hold.get_full": Figure("s", [[0.002]]),
        "runctl.hold.rate_100": Figure("ratio", [[0.97]]),
    }
    targets = {t.name: t for t in evaluate(figs, ["hold"], ["freak", "runctl"])}
    assert targets["set p50 vs Freak, hold loop"].ok  # 4 / 11 = 0.36 <= 0.4
    assert not targets["set sent -> loop sees it p50, hold loop"].ok  # 3.5 ms > 3 ms
    assert targets["two busy threads' throughput idle, vs without runctl"].ok
    assert not targets["two busy threads' throughput under 100 sets/s, vs without runctl"].ok
    burst = "two busy threads' throughput idle, starting after a quiet spell, vs without runctl"
    assert not targets[burst].ok
    assert not targets["GET full state p50, hold loop"].ok  # 2 ms > 1.5 ms
    assert not targets["loop rate under 100 GET/s, hold loop"].ok  # 97% < 98%
    table = render(figs, list(targets.values()), ["hold"], ["freak", "runctl"])
    assert "| set one field (ms) | hold | 11.0 [11.0-11.0] p99 12.0 | 4.00" in table
    assert "**no**" in table
    assert not Target("x", math.nan, 1.0, "le").ok


def test_a_noisy_target_is_called_only_when_its_whole_confidence_interval_agrees() -> None:
    tight = [0.99 + i * 0.001 for i in range(20)]  # 99.0-100.9 %: every resample >= 98 %
    wide = [0.90, 0.95, 0.97, 0.98, 0.99, 1.00, 1.01, 1.03, 1.06, 1.10]
    low, high = median_interval(tight)
    assert 0.99 <= low <= statistics.median(tight) <= high <= 1.009
    assert all(map(math.isnan, median_interval([1.0])))  # one value has no interval
    figs = {
        "runctl.threads.idle_ratio": Figure("ratio", [tight]),
        "runctl.threads.sets_ratio": Figure("ratio", [wide]),
    }
    targets = {t.name: t for t in evaluate(figs, [], ["runctl"])}
    idle = targets["two busy threads' throughput idle, vs without runctl"]
    sets = targets["two busy threads' throughput under 100 sets/s, vs without runctl"]
    assert idle.shown and idle.verdict == "yes"
    assert sets.ok and not sets.shown and sets.verdict == "not shown"  # median 99.5 %
    assert Target("x", 95.0, 98.0, "ge", "%", (93.0, 97.0)).verdict == "**no**"
    table = render(figs, list(targets.values()), [], ["runctl"])
    assert "| not shown |" in table and "90 % CI" in table


def test_bench_runner_discovers_every_bench_module() -> None:
    assert "bench_control" in discover()


@pytest.mark.slow
def test_control_bench_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    tools = "freak,runctl" if freakenv.is_ready() else "runctl"
    out = run_quick("bench.bench_control", tmp_path, "--tools", tools, timeout=55)
    assert "| GET full state (ms) | hold |" in out.stdout
    files = list(tmp_path.glob("control-quick-*.json"))
    assert len(files) == 1
    doc = json.loads(files[0].read_text())
    for tool in tools.split(","):
        for mode in ("sleep", "release", "hold"):
            for what in ("get_full", "get_field", "set", "rate_100", "rate_max"):
                fig = doc["figures"][f"{tool}.{mode}.{what}"]
                assert fig["samples"] > 0 and fig["median"] is not None, (tool, mode, what)
    assert doc["figures"]["runctl.control_existing"]["samples"] == 1
    assert doc["figures"]["runctl.gateway_rps4"]["median"] > 0
    assert doc["machine"]["nproc"] >= 1 and doc["versions"]["runctl_env"]["pydantic"]
    assert {t["name"] for t in doc["targets"]} >= {
        "agent RSS overhead",
        "set p50 vs Freak, hold loop",
    } - (set() if "freak" in tools else {"set p50 vs Freak, hold loop"})
    assert not doc["notes"], doc["notes"]  # no refused request, no write the loop missed
    # the two-thread windows: the same process with its agent closed between runctl windows
    # (2 runs of three runctl windows, each between two closed ones)
    assert doc["figures"]["runctl.threads.restart"]["samples"] == 6
    assert doc["figures"]["none.threads.rate"]["samples"] == 7
    assert doc["figures"]["runctl.threads.sets_ratio"]["samples"] == 2


@pytest.mark.slow
def test_the_two_thread_bench_measures_runctl_and_the_floor_in_one_run(tmp_path: Path) -> None:
    out = run_quick("bench.bench_threads", tmp_path, timeout=60)
    assert "| floor: bare nats-py thread |" in out.stdout and "budget: >= 98 %" in out.stdout
    (written,) = tmp_path.glob("threads-quick-*.json")
    doc = json.loads(written.read_text())
    for name in ("floor", "runctl"):
        fig = doc["figures"][name]
        assert fig["errors"] == 0, name
        assert fig["requests_per_s"]["n"] == 2 and fig["requests_per_s"]["median"] > 0, name
        # the responder's threads were found and worked for the requests
        assert fig["responder_cpu_ms_per_request"]["median"] > 0, name
    assert doc["verdicts"]["budget_ms"] == pytest.approx(0.2)


def test_freak_venv_holds_freaks_own_lock() -> None:
    if not freakenv.is_ready():
        pytest.skip(
            "Freak's venv (bench/.venvs/freak) is absent: the smoke test ran runctl "
            "alone; `just bench` creates it from PyPI (~10 s)"
        )
    installed = freakenv.freeze(freakenv.python_of(freakenv.VENVS / "freak"))
    for pin in freakenv.FREAK_LOCK:
        name, version = pin.split("==")
        assert installed.get(name) == version, (pin, installed.get(name))


def test_the_404_bench_runs_and_a_missed_bound_fails_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No timing asserted here: the bound lives in the bench (a 404 slowed by 500 ms
    misses it); here, that the bench measures and that a missed bound exits 1."""
    from bench import bench_notfound

    assert bench_notfound.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| set, unknown run |" in out and "target: p50 <=" in out
    (written,) = tmp_path.glob("notfound-quick-*.json")
    doc = json.loads(written.read_text())
    assert all(f["n"] == 10 and f["p50_ms"] > 0 for f in doc["figures"].values())
    monkeypatch.setattr(bench_notfound, "TARGET_P50_MS", 0.0)  # as if every 404 were slow
    assert bench_notfound.main(["--samples", "3", "--out", str(tmp_path)]) == 1
    assert "MISSED" in capsys.readouterr().out


def test_fanout_targets_judge_64_processes_1000_packed_ranks_and_a_flat_cost_per_rank() -> None:
    from bench.bench_fanout import targets

    def row(ranks: int, stop_ms: float) -> dict[str, object]:
        return {"ranks": ranks, "loop": "asyncio", "stop": {"p50_ms": stop_ms}}

    process = {"parameters": {"layout": "process"}, "results": [row(32, 9.0), row(64, 19.0)]}
    assert [(t["name"].split(",")[0], t["met"]) for t in targets(process)] == [
        ("64 rank processes", True)
    ]
    # with the floor of the same run, the stop is also shown as a multiple of it
    process["floor"] = {"processes": 64, "p50_ms": 12.5}
    (judged_64,) = targets(process)
    assert judged_64["measured"] == "19.00 ms; 1.52x the floor of this run, 12.50 ms"
    process["floor"] = {"processes": 8, "p50_ms": 2.0}  # another size: no ratio
    assert targets(process)[0]["measured"] == "19.00 ms"
    packed = {"parameters": {"layout": "packed"}, "results": [row(256, 20.0), row(1000, 110.0)]}
    judged = {t["name"].split(",")[0]: t["met"] for t in targets(packed)}
    # 1,000 ranks in 110 ms: missed; per rank 78 -> 110 us, 1.41x: not flat
    assert judged == {"1000 packed ranks": False, "flat cost per rank": False}
    packed["results"] = [row(256, 30.0), row(1000, 95.0)]
    assert all(t["met"] for t in targets(packed))
