"""``runctl history | undo | schedules | cancel | forget-history``: the change journal from a
terminal (read from JetStream: they work after every rank of the run has exited).

    runctl history RUN[/RANK] [--path P] [--since T] [--until T] [--limit N] [--json]
    runctl undo RUN [CHANGE] [--force]       # default: the latest change not undone
    runctl schedules RUN [--all]             # changes scheduled at a step (set --at-step N)
    runctl cancel RUN CHANGE                 # cancel a scheduled change everywhere
    runctl forget-history RUN --yes          # remove the run's journal

Changes sent from the CLI are journaled as ``user@host`` (``via: cli``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from typing import Any

from runctl.bus.client import Client
from runctl.bus.errors import EXIT_OK, BadRequest
from runctl.bus.formatting import ago, cut, render_table
from runctl.bus.journalplan import Entry, parse_time
from runctl.bus.subjects import ALL, check_token, rank_key
from runctl.cli.common import AddParser, note, parse_target, print_json, with_client

__all__ = ["register", "render_history"]


def register(add: AddParser) -> None:
    """Add ``history``, ``undo``, ``schedules``, ``cancel`` and ``forget-history``."""
    p = add(
        "history",
        "a run's changes: who, when, what, at which step, each rank's outcome",
        epilog="Times: unix seconds, ISO 8601 (2026-11-28T10:00) or an age (90s, 15m, 2h, 3d).",
    )
    p.add_argument("target", metavar="RUN[/RANK]", help="RUN, or RUN/RANK for one rank's")
    p.add_argument("--path", help="only changes that named or changed this field")
    p.add_argument("--since", metavar="TIME", help="only changes at or after TIME")
    p.add_argument("--until", metavar="TIME", help="only changes at or before TIME")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON (with every rank's diff)")
    p.set_defaults(func=history_command)

    p = add(
        "undo",
        "take back a change: the fields it changed get their recorded values again",
        epilog="Refused when a later change touched the same fields, unless --force.",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("change", nargs="?", help="change id or its first characters (default: latest)")
    p.add_argument("--force", action="store_true", help="undo past later changes to the fields")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=undo_command)

    p = add("schedules", "changes scheduled at a step (runctl set RUN PATH=V --at-step N)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--all", action="store_true", help="also those applied or cancelled")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=schedules_command)

    p = add("cancel", "cancel a scheduled change on every rank (and in the journal)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("change", help="change id or its first characters")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cancel_command)

    p = add("forget-history", "remove a run's change journal (ranks started later replay nothing)")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--yes", action="store_true", help="really remove it")
    p.set_defaults(func=forget_command)


# --- history ----------------------------------------------------------------------------


def history_command(args: argparse.Namespace) -> int:
    """``runctl history RUN[/RANK]``: the change journal, newest first."""
    run, rank = parse_target(args.target)
    if args.limit < 1:
        raise BadRequest("--limit must be at least 1")
    since, until = parse_time(args.since), parse_time(args.until)

    async def go(client: Client) -> list[Entry]:
        return await client.history(
            run,
            rank=None if rank == ALL else rank,
            path=args.path,
            since=since,
            until=until,
            limit=args.limit,
        )

    entries = with_client(args, go)
    if args.json:
        print_json([e.to_json() for e in entries])
    elif not entries:
        print(f"no changes journaled for run {run!r}")
    else:
        print(render_history(entries))
    return EXIT_OK


def render_history(entries: Iterable[Entry], now: float | None = None) -> str:
    """One line a change, newest first."""
    now = time.time() if now is None else now
    rows = [("CHANGE", "WHEN", "BY", "VERB", "TARGET", "STEP", "STATUS", "WHAT")]
    for e in entries:
        data = e.to_json()
        rows.append(
            (
                e.id[:12],
                ago(now - e.ts),
                _who(data["by"]),
                e.verb,
                _target(e.target, data["ranks"]),
                _steps(data),
                e.status,
                _what(data),
            )
        )
    return render_table(rows)


def _target(target: str, ranks: dict[str, Any]) -> str:
    """Where a change went: ``all``, or the ranks it reached (an undo of per-rank values
    goes to each rank under one change id)."""
    if target == ALL or len(ranks) <= 1:
        return target
    return ",".join(sorted(ranks, key=rank_key))


def _who(by: dict[str, Any]) -> str:
    name = by.get("name") or "?"
    extra = ", ".join(x for x in (by.get("via"), by.get("role")) if x)
    return f"{name} ({extra})" if extra else name


def _steps(data: dict[str, Any]) -> str:
    if data.get("at_step") is not None:
        return f"@{data['at_step']}"
    steps = {r.get("step") for r in data["ranks"].values()} - {None}
    return "-" if not steps else str(min(steps)) if len(steps) == 1 else f"{min(steps)}+"


def _what(data: dict[str, Any]) -> str:
    ranks = data["ranks"]
    if data["verb"] == "replay":
        rank, rec = next(iter(ranks.items()))
        skipped = ", ".join(s["id"][:12] for s in rec.get("skipped", []))
        return f"rank {rank} replayed {len(rec.get('replayed', []))}" + (
            f", skipped {skipped}" if skipped else ""
        )
    parts: list[str] = []
    if data.get("undo_of"):
        parts.append(f"undo of {data['undo_of'][:12]}:")
    if data.get("of"):
        parts.append(f"cancels {data['of'][:12]}")
    diffs: dict[str, set[str]] = {}
    for rec in ranks.values():
        for change in rec.get("diff", []):
            text = f"{_short(change.get('before'))} -> {_short(change.get('after'))}"
            diffs.setdefault(change["path"], set()).add(text)
    for path, texts in diffs.items():
        parts.append(f"{path}: {next(iter(texts))}" if len(texts) == 1 else f"{path}: (per rank)")
    rejected = [r for r in ranks.values() if r.get("outcome") == "rejected"]
    if rejected:
        parts.append(f"rejected: {rejected[0].get('message', '')}")
    if not diffs and not rejected and not parts:
        parts.append(_asked(data.get("request")))
    if data.get("replay_skipped"):
        parts.append(f"(skipped at replay on rank {data['replay_skipped'][0]['rank']})")
    if data.get("undone_by"):
        parts.append(f"(undone by {data['undone_by'][-1][:12]})")
    return " ".join(parts)


def _asked(request: Any) -> str:
    """What a change asked for, where no rank's diff says it (scheduled, pending, a stop)."""
    if not isinstance(request, dict):
        return _short(request, 60)
    kind = str(request.get("t", "")).split("/")[0]
    value = request.get("value")
    shown = str(value) if request.get("text") else _short(value)  # typed text: as typed
    if kind == "set":
        return f"{request.get('path')} = {shown}"
    if kind == "patch":
        return f"{request.get('path') or ''} <- {_short(value, 50)}".lstrip()
    if kind == "stop":
        return f"stop ({request.get('reason') or 'no reason'})"
    return _short(request, 60)


