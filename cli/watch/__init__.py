"""``runctl watch [RUN]``: tell people when a run is in trouble.

    runctl watch exp1 --slack "$SLACK_WEBHOOK_URL"
    runctl watch --webhook http://alerts.internal/runctl --when 'isnan(loss)' --then stop
    runctl watch exp1 --exec 'logger -t runctl "$RUNCTL_NOTICE_SUMMARY"' --dry-run

A long-running process like the gateway: it holds no state, so it can be restarted at
any time, and several can run (each sends its own notices). :mod:`.tracker` decides what to
say (pure), :mod:`.notify` delivers it, :mod:`.engine` wires them to the bus and acts;
this module is the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Final

import anyio

from runctl.bus import messages as m
from runctl.bus.client import Client
from runctl.bus.conditions import parse
from runctl.bus.credentials import NatsRole
from runctl.bus.errors import BadRequest
from runctl.bus.subjects import check_token
from runctl.cli.common import note
from runctl.cli.watch.engine import Action, Watcher, WatchOptions, parse_action
from runctl.cli.watch.notices import KINDS, Notice, NoticeKind
from runctl.cli.watch.notify import Command, Destination, DryRun, Retry, Slack, Webhook
from runctl.cli.watch.tracker import DEFAULT_ACK_TIMEOUT, Tracker

__all__ = [
    "KINDS",
    "Action",
    "Notice",
    "Tracker",
    "WatchOptions",
    "Watcher",
    "parse_action",
    "register",
    "watch_command",
]

AddParser = Callable[..., argparse.ArgumentParser]
#: a webhook URL in the environment instead of on the command line (where `ps` shows it)
ENV_WEBHOOK: Final = "RUNCTL_WATCH_WEBHOOK"
ENV_SLACK: Final = "RUNCTL_WATCH_SLACK"

EPILOG = f"""\
notices: {", ".join(KINDS)}.
Destinations may be repeated; ${ENV_WEBHOOK} and ${ENV_SLACK} add one each (a URL on the
command line is visible to other users in `ps`; Slack's URL is a secret). Without --then the
watcher logs in to NATS as the read-only observer role; with --then as the operator.
"""


def register(add: AddParser) -> None:
    """Add ``runctl watch``."""
    p = add(
        "watch",
        "notify (webhook, Slack, a command) when ranks stall, go stale or fail, runs stop, "
        "or a condition on the state holds",
        epilog=EPILOG,
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("run", nargs="?", help="only this run (default: every run)")
    p.add_argument(
        "--webhook", action="append", default=[], metavar="URL", help="POST each notice as JSON"
    )
    p.add_argument(
        "--slack",
        action="append",
        default=[],
        metavar="URL",
        help='a Slack-compatible incoming webhook ({"text": ...})',
    )
    p.add_argument(
        "--exec",
        dest="commands",
        action="append",
        default=[],
        metavar="COMMAND",
        help="run a shell command per notice (JSON on stdin, $RUNCTL_NOTICE_* variables)",
    )
    p.add_argument(
        "--when",
        action="append",
        default=[],
        metavar="EXPR",
        help="notify when this condition on a rank's state holds, e.g. 'loss > 10', "
        "'isnan(loss)' (once, until it clears)",
    )
    p.add_argument(
        "--then",
        metavar="ACTION",
        help="when a --when condition fires, on every rank of its run: 'stop' or "
        "'set PATH=VALUE ...' (recorded as a change by the watcher)",
    )
    p.add_argument(
        "--on",
        metavar="KINDS",
        help=f"only these notices, comma-separated (default: all: {','.join(KINDS)})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each notice (JSON lines on stdout) instead of sending it; --then is "
        "not carried out",
    )
    p.add_argument(
        "--ack-timeout",
        type=float,
        default=DEFAULT_ACK_TIMEOUT,
        metavar="SECONDS",
        help="a stop or synchronised change not taken by every rank within this is "
        f"reported (default: {DEFAULT_ACK_TIMEOUT:g})",
    )
    p.add_argument(
        "--no-commands",
        action="store_true",
        help="do not check that stops and synchronised changes reach every rank (the "
        "watcher then subscribes to no command subject)",
    )
    p.add_argument("--retries", type=int, default=5, metavar="N", help="default: 5")
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="first retry delay, doubled each time up to 60 s (default: 1)",
    )
    p.add_argument(
        "--name",
        help="the watcher's name in notices and in the change journal (default: runctl-watch@HOST)",
    )
    p.add_argument(
        "--count",
        type=int,
        metavar="N",
        help="exit after N notices were delivered (scripts, tests)",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=watch_command)


def _options(args: argparse.Namespace) -> tuple[WatchOptions, list[Destination]]:
    """Everything checked before connecting: a bad option is a usage error (exit 2)."""
    run = check_token(args.run, "run") if args.run else None
    conditions = [parse(text) for text in args.when]
    action = parse_action(args.then) if args.then else None
    if action is not None and not conditions:
        raise BadRequest("--then acts when a --when condition fires: give one")
    kinds: frozenset[NoticeKind] = frozenset(KINDS)
    if args.on:
        wanted = {k.strip() for k in args.on.split(",") if k.strip()}
        unknown = wanted - set(KINDS)
        if unknown:
            raise BadRequest(
                f"--on: unknown notice kind(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(KINDS)})"
            )
        kinds = frozenset(k for k in KINDS if k in wanted)
    for name, value in (("--ack-timeout", args.ack_timeout), ("--backoff", args.backoff)):
        if not value > 0:
            raise BadRequest(f"{name} must be positive")
    if args.retries < 0:
        raise BadRequest("--retries must be 0 or more")
    if args.count is not None and args.count < 1:
        raise BadRequest("--count must be at least 1")
    webhooks = [*args.webhook, *_env(ENV_WEBHOOK)]
    slacks = [*args.slack, *_env(ENV_SLACK)]
    destinations: list[Destination] = [
        *(Webhook(url) for url in webhooks),
        *(Slack(url) for url in slacks),
        *(Command(cmd) for cmd in args.commands),
    ]
    if args.dry_run:
        destinations = [DryRun([d.name for d in destinations] or ["(no destination)"])]
    elif not destinations:
        raise BadRequest(
            "no destination: give --webhook URL, --slack URL or --exec COMMAND "
            f"(or ${ENV_WEBHOOK} / ${ENV_SLACK}), or --dry-run to print the notices"
        )
    options = WatchOptions(
        run=run,
        conditions=conditions,
        action=None if args.dry_run else action,
        kinds=kinds,
        ack_timeout=args.ack_timeout,
        retry=Retry(retries=args.retries, first=args.backoff),
        commands=not args.no_commands,
    )
    if args.name:
        options.name = args.name
    return options, destinations


def _env(name: str) -> list[str]:
    value = os.environ.get(name, "").strip()
    return [value] if value else []


def watch_command(args: argparse.Namespace) -> int:
    """``runctl watch [RUN]``: run the watcher until interrupted."""
    options, destinations = _options(args)
    # read-only unless it acts (docs/security.md): the observer may only subscribe
    role: NatsRole = "operator" if options.action is not None else "observer"

    async def go() -> int:
        client = await Client.connect(  # a refused login names where logins come from
            args.url,
            name=f"runctl-watch:{options.name}",
            timeout=args.timeout,
            role=role,
            by=m.Author(name=options.name, via="watch"),
        )
        async with client, anyio.create_task_group() as tasks:
            watcher = Watcher(client, options, destinations, stop_after=args.count)
            await tasks.start(watcher.run)
            what = f"run {options.run}" if options.run else "every run"
            note(f"watching {what} (Ctrl-C to stop)")
            await watcher.done.wait()  # --count notices delivered; else until Ctrl-C
            tasks.cancel_scope.cancel()
        return 0

    code = anyio.run(go)
    sys.stdout.flush()
    return code
