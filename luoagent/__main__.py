"""Entry point for ``python -m luoagent``.

Delegates to the CLI so the agent runs without its console script installed."""

from luoagent.cli import main

raise SystemExit(main())
