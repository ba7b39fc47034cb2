"""In CI nothing that the README's test command installs may be skipped.

With ``RUNCTL_REQUIRE_ALL=1`` (``.ci/run`` sets it) a skipped test, or a skipped test
module (``pytest.importorskip("torch")`` without the ``distributed`` extra), fails instead,
naming why it would have skipped: a real-DDP, torchrun or embedded-server test that did not
run is a failure there, never a quiet "s". Only the skips in :data:`OPTIONAL` stay skips:
they need a tool the test command does not install (node, docker, Freak's benchmark venv).

Loaded by tests/conftest.py (``pytest_plugins``).
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Final

import pytest

__all__ = ["OPTIONAL", "REQUIRE_ALL"]

#: the environment variable that turns skips into failures
REQUIRE_ALL: Final = "RUNCTL_REQUIRE_ALL"
#: (test file, words of the skip's reason) that may still skip: tools outside the
#: README's test command
OPTIONAL: Final = (
    ("test_freak_answers.py", "needs node"),
    ("test_deploy.py", "docker"),
    ("test_bench_smoke.py", "Freak's venv"),
)


def _required() -> bool:
    return os.environ.get(REQUIRE_ALL) == "1"


def _reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _optional(file: str, reason: str) -> bool:
    return any(file == name and words in reason for name, words in OPTIONAL)


def _failed(reason: str) -> str:
    return f"skipped, but {REQUIRE_ALL}=1 (CI) requires it to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or not _required() or hasattr(report, "wasxfail"):
        return
    reason = _reason(report.longrepr)
    if _optional(item.path.name, reason):
        return
    report.outcome = "failed"
    report.longrepr = _failed(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if not report.skipped or not _required():
        return
    reason = _reason(report.longrepr)
    if _optional(collector.path.name, reason):
        return
    report.outcome = "failed"
    report.longrepr = _failed(reason)
