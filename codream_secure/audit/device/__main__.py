"""`python -m codream_secure.audit.device`."""

from codream_secure.audit.device.cli import main

raise SystemExit(main())
