"""Zero setup: with no NATS URL configured, an agent takes a lease on the machine's shared
nats-server and gateway (:mod:`runctl.agent.embedded_lease`), started by the first program
that needs them and stopped after the last one exits (:mod:`runctl.agent.embedded_host`).

Two hooks for the agent: :func:`take_lease` before connecting (it logs the one honest
line about who started the server) and :func:`announce_access` once ready (it prints
where the state can be read and changed).
"""

from __future__ import annotations

import contextlib
import os
import sys

import anyio
from structlog.typing import FilteringBoundLogger

from runctl.agent.announce import access_line, server_log_fields
from runctl.agent.embedded_lease import EmbeddedConfig, Lease, acquire
from runctl.bus.errors import RunctlError
from runctl.bus.registry import ANSWERING, Registry, liveness

__all__ = ["announce_access", "take_lease"]


async def take_lease(
    config: EmbeddedConfig, data_dir: str | os.PathLike[str], log: FilteringBoundLogger
) -> Lease:
    """The embedded bus's lease (a thread waits for the host), and its one log line."""
    lease = await anyio.to_thread.run_sync(acquire, config, data_dir, abandon_on_cancel=True)
    event, fields = server_log_fields(lease)
    log.info(event, **fields)
    return lease


async def announce_access(
    lease: Lease, run: str, rank: str, registry: Registry | None = None
) -> None:
    """Print where the state can be read and changed, once the gateway is up (or is
    known not to be). Rank 0 speaks for the run; the other ranks stay quiet."""
    if rank != "0":
        return
    url, why_not = await anyio.to_thread.run_sync(lease.gateway, abandon_on_cancel=True)
    others = await _other_live_runs(registry, run) if url is not None else []
    print(access_line(run, lease, url, why_not, others), file=sys.stderr, flush=True)


async def _other_live_runs(registry: Registry | None, run: str) -> list[str]:
    """The other runs with a rank that answers: where they are, the root routes cannot
    choose. Unknown (the registry is slow or unreadable) counts as none."""
    if registry is None:
        return []
    records = []
    with anyio.move_on_after(2.0):
        with contextlib.suppress(RunctlError, OSError):
            records = await registry.records()
    return sorted({r.run for r in records if r.run != run and liveness(r) in ANSWERING})