def _short(value: Any, limit: int = 30) -> str:
    return cut(json.dumps(value, ensure_ascii=False, separators=(",", ":")), limit)


# --- undo, schedules, cancel, forget ------------------------------------------------------


def undo_command(args: argparse.Namespace) -> int:
    """``runctl undo RUN [CHANGE]``: apply the inverse of a change (the latest by default)."""
    run = check_token(args.run, "run")
    result = with_client(args, lambda client: client.undo(run, args.change, force=args.force))
    body = result.to_json()
    if args.json:
        print_json(body)
        return EXIT_OK
    print(f"undid {body['undone'][:12]} (change {body['change_id'][:12]}): {_undone(body)}")
    for rank, outcome in sorted(body["ranks"].items()):
        print(f"rank {rank}: {outcome.get('outcome')}" + _journal_note(outcome))
    for forced in body["forced_past"]:
        note(f"forced past later change {forced[:12]}")
    return EXIT_OK


def _undone(body: dict[str, Any]) -> str:
    """The values an undo set back: once when every rank got the same, else per rank."""
    per_target: dict[str, dict[str, Any]] = body["values"]

    def listed(values: dict[str, Any]) -> str:
        return ", ".join(f"{path}={_short(v)}" for path, v in values.items())

    if len({json.dumps(v, sort_keys=True) for v in per_target.values()}) <= 1:
        return next((listed(v) for v in per_target.values()), "")
    ordered = sorted(per_target.items(), key=lambda item: rank_key(item[0]))
    return "; ".join(f"rank {target}: {listed(v)}" for target, v in ordered)


def _journal_note(outcome: dict[str, Any]) -> str:
    if outcome.get("journaled") is False:
        return " (not in the journal: it will not survive a restart)"
    return f" ({outcome['message']})" if outcome.get("message") else ""


def schedules_command(args: argparse.Namespace) -> int:
    """``runctl schedules RUN``: changes scheduled at a step, still to apply."""
    run = check_token(args.run, "run")
    entries = with_client(args, lambda client: client.schedules(run, include_done=args.all))
    if args.json:
        print_json([e.to_json() for e in entries])
    elif not entries:
        print(f"no changes scheduled for run {run!r}")
    else:
        print(render_history(entries))
    return EXIT_OK


def cancel_command(args: argparse.Namespace) -> int:
    """``runctl cancel RUN CHANGE``: cancel a scheduled change."""
    run = check_token(args.run, "run")
    body = with_client(args, lambda client: client.unschedule(run, args.change))
    if args.json:
        print_json(body)
    else:
        print(f"cancelled {body['cancelled'][:12]} (change {body['change_id'][:12]})")
    return EXIT_OK


def forget_command(args: argparse.Namespace) -> int:
    """``runctl forget-history RUN``: remove the run's journal (operator login)."""
    run = check_token(args.run, "run")
    if not args.yes:
        raise BadRequest(f"this removes the whole change journal of run {run!r}: add --yes")
    removed = with_client(args, lambda client: client.forget_history(run))
    print(f"removed {removed} journal record(s) of run {run!r}")
    return EXIT_OK
