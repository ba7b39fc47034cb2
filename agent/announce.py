"""What a program with nothing configured tells its user: where its state can be read and
changed (one printed line), and which bus it uses (one log line that says who started it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from runctl.agent.embedded_lease import Lease
from runctl.bus.messages import RunRecord
from runctl.bus.shell import runctl_command

__all__ = ["access_line", "recorded_stop_line", "server_log_fields"]


def access_line(
    run: str,
    lease: Lease,
    gateway_url: str | None,
    why_not: str,
    others: Sequence[str] = (),
) -> str:
    """The one line ``control()`` prints with the embedded bus. ``others``: the other runs
    live on this bus, where the root routes (``/get``, ``/set``) answer 409 with their list:
    the line then gives the run's own routes."""
    cli = f"{runctl_command()} get {run}"
    if gateway_url is not None:
        if others:
            read = f"{gateway_url}/runs/{run}/ranks/0/get"
            write = f"{gateway_url}/runs/{run}/ranks/all/set/FIELD?value=V"
            shared = f" ({len(others)} other run(s) live here, so /get needs the run)"
        else:
            read, write, shared = f"{gateway_url}/get", f"{gateway_url}/set/FIELD?value=V", ""
        return (
            f"runctl: run {run!r}: console at {gateway_url}/console/{run}, "
            f"state at {read}{shared}, set with curl -X PUT '{write}', typed forms at "
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


def recorded_stop_line(record: RunRecord, rank: str, now: float | None = None) -> str:
    """Why a program stops as soon as it starts (a run-wide stop recorded before it), and
    how to start fresh."""
    ago = max(0.0, (time.time() if now is None else now) - record.ts)
    reason = f" ({record.reason})" if record.reason else ""
    return (
        f"runctl: run {record.run!r} was stopped {ago:.0f}s ago{reason}, so rank {rank} "
        f"stops at once (ctl.stop_requested is set). To start fresh, use another run id "
        f"(run=..., or RUNCTL_RUN), or forget that stop: {runctl_command()} forget "
        f"{record.run} --stop"
    )
