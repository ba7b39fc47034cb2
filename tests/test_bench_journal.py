"""The change journal's benchmark runs end to end at a tiny size (no timing asserted: the
figures live in docs/performance.md). Its first full run here hung on a rank's READY line
that shared its line with runctl's own log line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_journal_bench_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_journal", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (written,) = tmp_path.glob("journal-quick-*.json")
    results = json.loads(written.read_text())["results"]
    assert results["replay"]["replayed"] == results["replay"]["changes"] == 300
    for mode in ("sleep", "hold"):
        assert results["set"][mode]["on"]["n"] == results["set"][mode]["off"]["n"] == 30
    assert results["loop_rate"]["on"]["idle_per_s"] > 0
    assert "replay of 300 journaled changes" in out.stdout
