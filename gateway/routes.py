"""The HTTP API: runs, ranks, and each rank's live state.

``{rank}`` is a rank or ``all``. Reads come from the registry's last published state (they
never wake the program) unless ``?fresh=true``. A one-rank read answers with the state's
JSON itself (as Freak did), its version and liveness in ``X-Runctl-*`` headers; ``all``
answers with every rank's outcome.

A write to ``all`` answers 200 when every rank applied it, 207 when some did not (each
rank's ``outcome``: applied, rejected with its detail, or no_answer), and the error's own
status (422, 400 ...) when none did.

The Freak-compatible root routes (``/get``, ``/set/...``, ``/reset``, ``/get_from_path``)
are in :mod:`runctl.gateway.freak`.

Why one module of this size: one route per operation of the HTTP API, each a few lines over
the shared implementations at the top, so the whole API surface (paths, parameters,
statuses) is read in one place, as FastAPI documents it.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from fastapi import APIRouter, Depends, Path, Query, Request
from starlette.responses import Response

from runctl.bus.client import Client, Gathered, Result
from runctl.bus.credentials import redact_url
from runctl.bus.errors import BadRequest, NotFound, RunctlError, Unavailable, UnreadableRecord
from runctl.bus.messages import MAX_GRACE
from runctl.bus.paths import split_path
from runctl.bus.registry import RankInfo, run_spread
from runctl.bus.subjects import ALL, check_rank, check_token
from runctl.bus.views import rank_summary, run_counts, write_outcome
from runctl.gateway import writes
from runctl.gateway.errors import json_response
from runctl.gateway.settings import Settings

__all__ = [
    "PATCH_BODY",
    "ClientDep",
    "Fresh",
    "PathParam",
    "RunParam",
    "Value",
    "get_client",
    "patch_of",
    "read",
    "reset_of",
    "router",
    "set_answer",
    "set_value_of",
    "write_response",
]

router = APIRouter()
R: Final = "/runs/{run}/ranks/{rank}"
PATCH_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "additionalProperties": True},
                "example": {"optimizer": {"lr": 0.01}},
            }
        },
    }
}


async def get_client(request: Request) -> Client:  # async: no thread-pool hop per request
    """The gateway's connection; ``Unavailable`` (503) while it has none or lost it."""
    client = getattr(request.app.state, "client", None)
    if not isinstance(client, Client):
        settings: Settings | None = getattr(request.app.state, "settings", None)
        url = settings.nats_url if settings is not None else None
        where = f" at {redact_url(url)}" if url else ""
        raise Unavailable(f"the gateway is not connected to NATS{where} yet")
    if not client.nc.is_connected:
        raise Unavailable("the gateway lost its NATS connection (reconnecting)")
    return client


ClientDep = Annotated[Client, Depends(get_client)]
RunParam = Annotated[str, Path(description="run id", examples=["demo"])]
RankParam = Annotated[str, Path(description="a rank, or `all` for every rank", examples=["0"])]
PathParam = Annotated[
    str, Path(description="dotted path (`optimizer.lr`); `/` also separates (`optimizer/lr`)")
]
Fresh = Annotated[
    bool, Query(description="ask the rank itself instead of reading its last published state")
]
Sync = Annotated[
    bool,
    Query(
        description="apply on every rank at the same step (needs `ctl.sync(step)` in the "
        "program; rank must be `all`)"
    ),
]
Margin = Annotated[int | None, Query(ge=0, description="with sync: steps ahead to apply at")]
Value = Annotated[
    str | None,
    Query(
        description="as typed: JSON if the field takes it (`0.01`, `null`, `[1,2]`), else the "
        "text; a JSON body wins over it"
    ),
]
AtStep = Annotated[
    int | None,
    Query(
        ge=0,
        description="apply at this step (`ctl.sync(step)` in the program), on the rank or "
        "every rank; journaled, so a rank that restarts before it still applies it there",
    ),
]


# --- helpers -----------------------------------------------------------------------------


def _target(run: str, rank: str) -> tuple[str, str]:
    return check_token(run, "run"), check_rank(rank)


