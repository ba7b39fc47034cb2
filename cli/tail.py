"""``runctl tail [RUN]``: what happens on a run, live, one readable line per message.

By default it prints what someone did and what happened: states changed by a command
(set, patch, reset ...), events, step records. ``--heartbeats`` adds the state republished
on every heartbeat and the program's own updates of its fields (a training loop writing its
step and loss), which arrive at that same pace, with the ``changed`` event that goes with
them. ``--commands`` adds the commands anyone sends. ``--json`` prints
each message as ``{"subject": ..., "data": ...}`` instead.

Commands are opt-in because a subscriber to a command subject is, for NATS, someone who
may answer: while it listens, a command to a rank that does not exist waits for the full
timeout (504) instead of failing at once with "no responders" (404).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Final

import anyio
import msgspec
from nats.aio.msg import Msg

from runctl.bus import messages as m
from runctl.bus.client import Client
from runctl.bus.errors import EXIT_OK
from runctl.bus.subjects import (
    PREFIX,
    commands_wildcard,
    events_wildcard,
    states_wildcard,
    step_records_wildcard,
)
from runctl.cli.common import AddParser, with_client

__all__ = ["format_message", "register", "tail_command", "tail_subjects"]

MAX_VALUE_CHARS: Final = 160
#: state causes and event kinds that come at heartbeat pace: shown with --heartbeats only
HEARTBEAT_CAUSES: Final = frozenset({"heartbeat", "changed"})
HEARTBEAT_EVENTS: Final = frozenset({"changed"})


def register(add: AddParser) -> None:
    """Add ``tail``."""
    p = add("tail", "print a run's changes and events as they happen")
    p.add_argument("run", nargs="?", help="the run (default: every run)")
    p.add_argument("--json", action="store_true", help="one raw JSON message per line")
    p.add_argument(
        "--heartbeats",
        action="store_true",
        help="also print the state republished on every heartbeat, and the program's own "
        "updates of its fields (published at the same pace)",
    )
    p.add_argument(
        "--commands",
        action="store_true",
        help="also print commands (while tailing, commands to ranks that do not "
        "exist time out instead of failing at once)",
    )
    p.add_argument("--count", type=int, metavar="N", help="exit after N lines")
    p.set_defaults(func=tail_command)


def tail_command(args: argparse.Namespace) -> int:
    """``runctl tail [RUN]``: print messages until Ctrl-C (or ``--count`` lines)."""
    subjects = tail_subjects(args.run, commands=args.commands)

    async def go(client: Client) -> int:
        send, receive = anyio.create_memory_object_stream[Msg](1000)

        async def forward(msg: Msg) -> None:
            await send.send(msg)

        subs = [await client.nc.subscribe(s, cb=forward) for s in subjects]
        await client.nc.flush()
        print(
            f"runctl: tailing {', '.join(subjects)} (Ctrl-C to stop)", file=sys.stderr, flush=True
        )
        printed = 0
        async with receive:
            async for msg in receive:
                line = format_message(
                    msg.subject, msg.data, raw=args.json, heartbeats=args.heartbeats
                )
                if line is None:
                    continue
                print(line, flush=True)
                printed += 1
                if args.count is not None and printed >= args.count:
                    break
        with anyio.CancelScope(shield=True):
            for sub in subs:
                await sub.unsubscribe()
        return EXIT_OK

    try:
        return with_client(args, go)
    except KeyboardInterrupt:
        return EXIT_OK


def tail_subjects(run: str | None, *, commands: bool = False) -> list[str]:
    """The subjects ``tail`` subscribes to: states, events, step records (and commands)."""
    run = run or None
    subjects = [states_wildcard(run), events_wildcard(run), step_records_wildcard(run)]
    return [*subjects, commands_wildcard(run)] if commands else subjects


def format_message(
    subject: str, data: bytes, *, raw: bool = False, heartbeats: bool = False
) -> str | None:
    """One line for one message, or None for one at heartbeat pace nobody asked to see."""
    parts = subject.split(".")
    if len(parts) < 4 or parts[0] != PREFIX:
        return None
    run, rank, kind, name = parts[1], parts[2], parts[3], ".".join(parts[4:])
    if raw:
        return json.dumps(
            {"subject": subject, "data": _json_or_text(data)},
            ensure_ascii=False,
            separators=(",", ":"),
        )
    who = f"{run}/{rank}"
    try:
        if kind == "state":
            state = m.decode_state(data)
            if state.cause in HEARTBEAT_CAUSES and not heartbeats:
                return None
            return (
                f"{_clock(state.ts)}  {who:<12} state    v{state.version} "
                f"({state.cause})  {_compact(state.state)}"
            )
        if kind == "evt":
            event = m.decode_event(data)
            if event.kind in HEARTBEAT_EVENTS and not heartbeats:
                return None
            detail = _compact(event.data) if event.data else ""
            return f"{_clock(event.ts)}  {who:<12} event    {event.kind} v{event.version}  {detail}"
        if kind == "cmd":
            cmd = m.decode_command(name, data) if name in m.COMMAND_TYPES else None
            fields = {k: v for k, v in msgspec.to_builtins(cmd).items() if k != "t"} if cmd else {}
            return f"{_clock(time.time())}  {who:<12} command  {name}  {_compact(fields)}"
        if kind == "done":
            record = _compact(_json_or_text(data))
            return f"{_clock(time.time())}  {who:<12} step     {name}  {record}"
    except (msgspec.DecodeError, ValueError, TypeError):
        pass  # not one of ours, or a newer version: show it as it is
    return f"{_clock(time.time())}  {who:<12} {kind:<8} {name}  {_compact(_json_or_text(data))}"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _json_or_text(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode(errors="replace")


def _compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."
