"""Workflow `luoagent trace` (placeholder until its issue lands).

Defines configure(parser) and run(args) for the CLI."""

from luoagent.errors import UsageError


def configure(parser):
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(args):
    raise UsageError("'luoagent trace' is not implemented yet")
