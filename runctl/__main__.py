"""``python -m runctl``: the ``runctl`` command line."""

from runctl.gateway.cli import main

raise SystemExit(main())
