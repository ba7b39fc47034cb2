"""``runctl steps`` and ``runctl forget``: the step log from a terminal.

    runctl steps RUN [--rank R] [--status S] [--name N] [--json]
    runctl steps RUN --explain [--config NAME=JSON ...]   # what a restart skips/runs, and why
    runctl forget RUN STEP[+] [--rank R]                   # STEP: name, or name:key
    runctl forget RUN --everything

Read straight from JetStream, so they work after every rank has exited. ``register()`` adds
both to an argparse sub-parser set (the ``runctl`` CLI calls it); ``main()`` runs them alone:
``python -m runctl.gateway.steps_cli steps RUN``. Exit codes as ``runctl``'s: 0 ok, 2 bad input,
3 nothing matched, 5 bus unavailable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from runctl.bus.client import Client
from runctl.bus.connection import env_url
from runctl.bus.errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE, RunctlError
from runctl.bus.stepexplain import format_ago, format_duration
from runctl.gateway.cli_common import exit_code, with_client
from runctl.gateway.steps_api import STATUSES, forget_steps, steps_view

__all__ = ["forget_command", "main", "register", "render_explain", "render_steps", "steps_command"]


def register(subparsers: Any) -> None:
    """Add ``steps`` and ``forget`` to an ``argparse`` sub-parsers object; each sets
    ``func(args) -> int``. Reads ``args.url`` (NATS URL) when the parent parser has one."""
    p = subparsers.add_parser(
        "steps",
        help="list a run's completed-step log",
        description="List a run's step log, or --explain what a "
        "restart would skip and run, and why.",
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
    _url_option(p)
    p.set_defaults(func=steps_command)

    f = subparsers.add_parser(
        "forget",
        help="forget steps so they run again",
        description="Forget a step so a restart runs it again. "
        "STEP is a name or name:key; a trailing + also "
        "forgets every step started after it.",
    )
    f.add_argument("run")
    f.add_argument("step", nargs="?", help="name, name:key, name+ or name:key+")
    f.add_argument("--rank", help="only this rank's log ('run': the run-wide log)")
    f.add_argument("--everything", action="store_true", help="forget the whole run")
    f.add_argument("--json", action="store_true", help="print JSON")
    _url_option(f)
    f.set_defaults(func=forget_command)


def _url_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a sub-parser default would overwrite the value given to the parent parser
    parser.add_argument(
        "--nats",
        "--url",
        dest="url",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="NATS URL (default: $RUNCTL_NATS_URL or nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="how long to wait for the bus (default: 2)",
    )


def steps_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
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

    view = with_client(_defaults(args), go)
    if args.json:
        print(json.dumps(view, indent=2, default=str), file=out)
    elif args.explain:
        print(render_explain(view), file=out)
    else:
        print(render_steps(view), file=out)
    return 0


def forget_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if (args.step is None) == (not args.everything):
        print("runctl forget: name a STEP, or pass --everything for the whole run", file=sys.stderr)
        return EXIT_USAGE

    async def go(client: Client) -> dict[str, Any]:
        return await forget_steps(client, args.run, args.step, rank=args.rank, by="cli")

    report = with_client(_defaults(args), go)
    if args.json:
        print(json.dumps(report, indent=2, default=str), file=out)
        return EXIT_OK if report["forgotten"] else EXIT_NOT_FOUND
    if not report["forgotten"]:
        print(
            f"nothing to forget: no logged step of run {args.run!r} matches {report['selector']!r}",
            file=out,
        )
        return EXIT_NOT_FOUND
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


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    """When run without ``runctl.gateway.cli.main`` (which fills these in)."""
    if getattr(args, "url", None) is None:
        args.url = env_url()
    if getattr(args, "timeout", None) is None:
        args.timeout = 2.0
    return args


# --- rendering -----------------------------------------------------------------------


def render_steps(view: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    rows = view["steps"]
    if not rows:
        return f"no steps logged for run {view['run']!r}"
    table = [("STEP", "STATUS", "DURATION", "RANK", "WHEN", "CONFIG")]
    for r in rows:
        rank = r["rank"] if r["scope"] != "run" else f"run (by {r['rank']})"
        dur = format_duration(r["duration"]) if r["duration"] is not None else "-"
        table.append(
            (
                _cut(r["step"], 40),
                r["status"],
                dur,
                rank,
                format_ago(now, r["ended"] or r["started"]),
                r["config_hash"][:8],
            )
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    more = f" (the last {len(rows)} of {view['count']})" if view.get("truncated") else ""
    return _table(table) + f"\n{len(rows)} steps{more}: {summary}"


def render_explain(view: dict[str, Any]) -> str:
    rows = view.get("explain") or []
    if not rows:
        return f"no steps logged for run {view['run']!r}: a restart runs everything"
    table = [("STEP", "RANK", "ON RESTART", "WHY")]
    for e in rows:
        table.append((_cut(e["step"], 40), e["scope"], e["action"], e["detail"]))
    s = view.get("summary", {})
    reasons = ", ".join(f"{n} {k}" for k, n in sorted(s.items()) if k not in ("skip", "run"))
    return (
        _table(table) + f"\na restart would skip {s.get('skip', 0)} and run "
        f"{s.get('run', 0)}{f' ({reasons})' if reasons else ''}"
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="runctl")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except RunctlError as exc:
        print(f"runctl: {exc}", file=sys.stderr)
        return exit_code(exc)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