def _dotted(path: str | None) -> str | None:
    """``a/b.c`` -> ``a.b.c``; checked here so a bad path never reaches the bus."""
    if path is None:
        return None
    dotted = path.strip("/").replace("/", ".")
    split_path(dotted)
    return dotted or None


def _sync_options(
    rank: str, sync: bool, margin: int | None, at_step: int | None = None
) -> dict[str, Any]:
    if at_step is not None:
        if sync or margin is not None:
            raise BadRequest("at_step is a step of its own: not with sync or margin")
        return {"at_step": at_step}
    if not sync:
        if margin is not None:
            raise BadRequest("margin applies only to a synchronised change (sync=true)")
        return {}
    if rank != ALL:
        raise BadRequest("a synchronised change applies to every rank: use rank 'all'")
    return {"sync": True, "margin": margin}


def _gathered_status(g: Gathered) -> int:
    if g.results:
        return 200 if not g.errors and not g.missing else 207
    if g.errors:  # nobody applied it: the first rank's error says why
        return g.errors[g.acknowledged[0]].http_status
    return 504  # pragma: no cover - the client raises Timeout for this case


def _gathered_response(g: Gathered, *, freak: bool = False) -> Response:
    status = _gathered_status(g)
    headers = {"X-Runctl-Missing": ",".join(g.missing)} if g.missing else None
    if freak and status == 200 and g.verb != "get":
        return json_response("success", headers=headers)
    return json_response(g.to_json(), status, headers)


def _read_response(result: Result | Gathered) -> Response:
    if isinstance(result, Gathered):
        return _gathered_response(result)
    return json_response(
        result.value,
        headers={
            "X-Runctl-Version": str(result.version),
            "X-Runctl-Status": result.liveness,
            "X-Runctl-Age": f"{result.age:.3f}",
            "X-Runctl-Source": result.source,
        },
    )


def write_response(run: str, result: Result | Gathered, *, freak: bool = False) -> Response:
    """A write's answer: one rank's outcome, or every rank's (200/207/the error's status);
    ``freak``: ``"success"`` when every rank applied it."""
    if isinstance(result, Gathered):
        return _gathered_response(result, freak=freak)
    headers = {
        "X-Runctl-Version": str(result.version),
        "X-Runctl-Changed": "true" if result.changed else "false",
    }
    if result.change_id:
        headers["X-Runctl-Change"] = result.change_id
    if freak:
        return json_response("success", headers=headers)
    return json_response(write_outcome(run, result), headers=headers)


async def _patch_body(request: Request) -> dict[str, Any]:
    has_body, value = await writes.read_json_body(request)
    if not has_body:
        raise BadRequest("a patch needs a JSON object as the request body")
    if not isinstance(value, dict):
        raise BadRequest(f"a patch must be a JSON object, not {type(value).__name__}")
    return value


# --- shared implementations (also the Freak-compatible root routes', gateway.freak) -------


async def read(client: Client, run: str, rank: str, path: str | None, fresh: bool) -> Response:
    """A read's answer: the state (or value) itself with ``X-Runctl-*`` headers, or every
    rank's outcome for ``all``."""
    run, rank = _target(run, rank)
    return _read_response(await client.get(run, rank, _dotted(path), fresh=fresh))


async def set_value_of(
    client: Client,
    request: Request,
    run: str,
    rank: str,
    path: str,
    value: str | None,
    options: dict[str, Any],
) -> Result | Gathered:
    """Set the typed-in ``value`` at ``path`` (``/`` or ``.`` separated), names checked first."""
    run, rank = _target(run, rank)
    dotted = _dotted(path) or ""
    return await writes.set_from_request(client, request, run, rank, dotted, value, options)


async def set_answer(
    client: Client,
    request: Request,
    run: str,
    rank: str,
    path: str,
    value: str | None,
    options: dict[str, Any],
) -> Response:
    """A set's answer: each rank's outcome (also the gateway's fast path's, gateway/hot.py)."""
    return write_response(run, await set_value_of(client, request, run, rank, path, value, options))


