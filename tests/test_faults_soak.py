"""A few seconds of the soak (``just soak`` runs it for 60 s): mixed HTTP traffic while a
rank logs steps; no request fails and every step completion is stored."""

from __future__ import annotations

from pathlib import Path

from faultkit import figures

from bench.soak import run_soak


def test_a_short_soak_fails_nothing_and_loses_no_step(tmp_path: Path) -> None:
    result = run_soak(3.0, concurrency=2, ranks=1, step_rate=50.0, workdir=tmp_path)
    assert result.requests > 0 and set(result.by_kind) >= {"get", "set"}
    assert result.failed == 0, result.statuses
    assert not result.errors, result.errors
    assert result.steps_stored == min(2000, result.steps["rank0"]) > 0
    figures("soak_smoke", **result.to_json())
