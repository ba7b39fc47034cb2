"""Server-sent events bridged from the bus: ``GET /live`` and ``GET /runs/{run}/live``.

The console follows states and events as they happen instead of polling. Each request
subscribes to the states and events of one run (or of every run) on the gateway's NATS
connection and writes them to the response as ``text/event-stream``; the subscriptions end
with the response (the page went away, or the gateway stops), so the gateway keeps nothing.

Events (each ``data`` is one JSON object):

* ``hello`` first: the gateway's time and the liveness rule (a rank is stale once its
  heartbeat is older than max(``stale_after_beats`` x its interval, ``stale_floor_s``)).
* ``state``: a rank's state message: ``status`` (alive, or stalled when its program has
  not advanced for longer than its threshold), version, ``ts``, ``age`` (seconds since
  ``ts`` by the gateway's clock), ``idle`` (seconds since the program last advanced), cause,
  step, step rate and, on a run's stream, its numeric fields
  (``numbers``, as ``GET /runs/{run}/series``) and the whole state when its version is new
  to this page and it is not over :data:`INLINE_STATE_LIMIT` (else ``state_omitted``: read
  it with ``GET .../get``).
* ``event``: a rank's event (started, set, patch, stop_requested, exited, step_* ...).

A page that reads slower than the bus publishes gets only the latest state per rank (and
the last :data:`MAX_QUEUED_EVENTS` events): nothing queues without bound. A comment is sent
every :data:`KEEPALIVE` seconds so a page that went away is noticed on an idle run too.

The page reads the stream with ``fetch`` (not ``EventSource``) so that it can send its bearer
token in the ``Authorization`` header; a page on another origin cannot read it.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Final

import anyio
import msgspec
from fastapi import APIRouter, FastAPI, Request
from nats.aio.msg import Msg
from starlette.responses import StreamingResponse

from runctl.bus.client import Client
from runctl.bus.messages import decode_event
from runctl.bus.progress import is_stalled
from runctl.bus.registry import STALE_AFTER_BEATS, STALE_FLOOR
from runctl.bus.subjects import check_token, events_wildcard, states_wildcard
from runctl.gateway.routes import ClientDep, RunParam
from runctl.gateway.series import NumberCache, decode_view

__all__ = ["INLINE_STATE_LIMIT", "KEEPALIVE", "MAX_QUEUED_EVENTS", "close_bridges", "router"]

router = APIRouter(tags=["runs"])

KEEPALIVE: Final = 15.0
MAX_QUEUED_EVENTS: Final = 500
INLINE_STATE_LIMIT: Final = 256 << 10
_encoder: Final = msgspec.json.Encoder()
_HEADERS: Final = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


class _Bridge:
    """What one page is sent: the latest state per rank and the recent events, in the
    order they arrived, bounded."""

    def __init__(self, run: str | None) -> None:
        self.run = run
        self.states: dict[str, bytes] = {}  # subject -> latest payload
        self.events: collections.deque[bytes] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self.wake = anyio.Event()
        self.numbers = NumberCache()
        self.sent_versions: dict[tuple[str, str], int] = {}
        self.closed = False

    def close(self) -> None:
        """End the stream (the gateway is stopping): the page reconnects elsewhere."""
        self.closed = True
        self.wake.set()

    async def on_state(self, msg: Msg) -> None:
        self.states.pop(msg.subject, None)  # re-inserted last: states go out in order
        self.states[msg.subject] = msg.data
        self.wake.set()

    async def on_event(self, msg: Msg) -> None:
        self.events.append(msg.data)
        self.wake.set()

    def drain(self) -> list[bytes]:
        chunks: list[bytes] = []
        while self.events:
            chunk = self._event(self.events.popleft())
            if chunk:
                chunks.append(chunk)
        states, self.states = self.states, {}
        for payload in states.values():
            chunk = self._state(payload)
            if chunk:
                chunks.append(chunk)
        return chunks

    def _event(self, payload: bytes) -> bytes | None:
        try:
            event = decode_event(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return _sse("event", msgspec.to_builtins(event))

    def _state(self, payload: bytes) -> bytes | None:
        view = decode_view(payload)
        if view is None:
            return None
        now = time.time()
        data: dict[str, Any] = {
            "run": view.run,
            "rank": view.rank,
            # a rank whose state just arrived heartbeats: alive, or stalled if its program
            # has not advanced for longer than its threshold (the page derives stale itself)
            "status": "stalled" if is_stalled(view.progress_ts, view.stall_after, now) else "alive",
            "version": view.version,
            "ts": view.ts,
            "age": round(max(0.0, now - view.ts), 3),
            "heartbeat_interval": view.heartbeat_interval,
            "idle": None
            if view.progress_ts is None
            else round(max(0.0, now - view.progress_ts), 3),
            "cause": view.cause,
            "step": view.step,
            "step_rate": view.step_rate,
        }
        if self.run is not None:  # one run: its curves and forms need the numbers
            data["numbers"], _ = self.numbers.of(view)
            key = (view.run, view.rank)
            if self.sent_versions.get(key) != view.version:
                self.sent_versions[key] = view.version
                if len(view.state) <= INLINE_STATE_LIMIT:
                    data["state"] = view.state
                else:
                    data["state_omitted"] = True  # once per version: read it if needed
        return _sse("state", data)


def _open_bridges(app: FastAPI) -> set[_Bridge]:
    bridges: set[_Bridge] | None = getattr(app.state, "live_bridges", None)
    if bridges is None:
        bridges = app.state.live_bridges = set()
    return bridges


def close_bridges(app: FastAPI) -> None:
    """End every open stream now (before the server waits for its connections to finish:
    a page that stays open must not hold up a gateway that is stopping)."""
    for bridge in list(_open_bridges(app)):
        bridge.close()


async def _stream(app: FastAPI, client: Client, run: str | None) -> AsyncIterator[bytes]:
    bridge = _Bridge(run)
    bridges = _open_bridges(app)
    bridges.add(bridge)
    nc = client.nc
    subs = [
        await nc.subscribe(states_wildcard(run), cb=bridge.on_state),
        await nc.subscribe(events_wildcard(run), cb=bridge.on_event),
    ]
    try:
        await nc.flush(timeout=5)
        yield b"retry: 2000\n\n" + _sse(
            "hello",
            {
                "run": run,
                "now": time.time(),
                "stale_after_beats": STALE_AFTER_BEATS,
                "stale_floor_s": STALE_FLOOR,
            },
        )
        while not bridge.closed:
            with anyio.move_on_after(KEEPALIVE):
                await bridge.wake.wait()
            if bridge.closed:
                return
            if not bridge.wake.is_set():
                yield b": keepalive\n\n"
                continue
            bridge.wake = anyio.Event()
            chunks = bridge.drain()
            if chunks:
                yield b"".join(chunks)
    finally:
        bridges.discard(bridge)
        with anyio.CancelScope(shield=True):
            for sub in subs:
                # a closing connection takes its subscriptions with it
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()


def _response(request: Request, client: Client, run: str | None) -> StreamingResponse:
    return StreamingResponse(
        _stream(request.app, client, run), media_type="text/event-stream", headers=_HEADERS
    )


@router.get("/live", summary="Every run's states and events, live (server-sent events)")
async def live_all(request: Request, client: ClientDep) -> StreamingResponse:
    """Each rank's state messages (without the state itself) and events, as they happen."""
    return _response(request, client, None)


@router.get("/runs/{run}/live", summary="A run's states and events, live (server-sent events)")
async def live_run(request: Request, run: RunParam, client: ClientDep) -> StreamingResponse:
    """Each rank's state messages with their numeric fields (and the state when its
    version changed), and every event of the run, as they happen."""
    return _response(request, client, check_token(run, "run"))
