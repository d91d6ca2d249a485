"""CLI for ``luoagent lab`` (placeholder until the lab issue lands).

Subcommands: build, run, shell, selftests, demo."""

from luoagent.errors import LabError


def configure(parser):
    parser.add_argument("action", nargs="?", default="demo")
    parser.add_argument("--json", action="store_true")


def run(args):
    raise LabError("lab not built yet: the lab is not implemented in this version")
