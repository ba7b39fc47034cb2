"""``runctl``: the operator's command line. It talks to NATS directly (not through a gateway),
through :class:`runctl.bus.client.Client`.

    runctl up                      nats-server in the foreground (nats.conf if present)
    runctl gateway                 the HTTP gateway
    runctl demo                    a server, a few ranks of a training-like loop, a gateway
    runctl ls [RUN]                runs and ranks
    runctl get RUN[/RANK] [PATH]   state (from the registry; --fresh asks the rank)
    runctl set RUN[/RANK] PATH=VALUE...   one atomic change (VALUE: JSON, else a string)
    runctl patch RUN[/RANK] JSON   merge a partial object
    runctl reset RUN[/RANK]        back to the initial state
    runctl stop RUN[/RANK]         ask the program to stop
    runctl schema RUN[/RANK]       the model's JSON schema
    runctl tail [RUN]              live state changes and events (--commands: commands too)
    runctl watch [RUN]             notify (webhook, Slack, a command) when a run is in trouble
    runctl steps RUN / forget RUN STEP    the completed-step log
    runctl history RUN[/RANK]      the change journal: who changed what, when (undo,
                                   schedules, cancel, forget-history)
    runctl tokens                  a tokens file for the gateway

``RUN`` alone means every rank of the run (``all``); ``RUN/0`` means rank 0. ``schema``
on ``RUN`` alone shows the first rank's.

Exit codes: 0 ok, 1 other error, 2 bad usage or input, 3 not found, 4 rejected by the
model, 5 timeout or bus unavailable (each error class carries its own: runctl.bus.errors).
Errors are one line on stderr, never a traceback.

``gateway`` and ``tokens`` run the gateway's own program (``python -m runctl.gateway``) in
this process's place: the CLI never imports the gateway, nor FastAPI.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Final

from runctl.bus.connection import DEFAULT_URL
from runctl.bus.errors import EXIT_USAGE, RunctlError
from runctl.bus.logs import configure_logging
from runctl.cli import artifacts, demo, journal, server, state, steps, tail, watch
from runctl.cli.common import exit_code, fail, seconds

__all__ = ["build_parser", "main"]


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options valid before and after the sub-command (``runctl --nats U ls`` and
    ``runctl ls --nats U``). A sub-parser's default would overwrite the top-level value,
    hence SUPPRESS there."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--nats",
        "--url",
        dest="url",
        metavar="URL",
        default=default,
        help=f"NATS URL (default: $RUNCTL_NATS_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--timeout",
        type=seconds,
        metavar="SECONDS",
        default=None if top else argparse.SUPPRESS,
        help="how long to wait for ranks to answer (default: 2)",
    )


_VALUE_OPTIONS = frozenset({"--nats", "--url", "--timeout"})

#: commands that are another program's: ``runctl gateway ARGS`` runs ``python -m
#: runctl.gateway ARGS`` and ``runctl tokens ARGS`` runs ``python -m runctl.gateway tokens
#: ARGS``, in this process's place (options given before the command go along to gateway)
PROGRAMS: Final = {
    "gateway": ("runctl.gateway", (), "serve the HTTP gateway (FastAPI; docs at /docs)"),
    "tokens": ("runctl.gateway", ("tokens",), "write a gateway tokens file: one token per role"),
}


def _command_index(argv: Sequence[str]) -> int | None:
    """Where the sub-command is in ``argv`` (None if there is none, or help is asked)."""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("-h", "--help"):
            return None
        elif arg.startswith("-"):
            skip = arg in _VALUE_OPTIONS
        else:
            return i
    return None


def _version() -> str:
    # importlib.metadata, not `runctl.__version__`: the facade imports the agent, which the
    # CLI does not need
    try:
        return version("runctl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The whole ``runctl`` parser: every sub-command with its options."""
    parser = argparse.ArgumentParser(
        prog="runctl",
        description="Read and change the live state of running programs.",
        epilog="RUN alone addresses every rank of the run; RUN/RANK one rank. "
        "Exit codes: 2 usage, 3 not found, 4 rejected, 5 timeout/unavailable.",
    )
    parser.add_argument("--version", action="version", version=f"runctl {_version()}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, help: str, epilog: str | None = None, *, bus: bool = True
    ) -> argparse.ArgumentParser:
        """A sub-command; ``bus=False``: one that starts its own bus (demo, up), so it
        offers no --nats/--timeout (given before it, they are refused)."""
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help, epilog=epilog
        )
        if bus:
            _common(p, top=False)
        else:
            p.set_defaults(own_bus=True)
        return p

    server.register(add)
    for name, (_, _, help) in PROGRAMS.items():
        # listed for --help; main() hands them to their program before parsing
        sub.add_parser(name, help=help, add_help=False)
    demo.register(add)
    state.register(add)
    tail.register(add)
    watch.register(add)
    steps.register(add)
    artifacts.register(add)
    journal.register(add)
    return parser


def run_program(command: str, argv: Sequence[str], at: int) -> None:
    """Replace this process by the program behind ``command`` (see :data:`PROGRAMS`);
    ``argv[at]`` is the command itself. Does not return."""
    module, first, _ = PROGRAMS[command]
    options = list(argv[:at])
    if first and options:  # --nats/--timeout mean nothing to tokens: say so
        fail(f"{command} takes no {' '.join(options)}", EXIT_USAGE)
        raise SystemExit(EXIT_USAGE)
    args = [sys.executable, "-m", module, *first, *options, *argv[at + 1 :]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, args)  # noqa: S606 - our own interpreter and module


def main(argv: Sequence[str] | None = None) -> int:
    """``runctl ARGS``: the exit code (0 ok; see the module's docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    at = _command_index(argv)
    if at is not None and argv[at] in PROGRAMS:
        run_program(argv[at], argv, at)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "own_bus", False) and (args.url is not None or args.timeout is not None):
        parser.error(f"{args.command} starts its own nats-server: it takes no --nats/--timeout")
    if getattr(args, "url", None) is None:
        args.url = os.environ.get("RUNCTL_NATS_URL") or DEFAULT_URL
    if getattr(args, "timeout", None) is None:
        args.timeout = 2.0
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    # Commands that serve log what they do; one-shot commands only print their result.
    configure_logging(getattr(args, "log_level", None) or "error")
    try:
        code: int = args.func(args)
        return code
    except RunctlError as exc:
        return fail(exc.describe(), exit_code(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `runctl tail | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        # a bug of ours: still one line, and the way to see more
        if os.environ.get("RUNCTL_DEBUG"):
            raise
        return fail(
            f"unexpected {type(exc).__name__}: {exc} (RUNCTL_DEBUG=1 shows the traceback)", 1
        )
