"""`python -m stemma.flows.cli`."""

from stemma.flows.cli import main

raise SystemExit(main())
