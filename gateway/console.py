"""The web console: ``GET /`` and stable URLs per run and rank, served by the gateway.

Static files only (``gateway/static``: HTML, CSS, JavaScript and uPlot, the charting library,
shipped inside the package): no build step and no CDN, so it works on a cluster without
internet. The page holds no data of its own: it calls the HTTP API with the bearer token
typed into it (kept in the tab's sessionStorage, never a cookie), follows the bus through
``/live`` and ``/runs/{run}/live`` (:mod:`runctl.gateway.live`) and draws the curves of
``/runs/{run}/series`` (:mod:`runctl.gateway.series`).

    /                         every run and rank
    /console/{run}            one run: ranks, curves, change and stop forms, steps, events
    /console/{run}/{rank}     one rank, and its state

The pages are sent with a strict Content-Security-Policy (scripts only from the gateway,
no framing: a hostile page cannot load the console in a frame and steer clicks).
``GET /whoami`` tells the page its token's role, so a read-only token sees no forms.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Final

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from runctl.bus.subjects import check_rank, check_token
from runctl.gateway.auth import Role, TokenTable, require
from runctl.gateway.errors import json_response

__all__ = ["SECURITY_HEADERS", "STATIC_DIR", "UPLOT_VERSION", "install", "router"]

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
#: the charting library shipped in static/vendor/uplot (MIT, see its LICENSE)
UPLOT_VERSION: Final = "1.6.32"
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter()


def _page() -> Response:
    return FileResponse(STATIC_DIR / "console.html", headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
async def index() -> Response:
    """The console's page at ``/``."""
    return _page()


@router.get("/console", include_in_schema=False)
async def console_home() -> Response:
    """The console's page, at its own address."""
    return _page()


@router.get("/console/{run}", include_in_schema=False)
async def console_run(run: str) -> Response:
    """The console's page for one run (a bad run id is a 400)."""
    check_token(run, "run")  # a bad id is a clear 400, not a page that cannot load
    return _page()


@router.get("/console/{run}/{rank}", include_in_schema=False)
async def console_rank(run: str, rank: str) -> Response:
    """The console's page for one rank (a bad run id or rank is a 400)."""
    check_token(run, "run")
    check_rank(rank, allow_all=False)
    return _page()


@router.get("/whoami", summary="The role of the caller's token", tags=["runs"])
async def whoami(request: Request, role: Annotated[Role, Depends(require("read"))]) -> Response:
    """`{"role": "read" | "write" | "admin", "tokens": bool}`; with no tokens configured
    (a loopback gateway) everyone is admin."""
    tokens = getattr(request.app.state, "tokens", None)
    return json_response({"role": role, "tokens": bool(isinstance(tokens, TokenTable) and tokens)})


class _Static(StaticFiles):
    """Static files with the console's headers; revalidated (ETag) rather than cached
    blindly, so an upgraded gateway never serves a stale script."""

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def install(app: FastAPI) -> None:
    """Serve ``/static`` from the package (called by :func:`runctl.gateway.app.create_app`)."""
    app.mount("/static", _Static(directory=STATIC_DIR), name="static")
