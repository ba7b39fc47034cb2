"""Freak's routes at the root: ``/get``, ``/get/{path}``, ``/get_from_path``, ``PUT
/set/{path}``, ``PATCH /set[/{path}]``, ``DELETE /reset``, answering ``"success"`` as Freak.

Which run they act on: the gateway's ``--run`` if it was given; else the only live run
(at least one rank alive). With no live run they answer 404, with several 409 listing
them (each with its own routes), so ``control(state)`` followed by ``curl
localhost:4444/get`` works as in Freak without naming the generated run id.

Which ranks: reads come from ``--rank`` (default rank 0); writes go to ``--rank`` if it
was given, else to every rank of the run (a change that only rank 0 took would split a
distributed training silently). Each write answers ``"success"`` when every rank applied
it; a change that every rank refused answers the error itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Final

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from runctl.bus.client import Client, Gathered, Result
from runctl.bus.errors import AmbiguousRun, NotFound
from runctl.bus.subjects import ALL
from runctl.gateway import routes
from runctl.gateway.routes import ClientDep, Fresh, PathParam, Value
from runctl.gateway.settings import Settings
from runctl.gateway.writes import SET_BODY

__all__ = ["RootTarget", "read_at_root", "root_target", "router", "set_at_root"]

router = APIRouter()
_FREAK: Final[list[str | Enum]] = ["freak-compatible"]


@dataclass(frozen=True, slots=True)
class RootTarget:
    """The run the root routes act on, the rank they read from and the one they write to."""

    run: str
    read_rank: str
    write_rank: str


async def root_target(request: Request, client: Client) -> RootTarget:
    """The run and ranks the root routes act on (module docs)."""
    settings: Settings = request.app.state.settings
    read_rank = settings.default_rank or "0"
    write_rank = settings.default_rank or ALL
    if settings.default_run is not None:
        return RootTarget(settings.default_run, read_rank, write_rank)
    live: dict[str, None] = {}
    known: dict[str, None] = {}
    for info in await client.runs():
        known[info.record.run] = None
        if info.liveness == "alive":
            live[info.record.run] = None
    if len(live) == 1:
        return RootTarget(next(iter(live)), read_rank, write_rank)
    if live:
        raise AmbiguousRun(sorted(live))
    others = f" (the registry knows {', '.join(sorted(known)[:10])}, none alive)" if known else ""
    raise NotFound(
        "",
        message=f"no live run{others}: start a program with control(state), or use "
        "/runs/{run}/ranks/{rank}/... for a run that has exited",
    )


def _success(run: str, result: Result | Gathered) -> Response:
    """``"success"`` as Freak; a change every rank refused is that error (422 with
    pydantic's list, 404 for an unknown path ...), as for one rank."""
    if isinstance(result, Gathered) and result.errors and not (result.results or result.missing):
        raise result.errors[result.acknowledged[0]]
    return routes.write_response(run, result, freak=True)


async def read_at_root(request: Request, client: Client, path: str | None, fresh: bool) -> Response:
    """A read on the root routes (``GET /get[/{path}]``, ``/get_from_path``): the root
    run's read rank. Also the gateway's fast path (gateway/hot.py)."""
    t = await root_target(request, client)
    return await routes.read(client, t.run, t.read_rank, path, fresh)


async def set_at_root(request: Request, client: Client, path: str, value: str | None) -> Response:
    """``PUT /set/{path}`` on the root routes: the root run's write rank(s), answered
    ``"success"``. Also the gateway's fast path (gateway/hot.py)."""
    t = await root_target(request, client)
    result = await routes.set_value_of(client, request, t.run, t.write_rank, path, value, {})
    return _success(t.run, result)


@router.get("/get", summary="Read the state", tags=_FREAK)
async def freak_get(request: Request, client: ClientDep, fresh: Fresh = False) -> Response:
    """The state's JSON, as Freak's `GET /get`."""
    return await read_at_root(request, client, None, fresh)


@router.get("/get/{path:path}", summary="Read one value", tags=_FREAK)
async def freak_get_value(
    request: Request, path: PathParam, client: ClientDep, fresh: Fresh = False
) -> Response:
    """The value at a path (`lr`, `model/head`), as Freak's `GET /get/{path}`."""
    return await read_at_root(request, client, path, fresh)


@router.get("/get_from_path", summary="Read one value (path in the query)", tags=_FREAK)
async def freak_get_from_path(
    request: Request,
    client: ClientDep,
    path: Annotated[str, Query(description="dotted path, e.g. `optimizer.lr`")],
    fresh: Fresh = False,
) -> Response:
    """The value at `?path=`, as Freak's `GET /get_from_path`."""
    return await read_at_root(request, client, path, fresh)


@router.put("/set/{path:path}", summary="Set one value", tags=_FREAK, openapi_extra=SET_BODY)
async def freak_set(
    request: Request, path: PathParam, client: ClientDep, value: Value = None
) -> Response:
    """The JSON body, else `?value=`; answers `"success"` as Freak did."""
    return await set_at_root(request, client, path, value)


@router.patch(
    "/set",
    summary="Merge a partial state",
    tags=_FREAK,
    openapi_extra=routes.PATCH_BODY,
)
async def freak_patch(request: Request, client: ClientDep) -> Response:
    """Merge a JSON object into the state; answers `"success"` as Freak did."""
    t = await root_target(request, client)
    return _success(t.run, await routes.patch_of(client, request, t.run, t.write_rank, None, {}))


@router.patch(
    "/set/{path:path}",
    summary="Merge into a sub-tree",
    tags=_FREAK,
    openapi_extra=routes.PATCH_BODY,
)
async def freak_patch_at(request: Request, path: PathParam, client: ClientDep) -> Response:
    """Merge a JSON object into the object at `path`; answers `"success"`."""
    t = await root_target(request, client)
    return _success(t.run, await routes.patch_of(client, request, t.run, t.write_rank, path, {}))


@router.delete("/reset", summary="Back to the initial state", tags=_FREAK)
async def freak_reset(request: Request, client: ClientDep) -> Response:
    """Back to the state at `control()` time; answers `"success"`."""
    t = await root_target(request, client)
    return _success(t.run, await routes.reset_of(client, t.run, t.write_rank, {}))
