"""``python -m runctl``: the ``runctl`` command line."""

from runctl.cli.app import main

raise SystemExit(main())