async def patch_of(
    client: Client,
    request: Request,
    run: str,
    rank: str,
    path: str | None,
    options: dict[str, Any],
) -> Result | Gathered:
    """Merge the request's JSON body at ``path`` (or the whole state), names checked first."""
    run, rank = _target(run, rank)
    dotted = _dotted(path)
    body = await _patch_body(request)
    patch = client.patch(run, rank, body, dotted, **options)
    return await writes.located(patch, writes.BODY, dotted)


async def reset_of(
    client: Client, run: str, rank: str, options: dict[str, Any]
) -> Result | Gathered:
    """Reset to the state at ``control()`` time, names checked first."""
    run, rank = _target(run, rank)
    return await client.reset(run, rank, **options)


# --- runs ---------------------------------------------------------------------------------


@router.get("/runs", summary="List runs and their ranks", tags=["runs"])
async def list_runs(client: ClientDep) -> Response:
    """Every run the registry knows, each rank with its liveness (alive / stalled / stale /
    exited), state version, step, heartbeat age, seconds since its program last advanced,
    host and pid; per run the step spread (which ranks lag behind the leader)."""
    by_run: dict[str, list[RankInfo]] = {}
    found, unreadable = await client.scan()
    for info in found:
        by_run.setdefault(info.record.run, []).append(info)
    body: dict[str, Any] = {
        "runs": [
            {
                "run": run,
                "counts": run_counts(infos),
                "spread": run_spread(infos).to_json(),
                "ranks": [rank_summary(i) for i in infos],
            }
            for run, infos in by_run.items()
        ]
    }
    if unreadable:
        body["unreadable"] = [{"key": u.key, "error": u.problem} for u in unreadable]
    return json_response(body)


@router.get("/runs/{run}", summary="One run and its ranks", tags=["runs"])
async def get_run(run: RunParam, client: ClientDep) -> Response:
    """The run's ranks (404 if the registry has none), and a run-wide stop if one was sent.
    Records that cannot be decoded are listed under `unreadable` (key and error), not
    served as a 500 for the whole run."""
    run = check_token(run, "run")
    infos, unreadable = await client.scan(run)
    record = None
    try:
        record = await (await client.registry()).get_run(run)
    except UnreadableRecord as exc:
        unreadable.append(exc)
    except (RunctlError, OSError):
        pass
    if not infos and not unreadable:
        raise NotFound(run)
    body: dict[str, Any] = {
        "run": run,
        "counts": run_counts(infos),
        "spread": run_spread(infos).to_json(),
        "ranks": [rank_summary(i) for i in infos],
    }
    if record is not None:
        body["run_record"] = msgspec.to_builtins(record)
    if unreadable:
        body["unreadable"] = [{"key": u.key, "error": u.problem} for u in unreadable]
    return json_response(body)


# --- one rank, or all --------------------------------------------------------------------


@router.get(R + "/get", summary="Read the whole state", tags=["state"])
async def get_state(
    run: RunParam, rank: RankParam, client: ClientDep, fresh: Fresh = False
) -> Response:
    """The state's JSON itself, with `X-Runctl-Version`, `X-Runctl-Status` (alive, stale,
    exited) and `X-Runctl-Age` (seconds since the rank's last heartbeat)."""
    return await read(client, run, rank, None, fresh)


@router.get(R + "/get/{path:path}", summary="Read one value", tags=["state"])
async def get_value(
    run: RunParam, rank: RankParam, path: PathParam, client: ClientDep, fresh: Fresh = False
) -> Response:
    """The value at a dotted path (`optimizer.lr` or `optimizer/lr`)."""
    return await read(client, run, rank, path, fresh)


@router.get(R + "/get_from_path", summary="Read one value (path in the query)", tags=["state"])
async def get_from_path(
    run: RunParam,
    rank: RankParam,
    client: ClientDep,
    path: Annotated[str, Query(description="dotted path, e.g. `optimizer.lr`")],
    fresh: Fresh = False,
) -> Response:
    """The value at `?path=` (Freak's form of `/get/{path}`)."""
    return await read(client, run, rank, path, fresh)


