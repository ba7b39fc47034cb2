"""``python -m runctl.gateway``: serve the gateway (what ``runctl gateway`` runs)."""

from runctl.gateway.main import main

raise SystemExit(main())
