"""Workflow `luoagent status`: what the daemon is doing (phase, VMs, held LUO sessions, an
unfinished journal), once or following the running job's progress to its end.

Without a daemon it reports that, and any unfinished journal (fields: docs/daemon.md)."""

from __future__ import annotations

import json

from luoagent.errors import DaemonNotRunning, LuoAgentError
from luoagent.report import Progress
from luoagent.workflows import client, journal

HELP = "show what the luoagent daemon is doing (phase, VMs, held sessions)"


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="the status document as JSON on stdout")
    parser.add_argument("--follow", action="store_true",
                        help="attach to the running job: its progress so far, then live, until it ends")


def run(args) -> int:
    if args.follow:
        return _follow(args)
    try:
        doc = client.call("status")
        doc["daemon_running"] = True
    except DaemonNotRunning as exc:
        try:
            pending = journal.read()
        except LuoAgentError as jexc:
            pending = {"unreadable": str(jexc)}
        doc = {"daemon_running": False, "reason": str(exc), "phase": "no-daemon", "job": None, "vms": [],
               "sessions": [], "fd_store": None, "journal": pending}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        _print(doc)
    return 0


def _follow(args) -> int:
    result = client.call("follow", label="status")
    if args.json:
        print(json.dumps(result, indent=1))
    elif result.get("job", "") is None:
        Progress("status").log("no job has run in this daemon")
    else:
        Progress("status").log(f"job ended: {result.get('status', 'ok')}")
    return 0


def _print(doc: dict) -> None:
    if not doc["daemon_running"]:
        print(f"daemon: not running ({doc['reason']})")
    else:
        d = doc["daemon"]
        print(f"daemon: pid {d['pid']}, socket {d['socket']}, luoagent {doc['agent_version']}")
    print(f"phase: {doc['phase']}" + (f" (test pause at {doc['paused_at']})" if doc.get("paused_at") else ""))
    if doc.get("job"):
        j = doc["job"]
        print(f"job {j['id']}: {j['op']} {j['state']}" + (f": {j['error']}" if j.get("error") else ""))
    if doc.get("fd_store") is not None:
        st = doc["fd_store"]
        print("fd store: " + (f"systemd's, {len(st['stored'])} of {st['capacity']} entries used" if st["enabled"]
                              else "none (a crash of the daemon during a restore loses RAM)"))
    for v in doc.get("vms", []):
        if "stopped_by_update" in v:
            print(f"  vm {v['name']}: pid {v['pid']}, {'stopped by the update' if v['stopped_by_update'] else 'not stopped'}"
                  + (f", session {v['session']}" if v.get("session") else ""))
        else:  # a restore
            print(f"  vm {v['name']}: pid {v['pid']}, {v.get('status') or v.get('action') or '...'}"
                  + (f", FAILED: {v['error']}" if v.get("error") else ""))
    for s in doc.get("sessions", []):
        print(f"  session {s['name']} ({s['direction']}, held by {' and '.join(s.get('held_by') or ['daemon'])})")
    if doc.get("journal"):
        print(f"unfinished journal: {doc['journal']}; `luoagent recover` undoes it")
