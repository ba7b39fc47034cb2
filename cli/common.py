"""What the ``runctl`` sub-commands share: the exit mapping, targets, the connection, output."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from runctl.bus.client import Client
from runctl.bus.errors import EXIT_ERROR, BadToken, RunctlError
from runctl.bus.identity import user_at_host
from runctl.bus.messages import Author
from runctl.bus.subjects import ALL, check_rank, check_token

__all__ = [
    "AddParser",
    "exit_code",
    "fail",
    "note",
    "parse_target",
    "print_json",
    "with_client",
]

#: how a module adds its sub-command: ``add(name, help, epilog=None)`` -> its parser
AddParser = Callable[..., argparse.ArgumentParser]

T = TypeVar("T")


def exit_code(exc: BaseException) -> int:
    """The CLI's one exit mapping: a runctl error's own ``exit_code``, else 1."""
    return exc.exit_code if isinstance(exc, RunctlError) else EXIT_ERROR


def parse_target(text: str) -> tuple[str, str]:
    """``RUN`` -> (RUN, "all"); ``RUN/RANK`` -> (RUN, RANK); both checked as tokens."""
    run, sep, rank = text.partition("/")
    if sep and not rank:
        raise BadToken("rank", "", "is empty (RUN/RANK, or RUN alone for every rank)")
    return check_token(run, "run"), check_rank(rank) if sep else ALL


def with_client(args: argparse.Namespace, fn: Callable[[Client], Awaitable[T]]) -> T:
    """Connect (bus.Client logs in as the operator role when `runctl up`'s credentials are
    in reach), run ``fn(client)``, close."""

    async def go() -> T:
        # a refused login names where logins come from (bus.connection)
        client = await Client.connect(
            args.url,
            name="runctl-cli",
            timeout=args.timeout,
            by=Author(name=user_at_host(), via="cli"),  # the change journal says who
        )
        async with client:
            return await fn(client)

    return anyio.run(go)


def print_json(value: Any) -> None:
    """``value`` as indented JSON on stdout (what ``--json`` prints)."""
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds (``inf``, ``nan``, ``0`` and
    ``-1`` are refused with the usage error, exit code 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive, finite number of seconds")
    return value


def note(message: str) -> None:
    """A remark on stderr, prefixed ``runctl:`` (stdout stays machine-readable)."""
    print(f"runctl: {message}", file=sys.stderr)


def fail(message: str, code: int) -> int:
    """Print ``message`` as the one error line on stderr and return the exit ``code``."""
    note(message)
    return code
