"""Facts about the machine and the software that every benchmark's JSON records."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from runctl.bus.server import find_binary

__all__ = ["cpu_model", "machine", "nats_server_version", "package_version"]


def package_version(dist: str, default: str = "unknown") -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return default


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def nats_server_version() -> str:
    try:
        return subprocess.run(
            [find_binary(), "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except Exception as exc:  # a benchmark still runs and says why the version is missing
        return f"unknown ({exc})"


def machine() -> dict[str, object]:
    """CPU, load, Python, nats-server and nats-py versions: a result file's ``machine``."""
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0],
        "python": platform.python_version(),
        "nats_server": nats_server_version(),
        "nats_py": package_version("nats-py"),
    }
