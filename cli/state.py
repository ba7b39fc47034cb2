"""``runctl ls | get | set | patch | reset | stop | schema``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from runctl.bus import assign, jsonform
from runctl.bus.client import Client, Gathered, Result
from runctl.bus.errors import EXIT_OK, EXIT_UNAVAILABLE, BadRequest, NotFound, UnreadableRecord
from runctl.bus.formatting import ago, render_table
from runctl.bus.messages import StopMode, check_grace
from runctl.bus.paths import split_path
from runctl.bus.registry import ANSWERING, RankInfo, run_spread
from runctl.bus.subjects import ALL
from runctl.bus.views import by_rank, rank_summary, write_outcome
from runctl.cli.common import (
    AddParser,
    exit_code,
    note,
    parse_target,
    print_json,
    seconds,
    with_client,
)

__all__ = ["register", "render_ranks"]

TARGET_HELP = "RUN (every rank) or RUN/RANK"
#: a rank the registry shows stale that did not answer a command to every rank either
STALE_NO_ANSWER = "no answer (stale: no heartbeat for three intervals)"


def register(add: AddParser) -> None:
    """Add ``ls``, ``get``, ``set``, ``patch``, ``reset``, ``stop`` and ``schema``."""
    p = add("ls", "list runs and their ranks")
    p.add_argument("run", nargs="?", help="only this run")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=ls_command)

    p = add("get", "print the state (or one value) as JSON")
    p.add_argument("target", metavar="RUN[/RANK]", help=TARGET_HELP)
    p.add_argument("path", nargs="?", help="dotted path, e.g. optimizer.lr")
    p.add_argument(
        "--fresh", action="store_true", help="ask the rank itself, not its last published state"
    )
    p.set_defaults(func=get_command)

    p = add(
        "set",
        "change values, all or nothing (VALUE: JSON, else a string)",
        epilog="Several assignments are applied as one patch: all or none of them.",
    )
    p.add_argument("target", metavar="RUN[/RANK]", help=TARGET_HELP)
    p.add_argument("assignments", metavar="PATH=VALUE", nargs="+")
    _write_options(p)
    p.set_defaults(func=set_command)

    p = add("patch", "merge a partial JSON object into the state")
    p.add_argument("target", metavar="RUN[/RANK]", help=TARGET_HELP)
    p.add_argument("value", metavar="JSON", help="a JSON object; '-' reads stdin, @FILE a file")
    p.add_argument("--path", help="merge into the object at this dotted path")
    _write_options(p)
    p.set_defaults(func=patch_command)

    p = add("reset", "back to the state at control() time")
    p.add_argument("target", metavar="RUN[/RANK]", help=TARGET_HELP)
    _write_options(p)
    p.set_defaults(func=reset_command)

    p = add("stop", "ask the program to stop (ctl.stop_requested)")
    p.add_argument("target", metavar="RUN[/RANK]", help=TARGET_HELP)
    p.add_argument("--reason", default="", help="shown to the program")
    p.add_argument(
        "--terminate",
        action="store_true",
        help="also SIGTERM the rank's process after --grace seconds",
    )
    p.add_argument("--grace", type=float, default=30.0, metavar="SECONDS")
    p.add_argument(
        "--checkpoint",
        action="store_true",
        help="every rank saves a checkpoint (ctl.on_checkpoint) at the same step, then stops; "
        "waits for each rank's report (run-wide only)",
    )
    p.add_argument(
        "--checkpoint-timeout",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the checkpoints (default 300)",
    )
    _write_options(p)
    p.set_defaults(func=stop_command)

    p = add("schema", "print the model's JSON schema")
    p.add_argument("target", metavar="RUN[/RANK]", help="RUN (its first rank) or RUN/RANK")
    p.set_defaults(func=schema_command)


def _write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sync",
        action="store_true",
        help="apply on every rank at the same step (the program calls ctl.sync)",
    )
    p.add_argument(
        "--margin", type=int, metavar="STEPS", help="with --sync: how many steps ahead to apply"
    )
    p.add_argument(
        "--at-step",
        type=int,
        metavar="STEP",
        help="apply at this step (ctl.sync(step) in the program); journaled: a rank that "
        "restarts before it still applies it there",
    )
    p.add_argument("--json", action="store_true", help="print each rank's outcome as JSON")


def _sync_options(args: argparse.Namespace, rank: str) -> dict[str, Any]:
    if args.at_step is not None:
        if args.sync or args.margin is not None:
            raise BadRequest("--at-step is a step of its own: not with --sync or --margin")
        if args.at_step < 0:
            raise BadRequest("--at-step must not be negative")
        return {"at_step": args.at_step}
    if not args.sync:
        if args.margin is not None:
            raise BadRequest("--margin needs --sync")
        return {}
    if rank != ALL:
        raise BadRequest("--sync applies to every rank: name the run alone (RUN, not RUN/RANK)")
    return {"sync": True, "margin": args.margin}


# --- ls ---------------------------------------------------------------------------------


def ls_command(args: argparse.Namespace) -> int:
    """``runctl ls [RUN]``: a table of runs and ranks (``--json``: the shared rank view)."""

    async def go(client: Client) -> tuple[list[RankInfo], list[UnreadableRecord]]:
        found = await client.scan(args.run or None)
        if args.run and not found[0] and not found[1]:
            raise NotFound(args.run)
        return found

    infos, unreadable = with_client(args, go)
    for bad in unreadable:  # skipped, never a failure of the whole listing
        note(f"skipped {bad}")
    if args.json:
        print_json([rank_summary(i) for i in infos])
    elif not infos:
        print("no runs")
    else:
        print(render_ranks(infos))
    return EXIT_OK


def render_ranks(infos: Sequence[RankInfo]) -> str:
    """The ``runctl ls`` table, then one line per run whose running ranks lag behind."""
    header = "RUN RANK STATUS VERSION REPLAYED STEP ADVANCED HEARTBEAT HOST PID MODEL"
    rows: list[tuple[str, ...]] = [tuple(header.split())]
    by_run: dict[str, list[RankInfo]] = {}
    for info in infos:
        r = info.record
        by_run.setdefault(r.run, []).append(info)
        status: str = info.liveness
        if r.stop_requested and info.liveness in ANSWERING:
            status += " (stopping)"
        elif info.liveness == "exited" and r.error:
            status += " (error)"
        idle = info.idle
        rows.append(
            (
                r.run,
                r.rank,
                status,
                str(r.version),
                _replayed(r.replayed, r.replay_skipped),
                "-" if r.step is None else str(r.step),
                "-" if idle is None or info.liveness == "exited" else ago(idle),
                ago(info.age),
                r.host,
                str(r.pid),
                r.model,
            )
        )
    lines = [render_table(rows)]
    for run, ranks in by_run.items():
        spread = run_spread(ranks)
        if spread.behind:
            lines.append(f"{run}: {spread.describe()}")
    return "\n".join(lines)


def _replayed(replayed: int, skipped: int) -> str:
    """Journaled changes the rank applied when it started (and skipped: no longer valid)."""
    if not replayed and not skipped:
        return "-"
    return f"{replayed} ({skipped} skipped)" if skipped else str(replayed)


# --- get / schema --------------------------------------------------------------------------


def get_command(args: argparse.Namespace) -> int:
    """``runctl get RUN[/RANK] [PATH]``: the state as JSON (notes a rank that is not alive)."""
    run, rank = parse_target(args.target)
    if args.path:
        split_path(args.path)  # a bad path is a usage error, whether the run exists or not

    async def go(client: Client) -> Result | Gathered:
        return await client.get(run, rank, args.path or None, fresh=args.fresh)

    result = with_client(args, go)
    if isinstance(result, Result):
        if result.liveness not in ANSWERING:
            note(
                f"rank {result.rank} of run {run!r} is {result.liveness} (last heartbeat "
                f"{ago(result.age)}): this is its last published state"
            )
        print_json(result.value)
        return EXIT_OK
    values: dict[str, Any] = {r: res.value for r, res in by_rank(result.results)}
    print_json(values)
    code = EXIT_OK
    for r, err in by_rank(result.errors):
        note(f"rank {r}: {err.describe()}")
        code = code or exit_code(err)
    for r in result.missing:
        note(f"rank {r}: no answer")
        code = code or EXIT_UNAVAILABLE
    for r in result.stale:
        note(f"rank {r}: {STALE_NO_ANSWER}")
    return code


def schema_command(args: argparse.Namespace) -> int:
    """``runctl schema RUN[/RANK]``: the model's JSON schema (``RUN``: its first rank's)."""
    run, rank = parse_target(args.target)

    async def go(client: Client) -> Any:
        target = rank if rank != ALL else (await client.ranks(run))[0].record.rank
        return await client.schema(run, target)

    print_json(with_client(args, go))
    return EXIT_OK


# --- writes -------------------------------------------------------------------------------


def set_command(args: argparse.Namespace) -> int:
    """``runctl set RUN[/RANK] PATH=VALUE...``: one change, all or nothing."""
    run, rank = parse_target(args.target)
    assignments = [assign.parse_assignment(a) for a in args.assignments]
    options = _sync_options(args, rank)
    if len(assignments) > 1:
        assign.assignments_patch(assignments)  # conflicts are usage errors, before connecting

    async def go(client: Client) -> Result | Gathered:
        if len(assignments) == 1:
            a = assignments[0]
            return await assign.set_text(client, run, rank, a.path, a.text, **options)
        return await assign.patch_assignments(client, run, rank, assignments, **options)

    return report(args, run, with_client(args, go))


def patch_command(args: argparse.Namespace) -> int:
    """``runctl patch RUN[/RANK] JSON``: merge an object (``-``: stdin, ``@FILE``: a file)."""
    run, rank = parse_target(args.target)
    options = _sync_options(args, rank)
    value = _read_json_arg(args.value)

    async def go(client: Client) -> Result | Gathered:
        return await client.patch(run, rank, value, args.path or None, **options)

    return report(args, run, with_client(args, go))


def reset_command(args: argparse.Namespace) -> int:
    """``runctl reset RUN[/RANK]``: back to the state at ``control()`` time."""
    run, rank = parse_target(args.target)
    options = _sync_options(args, rank)

    async def go(client: Client) -> Result | Gathered:
        return await client.reset(run, rank, **options)

    return report(args, run, with_client(args, go))


def stop_command(args: argparse.Namespace) -> int:
    """``runctl stop RUN[/RANK]``: ask the program to stop (``--terminate``: then SIGTERM)."""
    run, rank = parse_target(args.target)
    if args.checkpoint:
        options: dict[str, Any] = {
            "checkpoint": True,
            "margin": args.margin,
            "checkpoint_timeout": args.checkpoint_timeout,
        }
    else:
        options = _sync_options(args, rank)
    try:
        check_grace(args.grace)
    except BadRequest as exc:  # before connecting; named as the user typed it
        raise BadRequest(f"--grace: {exc}") from None
    mode: StopMode = "terminate" if args.terminate else "graceful"

    async def go(client: Client) -> Result | Gathered:
        return await client.stop(run, rank, args.reason, mode=mode, grace=args.grace, **options)

    return report(args, run, with_client(args, go))


def _read_json_arg(text: str) -> dict[str, Any]:
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise BadRequest(f"cannot read {text[1:]}: {exc.strerror or exc}") from None
    try:
        value = jsonform.decode(text, "the patch")
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"a patch must be a JSON object, not {type(value).__name__}")
    return value


def report(args: argparse.Namespace, run: str, result: Result | Gathered) -> int:
    """Print each rank's outcome; the exit code says whether every rank applied it."""
    verb = args.command
    if isinstance(result, Result):
        if args.json:
            print_json(write_outcome(run, result))
        else:
            print(f"rank {result.rank}: {_applied(verb, result)}")
        return EXIT_OK
    if result.errors and not result.results:
        messages = {e.describe() for e in result.errors.values()}
        if len(messages) == 1 and not result.missing:
            # every rank refused it for the same reason: one line, as for one rank
            raise next(iter(result.errors.values()))
    if args.json:
        print_json(result.to_json())
    else:
        if result.at_step is not None:
            taken = not (result.errors or result.missing)
            how = "scheduled" if getattr(args, "at_step", None) is not None else "synchronised"
            print(
                f"{how} at step {result.at_step} (change {result.change_id[:12]})"
                + ("" if taken else ": not every rank took it, cancelled everywhere")
                + (": not in the journal" if result.journaled is False else "")
            )
        for r, res in by_rank(result.results):
            print(f"rank {r}: {_applied(verb, res)}")
        for r, err in by_rank(result.errors):
            print(f"rank {r}: rejected: {err.describe()}")
        for r in result.missing:
            print(f"rank {r}: no answer")
        for r in result.stale:
            print(f"rank {r}: {STALE_NO_ANSWER}")
    for _, err in by_rank(result.errors):
        return exit_code(err)
    return EXIT_UNAVAILABLE if result.missing else EXIT_OK


def _applied(verb: str, res: Result) -> str:
    if isinstance(res.value, dict) and res.value.get("pending"):
        return f"pending (at step {res.value.get('at_step')})"
    # answered as applied but not stored in the journal: a restart would lose it
    lost = " (not in the journal: it will not survive a restart)" if res.journaled is False else ""
    if verb == "stop":
        return "stop requested" + lost
    return f"{'applied' if res.changed else 'unchanged'} (version {res.version})" + lost
