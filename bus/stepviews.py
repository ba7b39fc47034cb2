"""The completed-step log as JSON, for the gateway's routes and the CLI alike: read straight
from JetStream, so it works after every rank has exited.

:func:`steps_view` lists the log (filtered, with ``explain``: what a restart would skip or
run and why); :func:`forget_steps` forgets a step, its successors, or a whole run.
"""

from __future__ import annotations

import json
import time
from typing import Any, Final

from runctl.bus.canonical import hashed
from runctl.bus.client import Client
from runctl.bus.errors import BadRequest, NotFound, Unavailable
from runctl.bus.registry import ANSWERING
from runctl.bus.steps.explain import explain, record_row
from runctl.bus.steps.forget import parse_selector
from runctl.bus.steps.records import scopes_for
from runctl.bus.steps.store import forget, read_log
from runctl.bus.subjects import RUN_SCOPE, check_token

__all__ = ["STATUSES", "alive_processes", "forget_steps", "parse_configs", "steps_view"]

#: the ``status`` a row of the log can have
STATUSES: Final = ("done", "running", "interrupted", "failed")


async def alive_processes(client: Client, run: str) -> set[tuple[str, int]]:
    """(host, pid) of the run's live ranks, to tell "running" from "interrupted"."""
    try:
        infos = await client.ranks(run)
    except (NotFound, Unavailable):
        return set()
    return {(i.record.host, i.record.pid) for i in infos if i.liveness in ANSWERING}


def parse_configs(items: list[str] | None) -> dict[str, tuple[Any, str]]:
    """``NAME=JSON`` pairs (the config a restart would use), normalised and hashed."""
    out: dict[str, tuple[Any, str]] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep:
            raise BadRequest(f"config {item!r} must be NAME=JSON")
        check_token(name, "step")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"config for {name!r} is not JSON: {exc}") from None
        try:
            h = hashed(value)
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"config for {name!r}: {exc}") from None
        out[name] = (h.value, h.hash)
    return out


async def steps_view(
    client: Client,
    run: str,
    *,
    rank: str | None = None,
    status: str | None = None,
    name: str | None = None,
    with_explain: bool = False,
    configs: list[str] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """The run's step log as JSON: ``steps`` (rows in first-start order) and, with
    ``with_explain``, what a restart would skip or run and why."""
    check_token(run, "run")
    if rank is not None and rank != RUN_SCOPE:
        check_token(rank, "rank")
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
    if name is not None:
        check_token(name, "step")
    runlog = await read_log(client.nc, run, rank=rank)
    alive = await alive_processes(client, run)
    rows = [
        row
        for row in (record_row(seq, rec, alive) for seq, rec in runlog.ordered(scopes_for(rank)))
        if (status is None or row["status"] == status) and (name is None or row["name"] == name)
    ]
    if limit is not None and limit < 0:
        raise BadRequest(f"limit must be positive, not {limit}")
    shown = rows[-limit:] if limit else rows  # the most recent ones
    view: dict[str, Any] = {
        "run": run,
        "rank": rank,
        "count": len(rows),
        "truncated": len(shown) < len(rows),
        "steps": shown,
    }
    if with_explain:
        now = time.time()
        explained = [
            e
            for e in explain(
                runlog, rank=rank, configs=parse_configs(configs), alive=alive, now=now
            )
            if name is None or e.name == name
        ]
        view["explain"] = [e.to_json() for e in explained]
        summary: dict[str, int] = {"skip": 0, "run": 0}
        for e in explained:
            summary[e.action] += 1
            if e.action == "run":
                summary[e.reason] = summary.get(e.reason, 0) + 1
        view["summary"] = summary
    return view


async def forget_steps(
    client: Client,
    run: str,
    step: str | None,
    *,
    successors: bool = False,
    rank: str | None = None,
    by: str = "",
) -> dict[str, Any]:
    """Forget ``step`` (``name`` or ``name:key``; ``successors`` adds ``+``) or, with
    ``step=None``, the whole run."""
    if step is not None:
        selector = parse_selector(step)
        if successors and not selector.successors:
            selector = parse_selector(f"{step}+")
        text: str | None = str(selector)
    else:
        text = None
    if rank is not None and rank != RUN_SCOPE:
        check_token(rank, "rank")
    report = await forget(client.nc, run, text, rank=rank, by=by)
    return report.to_json()
