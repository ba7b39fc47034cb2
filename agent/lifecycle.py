"""The steps of an agent's life on the bus, in order: connect, subscribe, announce, open the
step log (:meth:`runctl.agent.Agent.serve` runs them), then shut down.

Each step takes what it needs and returns what it made, so the agent holds every resource
as soon as it exists (a lease taken before a failed connect is still given back).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import anyio
import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from structlog.typing import FilteringBoundLogger

from runctl.agent.commands import RankState
from runctl.agent.embedded_lease import Lease
from runctl.agent.publish import PUBLISH_TIMEOUT, Publisher
from runctl.agent.steps.log import StepLog
from runctl.bus import statestore
from runctl.bus.connection import close_quietly, connect
from runctl.bus.direct import subscribe_now
from runctl.bus.registry import Registry
from runctl.bus.subjects import command_wildcards

__all__ = ["announce", "connect_agent", "open_steplog", "shutdown", "subscribe_commands"]


async def connect_agent(
    url: str,
    run: str,
    rank: str,
    log: FilteringBoundLogger,
    on_error: Callable[[str], object] | None = None,
    *,
    connection: NATS | None = None,
) -> tuple[NATS, Registry | None]:
    """Connect as ``agent`` (retrying until the server answers; ``on_error(why)`` hears
    each refusal), or use the caller's ``connection``, and open the registry. Without
    JetStream the registry is None: control still works, discovery does not."""
    nc = connection or await connect(
        url,
        name=f"runctl-agent:{run}:{rank}",
        retry_initial=True,
        role="agent",
        on_error=on_error,
    )
    try:
        with anyio.fail_after(5):
            registry = await Registry.open(nc)
    except Exception as exc:
        log.warning("rank registry unavailable", error=str(exc) or type(exc).__name__)
        return nc, None
    try:  # recent states, for the console's curves (bus/statestore.py)
        with anyio.fail_after(5):
            await statestore.ensure_stream(nc.jetstream())
    except Exception as exc:
        log.warning("state history unavailable", error=str(exc) or type(exc).__name__)
    return nc, registry


async def subscribe_commands(
    nc: NATS, run: str, rank: str, handler: Callable[[Msg], None]
) -> list[Subscription]:
    """Subscribe ``handler`` to this rank's command subjects and its run's broadcasts,
    called as each command is read (:func:`runctl.bus.direct.subscribe_now`)."""
    subs = [await subscribe_now(nc, subject, handler) for subject in command_wildcards(run, rank)]
    await nc.flush(timeout=5)
    return subs


async def announce(publisher: Publisher, rank: RankState) -> None:
    """Write the model's schema, publish the first state and the ``started`` event."""
    live = rank.live
    if publisher.registry is not None:
        schema = msgspec.json.encode(live.schema())
        await publisher.bounded(publisher.registry.put_schema(rank.run, rank.rank, schema))
    await publisher.wait(await publisher.state(live.dump_json(), cause="started"))
    await publisher.event(
        "started",
        host=rank.host,
        pid=rank.pid,
        model=type(live.model).__name__,
        world_size=rank.world_size,
    )


async def open_steplog(nc: NATS, rank: RankState, log: FilteringBoundLogger) -> StepLog | str:
    """Load this rank's and the run's completed steps (before ``ready``, so a program's
    first ``is_done()`` after ``wait_ready()`` is right). Returns the log, or why it is
    unavailable: without JetStream the agent still serves and the step API raises
    Unavailable naming the cause."""
    try:
        return await StepLog.open(nc, run=rank.run, rank=rank.rank, host=rank.host, pid=rank.pid)
    except Exception as exc:
        error = str(exc) or type(exc).__name__
        log.warning("step log unavailable", error=error)
        return error


async def shutdown(
    nc: NATS | None,
    *,
    publisher: Publisher,
    steplog: StepLog | None,
    subs: list[Subscription],
    lease: Lease | None,
    owned: bool = True,
) -> None:
    """Flush queued step completions, publish the final record and ``exited``, unsubscribe
    and drain (each bounded), close (a connection not ``owned`` -- the caller's, shared with
    other agents -- is flushed instead: it stays open); then give the embedded server's
    lease back."""
    if nc is not None and not nc.is_closed:
        if steplog is not None:  # flush queued step completions (bounded)
            await steplog.aclose()
        publisher.exited = True
        if nc.is_connected:
            await publisher.wait(await publisher.record(publisher.rank.live.dump_json()))
            await publisher.event(
                "exited", reason=publisher.rank.stop_reason, error=publisher.exit.error
            )
        for sub in subs:
            with anyio.move_on_after(PUBLISH_TIMEOUT):
                await sub.unsubscribe()
        if owned:
            with anyio.move_on_after(2):
                await nc.drain()
            await close_quietly(nc)
        else:
            with anyio.move_on_after(2), contextlib.suppress(Exception):
                await nc.flush()
    if lease is not None:  # after the goodbye: the host may stop the bus now
        lease.close()
