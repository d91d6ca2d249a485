"""The installed `luoagent` command: help, version, logging formats, clean errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from luoagent import __version__
from luoagent.cli import SUBCOMMANDS


def luoagent(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("luoagent", path=str(Path(sys.executable).parent))
    assert exe, "the luoagent console script is not installed next to this python (pip install .)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))


def test_help_lists_every_subcommand():
    proc = luoagent("--help")
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout


def test_version():
    proc = luoagent("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_unknown_command_is_a_usage_error():
    proc = luoagent("frobnicate")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr


def test_json_log_lines_go_to_stderr():
    proc = luoagent("--log-format", "json", "-vv", "doctor", "--json", "--no-qemu")
    json.loads(proc.stdout)  # stdout: only the result document
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert logs, "expected debug/info log lines on stderr"
    assert all({"event", "level", "timestamp"} <= set(entry) for entry in logs)
    assert any(entry["event"] == "doctor" for entry in logs)


def test_console_log_format():
    proc = luoagent("--log-format", "console", "-v", "doctor", "--no-qemu")
    assert "doctor" in proc.stderr and not proc.stderr.lstrip().startswith("{")
