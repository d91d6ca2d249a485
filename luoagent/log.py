"""structlog set-up shared by every command: console on a TTY, JSON lines otherwise.

Logs go to stderr so stdout stays clean for ``--json`` results."""

from __future__ import annotations

import logging
import sys

import structlog

from luoagent import report


def configure(fmt: str = "auto", verbosity: int = 0) -> None:
    """Configure structlog; ``fmt`` is auto|console|json, ``verbosity`` 0=warning 1=info 2=debug."""
    report.set_format(fmt)  # progress lines follow an explicit choice of JSON
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Resolve sys.stderr at each call: pytest's capsys and the lab runner swap it.
        logger_factory=_current_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _current_stderr_logger(*_args) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def get_logger(name: str):
    # Library use (tests, lab stages) without cli.main: warnings only, to stderr, never stdout.
    if not structlog.is_configured():
        configure()
    return structlog.get_logger(name)
