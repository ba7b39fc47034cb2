"""``python -m runctl.cli``: the ``runctl`` command line."""

from runctl.cli.app import main

raise SystemExit(main())
