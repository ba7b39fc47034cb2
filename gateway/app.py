"""``create_app(settings)``: the FastAPI gateway.

The app holds one NATS connection (a :class:`runctl.bus.Client`), opened by the lifespan and
closed with it. If NATS is not reachable at start the gateway still starts, answers 503,
and keeps trying in the background: it can be started before the bus, and restarted at
any time, since it keeps nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import metadata

import anyio
import structlog
from fastapi import Depends, FastAPI

from runctl.bus.client import Client
from runctl.bus.credentials import CredentialsError, redact_url
from runctl.bus.errors import Unavailable
from runctl.gateway import (
    console,
    errors,
    freak,
    journal_api,
    live,
    routes,
    run_docs,
    series,
    steps_api,
)
from runctl.gateway.auth import require
from runctl.gateway.hot import HotRoutes
from runctl.gateway.settings import Settings
from runctl.gateway.site import SiteGuard

__all__ = ["connect_client", "create_app"]

log = structlog.get_logger()

DESCRIPTION = """\
Read and change the live pydantic state of running programs, on one rank or on every rank
of a run (`all`), through the runctl bus (NATS).

* Reads come from each rank's last published state and never wake the program; add
  `?fresh=true` to ask the rank itself.
* Changes are validated by the program's own model: an invalid change is refused as a whole
  (422 with pydantic's errors) and nothing changes.
* A write to `all` answers each rank's outcome: applied, rejected (with the reason) or
  no_answer.
"""


def _version() -> str:
    try:
        return metadata.version("runctl")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0"


async def connect_client(settings: Settings, *, retry: bool = False) -> Client:
    """The gateway's connection: logged in as the operator role (bus.Client's default)
    when `runctl up`'s credentials are in reach, see bus.credentials."""
    try:
        return await Client.connect(
            settings.nats_url,
            name="runctl-gateway",
            timeout=settings.timeout,
            max_payload=settings.max_body,
            retry_initial=retry,
        )
    except CredentialsError as exc:
        raise Unavailable(str(exc)) from exc


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings

    async def connect_later() -> None:
        try:
            app.state.client = await connect_client(settings, retry=True)
        except Unavailable as exc:  # e.g. a malformed credentials file: retrying won't help
            log.error("gateway cannot connect to NATS", error=str(exc))
            return
        log.info("gateway connected to NATS")

    async with anyio.create_task_group() as tg:
        try:
            app.state.client = await connect_client(settings)
        except Unavailable as exc:
            log.warning(
                "NATS not reachable: answering 503 and retrying",
                error=str(exc),
                url=redact_url(settings.nats_url or ""),
            )
            tg.start_soon(connect_later)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
            client: Client | None = app.state.client
            app.state.client = None
            if client is not None:
                await client.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The gateway's FastAPI app: routes, auth, the error handler and the body limit.

    >>> app = create_app(Settings(nats_url="nats://127.0.0.1:4222", default_run="exp1"))
    """
    settings = settings or Settings()
    app = FastAPI(
        title="runctl gateway",
        docs_url=None,  # served by run_docs from the package's own Swagger UI, not a CDN
        version=_version(),
        description=DESCRIPTION,
        lifespan=_lifespan,
        openapi_tags=[
            {"name": "runs", "description": "What runs and ranks the registry knows."},
            {"name": "state", "description": "One rank's (or every rank's) live state."},
            {"name": "steps", "description": "The completed-step log (JetStream)."},
            {
                "name": "journal",
                "description": "The change journal: history, undo, scheduled changes.",
            },
            {
                "name": "freak-compatible",
                "description": "Freak's routes, on the gateway's --run, else the only live run.",
            },
        ],
    )
    app.state.settings = settings
    app.state.tokens = settings.tokens  # read by gateway.auth.require()
    app.state.client = None
    errors.install(app)
    guarded = [Depends(require())]
    app.include_router(routes.router, dependencies=guarded)
    app.include_router(steps_api.router, dependencies=guarded)
    app.include_router(freak.router, dependencies=guarded)
    app.include_router(journal_api.router, dependencies=guarded)
    app.include_router(live.router, dependencies=guarded)
    app.include_router(series.router, dependencies=guarded)
    # the console: static pages (they call the API with the user's token) and /whoami
    app.include_router(console.router)
    console.install(app)
    # Swagger pages (static shells: they fetch their spec with the user's token)
    app.include_router(run_docs.router)
    if settings.fast_path:  # plain reads and sets without FastAPI's router (gateway/hot.py)
        app.add_middleware(HotRoutes)
    app.add_middleware(errors.BodyLimit, max_body=settings.max_body)
    # outermost: a request from a page of another site is refused before anything else
    app.add_middleware(
        SiteGuard,
        hosts=settings.allowed_hosts,
        origins=settings.allowed_origins,
        listen=settings.host,
    )
    return app
