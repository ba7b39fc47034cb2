"""HTTP routes for the completed-step log, served from JetStream, so they work
after every rank has exited.

    GET    /runs/{run}/steps                 ?rank=R &status=done|running|interrupted|failed
                                             &name=N &limit=N &explain=true
                                             &config=NAME=JSON (repeatable)
    DELETE /runs/{run}/steps/{step}          ?successors=true &rank=R   (step: name, name:key)
    DELETE /runs/{run}/steps?everything=true                            (the whole run)

The JSON views themselves are :mod:`runctl.bus.stepviews` (the CLI uses the same). The
routes need a connected :class:`runctl.bus.Client`: by default ``app.state.client``; a gateway
that keeps it elsewhere overrides the :func:`runctl.gateway.routes.get_client` dependency
(``app.dependency_overrides[get_client] = ...``), as for every route. Roles come from the app's own
``require()`` dependency (DELETE needs admin). Errors are raised as runctl errors and answered
by the app's handler (:func:`runctl.gateway.errors.install`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Query

from runctl.bus.errors import BadRequest
from runctl.bus.stepviews import forget_steps, steps_view
from runctl.gateway.routes import ClientDep

__all__ = ["router"]

router = APIRouter(tags=["steps"])


@router.get("/runs/{run}/steps")
async def get_steps(
    run: str,
    client: ClientDep,
    rank: str | None = None,
    status: str | None = None,
    name: str | None = None,
    explain: bool = False,
    config: Annotated[list[str] | None, Query()] = None,
    limit: int | None = None,
) -> Any:
    """The run's completed-step log (every rank, or one rank and the run scope), in
    first-start order; ``limit`` keeps the last N rows (``count`` is always the total)."""
    view = await steps_view(
        client,
        run,
        rank=rank,
        status=status,
        name=name,
        with_explain=explain,
        configs=config,
        limit=limit,
    )
    return _json(view)


@router.delete("/runs/{run}/steps/{step}")
async def delete_step(
    run: str,
    step: str,
    client: ClientDep,
    successors: bool = False,
    rank: str | None = None,
) -> Any:
    """Forget one step (``name`` or ``name:key``), with ``successors`` also every step
    started after it; live agents drop them from their done sets."""
    return await forget_steps(client, run, step, successors=successors, rank=rank, by="http")


@router.delete("/runs/{run}/steps")
async def delete_run_steps(
    run: str,
    client: ClientDep,
    everything: bool = False,
    rank: str | None = None,
) -> Any:
    """Forget every step of the run (``everything=true`` is required: it cannot be undone)."""
    if not everything:
        raise BadRequest("forgetting a whole run needs ?everything=true")
    return await forget_steps(client, run, None, rank=rank, by="http")


def _json(view: dict[str, Any]) -> Any:
    # records hold arbitrary JSON (configs, results): msgspec already made it plain data
    return msgspec.to_builtins(view)


@router.get("/runs/{run}/artifacts")
async def get_artifacts(run: str, client: ClientDep) -> Any:
    """What the run keeps in the object store: step results and attached files (checkpoints
    among them), by object name ``<run>/<scope>/<step>/<id>/<attempt>/<part>``."""
    infos = await client.artifacts(run)
    return {
        "run": run,
        "count": len(infos),
        "bytes": sum(i.size for i in infos),
        "artifacts": [
            {"name": i.name, "size": i.size, "digest": i.digest, "mtime": i.mtime} for i in infos
        ],
    }
