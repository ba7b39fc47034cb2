"""What a program with nothing configured tells its user: where its state can be read and
changed (one printed line), and which bus it uses (one log line that says who started it).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from runctl.agent.embedded_lease import Lease

__all__ = ["access_line", "runctl_command", "server_log_fields"]


def runctl_command() -> str:
    """How to run ``runctl`` from here as typed: ``runctl`` when the shell finds this
    environment's script, else its path (``.venv/bin/runctl``), else ``python -m runctl``."""
    script = Path(sys.executable).parent / "runctl"
    found = shutil.which("runctl")
    if found is not None and (not script.exists() or Path(found).resolve() == script.resolve()):
        return "runctl"
    if script.exists():
        return _short(script)
    return f"{_short(Path(sys.executable))} -m runctl"


def _short(path: Path) -> str:
    """Relative to the working directory when inside it (``.venv/bin/runctl``)."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def access_line(run: str, lease: Lease, gateway_url: str | None, why_not: str) -> str:
    """The one line ``control()`` prints with the embedded bus."""
    cli = f"{runctl_command()} get {run}"
    if gateway_url is not None:
        return (
            f"runctl: run {run!r}: console at {gateway_url}/console/{run}, "
            f"state at {gateway_url}/get, set with "
            f"curl -X PUT '{gateway_url}/set/FIELD?value=V', typed forms at "
            f"{gateway_url}/runs/{run}/docs; or {cli}"
        )
    hint = "" if why_not == "turned off" else " (runctl gateway --port N serves it)"
    return f"runctl: run {run!r} on {lease.nats_url}: {cli}; no HTTP gateway: {why_not}{hint}"


def server_log_fields(lease: Lease) -> tuple[str, dict[str, Any]]:
    """The honest log line about the bus: started here, shared, or someone else's."""
    fields: dict[str, Any] = {"url": lease.nats_url}
    if not lease.started_server:
        return "using the nats-server already listening", fields
    fields["store"] = lease.store
    if lease.started_host:
        return "started the embedded nats-server (it stops when its last user exits)", fields
    fields["started_by_pid"] = lease.owner
    fields["users"] = lease.users
    return "using the embedded nats-server another program started", fields
