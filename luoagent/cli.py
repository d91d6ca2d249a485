"""Command-line entry point: parses arguments, sets up logging, dispatches to a workflow.

Each workflow module adds its own options (configure); one that fails to import only
disables its subcommand, so ``luoagent --help`` keeps working. Only the module of the command
being run is imported (a restore right after kexec must not pay for every other workflow). Subsystems outside the
production code (the lab) add commands through the ``luoagent.commands`` entry point group,
so this module never names them."""

from __future__ import annotations

import argparse
import importlib
import sys

from luoagent import __version__
from luoagent.errors import LuoAgentError

# subcommand -> (module, one-line help). Each module defines configure(parser) and run(args).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("luoagent.workflows.doctor", "check whether this host can do a live update"),
    "vm": ("luoagent.workflows.vm", "start, list and stop VMs managed by luoagent"),
    "update": ("luoagent.workflows.update", "checkpoint VMs, preserve them with LUO, kexec"),
    "restore": ("luoagent.workflows.restore", "after kexec: bring preserved VMs back"),
    "daemon": ("luoagent.workflows.daemon", "run the luoagent daemon (updates run in it; CLI verbs are clients)"),
    "status": ("luoagent.workflows.status", "what the daemon is doing: phase, VMs, held sessions"),
    "recover": ("luoagent.workflows.recover", "undo what an interrupted update left behind (its journal)"),
    "trace": ("luoagent.workflows.trace", "trace a program's LUO ioctls (python-ptrace)"),
}


#: entry point group of commands contributed by other subsystems (pyproject.toml)
COMMAND_GROUP = "luoagent.commands"


def _all_commands(only: str | None = None) -> dict[str, tuple[str, str]]:
    """SUBCOMMANDS plus each ``luoagent.commands`` entry point (name -> module; HELP from it).

    With ``only``, just that command when it is found (a built-in one needs no entry point scan)."""
    if only in SUBCOMMANDS:
        return {only: SUBCOMMANDS[only]}
    from importlib.metadata import entry_points  # ~50 ms: only when a contributed command may be wanted

    found = dict(SUBCOMMANDS)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        if ep.name not in found and only in (None, ep.name):
            try:
                help_text = getattr(importlib.import_module(ep.value), "HELP", "")
            except ImportError:
                help_text = "(cannot load: run it to see why)"
            found[ep.name] = (ep.value, help_text)
    if only is not None and only in found:
        return {only: found[only]}
    return found


#: global options that take a value (their value is not the command name)
_VALUED_GLOBALS = ("--log-format",)


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not a global option), or None."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _VALUED_GLOBALS:
            skip = True
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI parser; given the ``argv`` it will parse, it imports only the command named there
    (every command's module when none, or an unknown one, is named: ``--help``, typo)."""
    parser = argparse.ArgumentParser(
        prog="luoagent",
        description="Live-update the host kernel (kexec + Live Update Orchestrator) "
        "while QEMU VMs keep their RAM in place.",
    )
    parser.add_argument("--version", action="version", version=f"luoagent {__version__}")
    parser.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        default="auto",
        help="log rendering: console on a TTY, JSON lines otherwise (default: auto)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument(
        "--test-mode", action="store_true",
        help="tests only: honour LUOAGENT_FAULT / LUOAGENT_TEST_SKIP; never kexecs",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    only = chosen_command(argv) if argv is not None else None
    commands = _all_commands(only)
    if only is not None and only not in commands:
        commands = _all_commands()  # a typo: argparse names the valid choices
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if len(commands) > 1 and only is None and _wants_top_help(argv):
            continue  # `luoagent --help` lists commands; their options are not needed
        try:
            importlib.import_module(module).configure(p)
        except ImportError as exc:  # keep --help usable; running the command reports it
            p.set_defaults(_import_error=exc)
    return parser


def _wants_top_help(argv: list[str] | None) -> bool:
    return argv is not None and any(w in ("-h", "--help", "--version") for w in argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from luoagent import log, report, testmode

    log.configure(args.log_format, args.verbose)
    if args.test_mode:
        testmode.enable()
    elif testmode.ignored_switches():
        log.get_logger("luoagent.cli").warning(
            "test switches ignored outside --test-mode", variables=testmode.ignored_switches())
    if getattr(args, "_import_error", None) is not None:
        report.echo(args.command, f"luoagent {args.command}: cannot load: {args._import_error}")
        return 1
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except LuoAgentError as exc:
        if getattr(args, "json", False):
            import json

            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        report.echo(args.command, f"luoagent {args.command}: error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        report.echo(args.command, f"luoagent {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
