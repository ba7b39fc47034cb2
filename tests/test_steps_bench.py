"""The step-log benchmark runs end to end at a tiny size and writes its JSON (no timing is
asserted: numbers from a 2-core machine shared with other tests mean nothing here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import discover
from bench.bench_steps import main


def test_bench_runner_finds_the_step_bench() -> None:
    assert "bench_steps" in discover()


def test_step_bench_runs_and_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("steps-quick-*.json")
    report = json.loads(path.read_text())
    assert report["machine"]["cpus"] and report["machine"]["nats_server"]
    results = report["results"]
    assert set(results["resume"]) == {"500", "2000"}
    assert results["completions"]["sync_per_s"]["median"] > 0
    assert results["done_check"]["iterator_skip_per_item_us"]["median"] > 0
    out = capsys.readouterr().out
    assert "resume: load 2,000 steps (s)" in out and "completions/s" in out
