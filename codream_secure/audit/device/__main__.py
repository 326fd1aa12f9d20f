"""`python -m benchmarks.device`."""

from benchmarks.device.cli import main

raise SystemExit(main())
