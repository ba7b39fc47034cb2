"""``runctl steps`` and ``runctl forget``: the step log from a terminal.

    runctl steps RUN [--rank R] [--status S] [--name N] [--json]
    runctl steps RUN --explain [--config NAME=JSON ...]   # what a restart skips/runs, and why
    runctl forget RUN STEP[+] [--rank R]                   # STEP: name, or name:key
    runctl forget RUN --everything

Read straight from JetStream (runctl.bus.stepviews, as the gateway's routes do), so they work
after every rank has exited. Exit codes as ``runctl``'s: 0 ok, 2 bad input, 3 nothing matched,
5 bus unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from runctl.bus.client import Client
from runctl.bus.errors import EXIT_OK, EXIT_USAGE
from runctl.bus.formatting import ago, cut, format_bytes, format_duration, render_table
from runctl.bus.stepviews import STATUSES, forget_steps, steps_view
from runctl.cli.common import AddParser, with_client

__all__ = ["forget_command", "register", "render_explain", "render_steps", "steps_command"]


def register(add: AddParser) -> None:
    """Add ``steps`` and ``forget``; each sets ``func(args) -> int``."""
    p = add(
        "steps",
        "list a run's completed-step log",
        epilog="--explain: what a restart would skip and run, and why.",
    )
    p.add_argument("run")
    p.add_argument("--rank", help="one rank (and the run-wide steps); 'run' for run-wide only")
    p.add_argument("--status", choices=STATUSES)
    p.add_argument("--name", help="only this step name")
    p.add_argument("--limit", type=int, metavar="N", help="only the last N rows")
    p.add_argument(
        "--explain", action="store_true", help="what a restart would skip and run, and why"
    )
    p.add_argument(
        "--config",
        action="append",
        metavar="NAME=JSON",
        help="with --explain: the config a restart will use for step NAME",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=steps_command)

    f = add(
        "forget",
        "forget steps so they run again (or the run's recorded stop)",
        epilog="STEP is a name or name:key; a trailing + also forgets every step started after "
        "it. Nothing matching is no error: it says so (forgotten: 0), as the HTTP route does.",
    )
    f.add_argument("run")
    f.add_argument("step", nargs="?", help="name, name:key, name+ or name:key+")
    f.add_argument("--rank", help="only this rank's log ('run': the run-wide log)")
    f.add_argument("--everything", action="store_true", help="forget the whole run")
    f.add_argument(
        "--stop",
        action="store_true",
        help="forget the run's recorded stop: a program started again in the run is not "
        "stopped at once",
    )
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=forget_command)


def steps_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``runctl steps RUN``: the step log as a table, ``--explain``, or ``--json``."""
    out = out or sys.stdout

    async def go(client: Client) -> dict[str, Any]:
        return await steps_view(
            client,
            args.run,
            rank=args.rank,
            status=args.status,
            name=args.name,
            with_explain=args.explain,
            configs=args.config,
            limit=args.limit,
        )

    view = with_client(args, go)
    if args.json:
        print(json.dumps(view, indent=2, default=str), file=out)
    elif args.explain:
        print(render_explain(view), file=out)
    else:
        print(render_steps(view), file=out)
    return 0


def forget_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``runctl forget RUN STEP``: forget steps so a restart runs them; ``--stop``: the
    run's recorded stop. Exit 0 also when nothing matched (the report says 0)."""
    out = out or sys.stdout
    if getattr(args, "stop", False):
        if args.step is not None or args.everything:
            print("runctl forget: --stop forgets the recorded stop only", file=sys.stderr)
            return EXIT_USAGE
        return _forget_stop(args, out)
    if (args.step is None) == (not args.everything):
        print(
            "runctl forget: name a STEP, or pass --everything for the whole run "
            "(--stop: the run's recorded stop)",
            file=sys.stderr,
        )
        return EXIT_USAGE

    async def go(client: Client) -> dict[str, Any]:
        return await forget_steps(client, args.run, args.step, rank=args.rank, by="cli")

    report = with_client(args, go)
    if args.json:
        print(json.dumps(report, indent=2, default=str), file=out)
        return EXIT_OK
    if not report["forgotten"]:
        print(
            f"nothing to forget: no logged step of run {args.run!r} matches "
            f"{report['selector']!r} (forgotten: 0)",
            file=out,
        )
        return EXIT_OK
    print(
        f"forgot {report['forgotten']} step(s) of run {args.run!r} ({report['selector']}); "
        "they run again on the next start",
        file=out,
    )
    for item in report["steps"][:20]:
        print(f"  {item['scope']:>5}  {item['step']}  (was {item['status']})", file=out)
    if report["forgotten"] > 20:
        print(f"  ... and {report['forgotten'] - 20} more", file=out)
    return 0


def _forget_stop(args: argparse.Namespace, out: TextIO) -> int:
    async def go(client: Client) -> bool:
        return await client.forget_stop(args.run)

    had = with_client(args, go)
    if args.json:
        print(json.dumps({"run": args.run, "stop_forgotten": had}), file=out)
    elif had:
        print(
            f"forgot the recorded stop of run {args.run!r}: a program started again in it "
            "runs (ranks still running were asked to stop already)",
            file=out,
        )
    else:
        print(f"run {args.run!r} has no recorded stop: nothing to forget", file=out)
    return EXIT_OK


# --- rendering -----------------------------------------------------------------------


def render_steps(view: dict[str, Any], now: float | None = None) -> str:
    """The step log view (:func:`runctl.bus.stepviews.steps_view`) as a table and a count."""
    now = time.time() if now is None else now
    rows = view["steps"]
    if not rows:
        return f"no steps logged for run {view['run']!r}"
    table = [("STEP", "STATUS", "DURATION", "RANK", "WHEN", "CONFIG", "STORED")]
    for r in rows:
        rank = r["rank"] if r["scope"] != "run" else f"run (by {r['rank']})"
        dur = format_duration(r["duration"]) if r["duration"] is not None else "-"
        table.append(
            (
                cut(r["step"], 40),
                r["status"],
                dur,
                rank,
                ago(now - (r["ended"] or r["started"])),
                r["config_hash"][:8],
                # what the step keeps in the object store: its result and attached files
                format_bytes(r["stored_bytes"]) if r.get("stored_bytes") else "-",
            )
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    more = f" (the last {len(rows)} of {view['count']})" if view.get("truncated") else ""
    return render_table(table) + f"\n{len(rows)} steps{more}: {summary}"


def render_explain(view: dict[str, Any]) -> str:
    """What a restart would skip and run, and why, as a table and a summary line."""
    rows = view.get("explain") or []
    if not rows:
        return f"no steps logged for run {view['run']!r}: a restart runs everything"
    table = [("STEP", "RANK", "ON RESTART", "WHY")]
    for e in rows:
        table.append((cut(e["step"], 40), e["scope"], e["action"], e["detail"]))
    s = view.get("summary", {})
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(s.items()) if k not in ("skip", "run"))
    return (
        render_table(table) + f"\na restart would skip {s.get('skip', 0)} and run "
        f"{s.get('run', 0)}{f' ({reasons})' if reasons else ''}"
    )
