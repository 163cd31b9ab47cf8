"""`python -m fedsim` runs the command line."""

from fedsim.cli import main

raise SystemExit(main())
