"""The ``runctl`` command line: one module per group of sub-commands.

    app        the parser, ``main()`` and the exit mapping (the ``runctl`` entry point)
    common     targets (``RUN``, ``RUN/RANK``), the connection, output helpers
    server     ``runctl up``: nats-server with runctl's roles
    state      ``ls``, ``get``, ``set``, ``patch``, ``reset``, ``stop``, ``schema``
    tail       ``tail``: a run's messages as they happen
    steps      ``steps``, ``forget``: the completed-step log
    demo       ``demo``: a server, a few ranks of ``demo_train`` and the gateway

The CLI talks to NATS through :class:`runctl.bus.client.Client` and never imports the
gateway: ``runctl gateway`` and ``runctl tokens`` run ``python -m runctl.gateway``.
"""

from runctl.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
