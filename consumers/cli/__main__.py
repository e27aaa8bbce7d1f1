"""`python -m jobstream.consumers.cli`: the `jobstream` command."""

from jobstream.consumers.cli.main import main

raise SystemExit(main())
