"""Workflow `luoagent recover`: undo exactly what an unfinished update journal records (VMs
resumed, cpr-reboot settings reset, fdsets removed, kexec image unloaded).

Through the daemon when one runs (it refuses while its own job runs), else in this process."""

from __future__ import annotations

import json

from luoagent.errors import DaemonNotRunning, UpdateError
from luoagent.report import Progress
from luoagent.workflows import client, journal

HELP = "undo what an interrupted update left behind (its journal)"


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="the outcome as JSON on stdout")


def run(args) -> int:
    progress = Progress("recover")
    try:
        out = client.call("recover", label="recover")
    except DaemonNotRunning:
        out = journal.recover()
    if args.json:
        print(json.dumps(out, indent=1))
    elif not out["recovered"]:
        progress.log(f"nothing to recover: no journal at {out['journal']}")
    else:
        progress.log(f"undid the {out.get('job')} of pid {out.get('pid')} (stopped at step {out.get('step')}):")
        for line in out["actions"]:
            progress.note(line)
    if out["problems"]:
        raise UpdateError("recovery incomplete, journal kept: " + "; ".join(out["problems"]))
    return 0
