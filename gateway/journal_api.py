"""HTTP routes for the change journal, served from JetStream (they work after every rank
of the run has exited):

    GET    /runs/{run}/history                ?rank=R &path=P &since=T &until=T &limit=N
    POST   /runs/{run}/undo                   the latest change not undone  (?force=true)
    POST   /runs/{run}/undo/{change}          a change by id or id prefix   (?force=true)
    GET    /runs/{run}/schedules              changes scheduled at a step   (?all=true)
    POST   /runs/{run}/schedules/{change}/cancel
    DELETE /runs/{run}/history                remove the run's journal (admin)

Roles: reads need ``read``; undo and cancel ``write``; removing the journal ``admin``. The
author of an undo or a cancel is the caller's token (name and role), as for any change.
Times (``since``, ``until``) are unix seconds, ISO 8601, or an age such as ``90s``,
``15m``, ``2h``, ``3d`` (that long ago).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from starlette.responses import Response

from runctl.bus.journalplan import parse_time
from runctl.bus.paths import split_path
from runctl.bus.subjects import check_token
from runctl.gateway.errors import json_response
from runctl.gateway.routes import ClientDep, RunParam

__all__ = ["router"]

router = APIRouter(tags=["journal"])
ChangeParam = Annotated[
    str, Path(description="a change id, or its first characters (at least 4)", min_length=4)
]
Force = Annotated[bool, Query(description="undo even when a later change touched the same fields")]


@router.get("/runs/{run}/history", summary="The run's changes, newest first")
async def history(
    run: RunParam,
    client: ClientDep,
    rank: Annotated[str | None, Query(description="only changes that reached this rank")] = None,
    path: Annotated[
        str | None, Query(description="only changes that named or changed this field")
    ] = None,
    since: Annotated[str | None, Query(description="unix seconds, ISO 8601, or an age")] = None,
    until: Annotated[str | None, Query(description="unix seconds, ISO 8601, or an age")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> Response:
    """Each change: who (token name and role, `user@host`, the NATS user), when, what (the
    request as sent), at which step, and each rank's outcome (version before and after,
    the field-level diff, or the rejection with pydantic's errors)."""
    run = check_token(run, "run")
    if path:
        split_path(path)  # 400 for a malformed one; any well-formed path is a filter
    entries = await client.history(
        run,
        rank=rank,
        path=path or None,
        since=parse_time(since),
        until=parse_time(until),
        limit=limit,
    )
    return json_response({"run": run, "changes": [e.to_json() for e in entries]})


@router.post("/runs/{run}/undo", summary="Undo the latest change")
async def undo_latest(run: RunParam, client: ClientDep, force: Force = False) -> Response:
    """Set exactly the fields the latest change (not already undone) changed back to their
    recorded values; 409 when a later change touched them, unless `force=true`."""
    return _undone(await client.undo(check_token(run, "run"), None, force=force))


@router.post("/runs/{run}/undo/{change}", summary="Undo one change")
async def undo_change(
    run: RunParam, change: ChangeParam, client: ClientDep, force: Force = False
) -> Response:
    """As `POST /runs/{run}/undo`, for the change with this id (or id prefix)."""
    check_token(change, "change id")
    return _undone(await client.undo(check_token(run, "run"), change, force=force))


def _undone(result: Any) -> Response:
    body = result.to_json()
    ranks = body["ranks"].values()
    applied = [r for r in ranks if r.get("outcome") == "applied"]
    status = 200 if applied and len(applied) == len(body["ranks"]) else 207
    return json_response(body, status)


@router.get("/runs/{run}/schedules", summary="Changes scheduled at a step")
async def schedules(
    run: RunParam,
    client: ClientDep,
    all: Annotated[bool, Query(description="also those applied or cancelled")] = False,
) -> Response:
    """Changes scheduled at a step that have not applied yet, oldest first."""
    run = check_token(run, "run")
    entries = await client.schedules(run, include_done=all)
    return json_response({"run": run, "schedules": [e.to_json() for e in entries]})


@router.post("/runs/{run}/schedules/{change}/cancel", summary="Cancel a scheduled change")
async def cancel_schedule(run: RunParam, change: ChangeParam, client: ClientDep) -> Response:
    """Every live rank drops it, and the journal records the cancellation: a rank that
    starts later does not apply it either."""
    check_token(change, "change id")
    return json_response(await client.unschedule(check_token(run, "run"), change))


@router.delete("/runs/{run}/history", summary="Remove the run's change journal (admin)")
async def forget_history(run: RunParam, client: ClientDep) -> Response:
    """A rank that starts afterwards replays nothing; the history is gone."""
    run = check_token(run, "run")
    return json_response({"run": run, "removed": await client.forget_history(run)})
