"""The numbers of a run's states over time: ``GET /runs/{run}/series``.

Every numeric field of a state (nested models and dicts are walked, ``optimizer.lr``;
lists are not: a list of weights is not a curve), and the step and step rate each state
message carries, per rank. The points come from the stream of recent state messages
(:mod:`runctl.bus.statestore`); the live bridge (:mod:`runctl.gateway.live`) sends new points
in the same shape, so the console draws one curve from both.

A state is parsed only when its version changed: a heartbeat repeats the last numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

import msgspec
from fastapi import APIRouter, Query
from starlette.responses import Response

from runctl.bus.statestore import MAX_AGE, read_states
from runctl.bus.subjects import check_rank, check_token
from runctl.bus.views import by_rank
from runctl.gateway.errors import json_response
from runctl.gateway.routes import ClientDep, RunParam

__all__ = [
    "MAX_DEPTH",
    "MAX_FIELDS",
    "NON_FINITE",
    "NumberCache",
    "StateView",
    "decode_view",
    "numbers",
    "router",
]

router = APIRouter(tags=["runs"])

#: fields plotted per state at most (the first ones in the model's order)
MAX_FIELDS: Final = 64
MAX_DEPTH: Final = 6
#: how the bus writes non-finite floats (JSON has no NaN): plotted as gaps
NON_FINITE: Final = frozenset({"NaN", "Infinity", "-Infinity"})
#: JavaScript numbers are doubles: larger integers are sent as floats
_SAFE_INT: Final = 2**53


class StateView(msgspec.Struct, tag="state/1", tag_field="t", kw_only=True):
    """A ``state/1`` message (:class:`runctl.bus.messages.StateMsg`) with its state left
    unparsed: decoding a heartbeat costs the same for a 10 byte or a 10 MB state."""

    run: str
    rank: str
    version: int
    ts: float
    state: msgspec.Raw
    cause: str = "heartbeat"
    heartbeat_interval: float = 0.0
    step: int | None = None
    progress_ts: float | None = None
    stall_after: float = 0.0
    step_rate: float = 0.0
    state_omitted: int = 0
    max_payload: int = 0


_view_decoder: Final = msgspec.json.Decoder(StateView)


def decode_view(payload: bytes) -> StateView | None:
    """The message, or None if it is not a state message (nothing else is on the subject)."""
    try:
        return _view_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _number(value: int | float) -> float | int | None:
    if isinstance(value, int):
        if -_SAFE_INT < value < _SAFE_INT:
            return value
        try:
            value = float(value)
        except OverflowError:  # an integer of thousands of digits
            return None
    return value if math.isfinite(value) else None


def numbers(state: Any, *, limit: int = MAX_FIELDS) -> dict[str, float | int | None]:
    """Every numeric leaf reachable through objects, by dotted path; booleans are not
    numbers; a non-finite (``"NaN"``, ``"Infinity"``, ``"-Infinity"`` on the bus) or
    unrepresentable number is None (a gap in the curve)."""
    out: dict[str, float | int | None] = {}

    def walk(value: Any, prefix: str, depth: int) -> None:
        if isinstance(value, dict):
            if depth >= MAX_DEPTH:
                return
            for key, item in value.items():
                if len(out) >= limit:
                    return
                walk(item, f"{prefix}.{key}" if prefix else str(key), depth + 1)
        elif prefix and not isinstance(value, bool) and isinstance(value, int | float):
            out[prefix] = _number(value)
        elif prefix and isinstance(value, str) and value in NON_FINITE:
            out[prefix] = None  # a diverged loss: a gap in its curve, not a missing curve

    walk(state, "", 0)
    return out


@dataclass(slots=True)
class NumberCache:
    """Per rank: the last version parsed and its numbers (a state is parsed once)."""

    seen: dict[tuple[str, str], tuple[int, dict[str, float | int | None]]] = field(
        default_factory=dict
    )

    def of(self, view: StateView) -> tuple[dict[str, float | int | None], bool]:
        """The view's numbers, and whether its version is new for this rank."""
        key = (view.run, view.rank)
        last = self.seen.get(key)
        if last is not None and last[0] == view.version:
            return last[1], False
        try:
            parsed = numbers(msgspec.json.decode(view.state))
        except (msgspec.DecodeError, RecursionError):
            parsed = {}
        self.seen[key] = (view.version, parsed)
        return parsed, True


@dataclass(slots=True)
class _Series:
    t: list[float] = field(default_factory=list)
    step: list[int | None] = field(default_factory=list)
    step_rate: list[float] = field(default_factory=list)
    version: list[int] = field(default_factory=list)
    fields: dict[str, list[float | int | None]] = field(default_factory=dict)

    def add(self, view: StateView, values: dict[str, float | int | None]) -> None:
        n = len(self.t)
        self.t.append(round(view.ts, 3))
        self.step.append(view.step)
        self.step_rate.append(view.step_rate)
        self.version.append(view.version)
        for name, value in values.items():
            column = self.fields.get(name)
            if column is None:
                if len(self.fields) >= MAX_FIELDS:
                    continue
                column = self.fields[name] = [None] * n
            column.append(value)
        for column in self.fields.values():
            if len(column) == n:  # the field is not in this state
                column.append(None)

    def thinned(self, points: int) -> dict[str, Any]:
        keep = _every(len(self.t), points)

        def pick(column: list[Any]) -> list[Any]:
            return column if keep is None else [column[i] for i in keep]

        return {
            "t": pick(self.t),
            "step": pick(self.step),
            "step_rate": pick(self.step_rate),
            "version": pick(self.version),
            "fields": {name: pick(column) for name, column in self.fields.items()},
        }


def _every(n: int, points: int) -> list[int] | None:
    """Indices of at most ``points`` (>= 2) evenly spread items, first and last included."""
    if n <= points:
        return None
    stride = (n - 1) / (points - 1)
    return sorted({round(i * stride) for i in range(points)})


@router.get("/runs/{run}/series", summary="Numeric fields of the run's states over time")
async def series(
    run: RunParam,
    client: ClientDep,
    since: Annotated[float, Query(gt=0, le=MAX_AGE, description="seconds back from now")] = 900.0,
    points: Annotated[int, Query(ge=2, le=20_000, description="at most, per rank")] = 2000,
    rank: Annotated[str | None, Query(description="one rank (default: every rank)")] = None,
) -> Response:
    """Per rank: times (`t`, unix seconds), `step`, `step_rate`, `version` and every
    numeric state field (`fields`, dotted paths) from the state messages the bus keeps
    (stream `RUNCTL_STATES`); `available` is false when no agent created that stream.
    A window of more than 20,000 messages (many ranks, a long window) is `sampled`: runs of
    consecutive messages spread evenly over it, the newest included."""
    run = check_token(run, "run")
    only = check_rank(rank, allow_all=False) if rank is not None else None
    now = time.time()
    stored = await read_states(client.nc, run, since=now - since, rank=only)
    cache = NumberCache()
    per_rank: dict[str, _Series] = {}
    for payload in stored.payloads:
        view = decode_view(payload)
        if view is None:
            continue
        values, _ = cache.of(view)
        per_rank.setdefault(view.rank, _Series()).add(view, values)
    return json_response(
        {
            "run": run,
            "since": round(now - since, 3),
            "now": round(now, 3),
            "available": stored.available,
            # more messages than one answer reads: evenly spread runs of them, read instead
            "sampled": stored.sampled,
            "messages": stored.matching,
            "ranks": {rank_id: s.thinned(points) for rank_id, s in by_rank(per_rank)},
        }
    )