@router.put(
    R + "/set/{path:path}",
    summary="Set one value",
    tags=["state"],
    openapi_extra=writes.SET_BODY,
)
async def set_value(
    run: RunParam,
    rank: RankParam,
    path: PathParam,
    request: Request,
    client: ClientDep,
    value: Value = None,
    sync: Sync = False,
    margin: Margin = None,
    at_step: AtStep = None,
) -> Response:
    """Replace the value at `path`, validated by the program's model; 422 with pydantic's
    errors (and nothing changed) if it does not fit. The value is the JSON body, else
    `?value=`."""
    options = _sync_options(rank, sync, margin, at_step)
    return await set_answer(client, request, run, rank, path, value, options)


@router.patch(R + "/set", summary="Merge a partial state", tags=["state"], openapi_extra=PATCH_BODY)
async def patch_state(
    run: RunParam,
    rank: RankParam,
    request: Request,
    client: ClientDep,
    sync: Sync = False,
    margin: Margin = None,
    at_step: AtStep = None,
) -> Response:
    """Merge a JSON object into the state: nested objects merge (siblings are kept),
    everything else replaces. All or nothing."""
    options = _sync_options(rank, sync, margin, at_step)
    return write_response(run, await patch_of(client, request, run, rank, None, options))


@router.patch(
    R + "/set/{path:path}",
    summary="Merge into a sub-tree",
    tags=["state"],
    openapi_extra=PATCH_BODY,
)
async def patch_at(
    run: RunParam,
    rank: RankParam,
    path: PathParam,
    request: Request,
    client: ClientDep,
    sync: Sync = False,
    margin: Margin = None,
    at_step: AtStep = None,
) -> Response:
    """Merge a JSON object into the object at `path` (e.g. `optimizer`)."""
    options = _sync_options(rank, sync, margin, at_step)
    return write_response(run, await patch_of(client, request, run, rank, path, options))


@router.delete(R + "/reset", summary="Back to the initial state", tags=["state"])
async def reset_state(
    run: RunParam,
    rank: RankParam,
    client: ClientDep,
    sync: Sync = False,
    margin: Margin = None,
    at_step: AtStep = None,
) -> Response:
    """The state the program had when it called `control()`."""
    options = _sync_options(rank, sync, margin, at_step)
    return write_response(run, await reset_of(client, run, rank, options))


@router.post(R + "/stop", summary="Ask the program to stop", tags=["state"])
async def stop(
    run: RunParam,
    rank: RankParam,
    client: ClientDep,
    reason: Annotated[str, Query(max_length=1000, description="shown to the program")] = "",
    mode: Annotated[
        Literal["graceful", "terminate"],
        Query(
            description="graceful: the program sees `stop_requested`; terminate: also SIGTERM "
            "after `grace` seconds if it is still running"
        ),
    ] = "graceful",
    grace: Annotated[
        float,
        Query(
            gt=0,
            le=MAX_GRACE,
            allow_inf_nan=False,
            description="seconds, with mode=terminate (finite, at most a week)",
        ),
    ] = 30.0,
    sync: Sync = False,
    margin: Margin = None,
    checkpoint: Annotated[
        bool,
        Query(
            description="every rank saves a checkpoint (`ctl.on_checkpoint`) at the same step, "
            "then stops; the answer lists each rank's stored checkpoint (run-wide only)"
        ),
    ] = False,
    at_step: AtStep = None,
) -> Response:
    """Sets `ctl.stop_requested` (and runs `on_stop` callbacks). On `all` it is also
    recorded for the run, so a rank that starts later stops too."""
    run, rank = _target(run, rank)
    if checkpoint:
        options: dict[str, Any] = {"checkpoint": True, "margin": margin}
    else:
        options = _sync_options(rank, sync, margin, at_step)
    result = await client.stop(run, rank, reason, mode=mode, grace=grace, **options)
    return write_response(run, result)


@router.get(R + "/schema", summary="The model's JSON schema", tags=["state"])
async def schema(run: RunParam, rank: RankParam, client: ClientDep) -> Response:
    """For `all`: `{"run": ..., "ranks": {rank: schema}}`."""
    run, rank = _target(run, rank)
    if rank != ALL:
        return json_response(await client.schema(run, rank))
    ranks = {
        i.record.rank: await client.schema(run, i.record.rank) for i in await client.ranks(run)
    }
    return json_response({"run": run, "ranks": ranks})
