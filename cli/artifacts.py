"""``runctl artifacts``: what a run keeps in the object store, and downloading it.

runctl artifacts RUN                        every stored result and file, with sizes
runctl artifacts RUN --get NAME [--to PATH] download one (streamed, digest-checked)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from runctl.bus.client import Client
from runctl.bus.formatting import format_bytes
from runctl.bus.subjects import check_token
from runctl.cli.common import with_client

__all__ = ["artifacts_command", "register"]

AddParser = Callable[..., argparse.ArgumentParser]


def register(add: AddParser) -> None:
    """Add ``runctl artifacts`` to the CLI."""
    p = add("artifacts", "step results and files a run keeps in the object store")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--get", metavar="NAME", help="download this object (a name as listed)")
    p.add_argument("--to", metavar="PATH", help="where to (default: the name's last part)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=artifacts_command)


def artifacts_command(args: argparse.Namespace) -> int:
    """List a run's stored objects, or download one with a progress line on stderr."""
    run = check_token(args.run, "run")

    def progress(done: int, total: int) -> None:
        print(
            f"\r{format_bytes(done)} / {format_bytes(total)}", end="", file=sys.stderr, flush=True
        )

    async def go(client: Client) -> int:
        if args.get:
            target = Path(args.to or args.get.rsplit("/", 1)[-1])
            path = await client.download(args.get, target, progress)
            print(file=sys.stderr)
            print(path)
            return 0
        infos = await client.artifacts(run)
        if args.json:
            rows = [{"name": i.name, "size": i.size, "digest": i.digest} for i in infos]
            print(json.dumps({"run": run, "artifacts": rows}, indent=2))
        elif not infos:
            print(f"run {run!r} keeps nothing in the object store")
        else:
            width = max(len(i.name) for i in infos)
            print(f"{'NAME':<{width}}  {'SIZE':>10}")
            for i in infos:
                print(f"{i.name:<{width}}  {format_bytes(i.size):>10}")
            print(f"{len(infos)} objects, {format_bytes(sum(i.size for i in infos))}")
        return 0

    return with_client(args, go)
