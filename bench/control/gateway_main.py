"""The runctl gateway as the benchmark runs it: ``runctl.gateway.serve.serve`` (uvicorn on
``runctl.gateway.app.create_app``) in its own process, logging at ``warning`` without an access
log, as Freak's uvicorn runs (``log_level="error"``).

    python -m bench.control.gateway_main --nats URL --port P --run R [--rank K]
"""

from __future__ import annotations

import argparse

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nats", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--rank", default="0")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    from runctl.bus.logs import configure_logging
    from runctl.gateway.serve import serve
    from runctl.gateway.settings import Settings

    configure_logging(args.log_level)
    settings = Settings(
        nats_url=args.nats,
        host=args.host,
        port=args.port,
        default_run=args.run,
        default_rank=args.rank,
    )
    serve(settings, log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
