"""The CLI side of the daemon's control socket: send one request, echo the job's progress
through `report.Progress`, return its result (or raise its error as the same exception class).

Used by `update`, `restore`, `vm`, `status` and `recover`; when no daemon serves the socket they
say so and do the job in their own process (docs/daemon.md "Without a daemon")."""

from __future__ import annotations

import os
from pathlib import Path

from luoagent.adapters import control
from luoagent.errors import DaemonError
from luoagent.report import Progress
from luoagent.workflows import journal

SOCKET_FILE = "control.sock"


def socket_path(explicit: str | os.PathLike | None = None) -> Path:
    """The control socket: explicit, else RUN_DIR/control.sock (RUN_DIR: $LUOAGENT_RUN_DIR)."""
    return Path(explicit) if explicit else journal.run_dir() / SOCKET_FILE


def call(op: str, args: dict | None = None, *, sock: Path | None = None, label: str = "luoagent",
         on_announce=None, progress: Progress | None = None) -> dict:
    """Run ``op`` in the daemon and wait for its end. Raises DaemonNotRunning when nobody
    serves the socket (nothing was sent), PeerRefused for a non-root client."""
    sock = sock or socket_path()
    c = control.Client.connect(sock)
    progress = progress or Progress(label)
    announced = False
    try:
        c.send({"id": 1, "op": op, "args": args or {}})
        while True:
            msg = c.recv()
            if msg is None:
                if announced:
                    return {"ok": True, "status": "rebooting into the new kernel (the daemon announced it)"}
                raise DaemonError(
                    f"the luoagent daemon (pid {c.hello.get('pid')}) closed the connection before job "
                    "ended (was it stopped or killed?); its journal is undone when it starts again, "
                    "see `luoagent status` or run `luoagent recover`"
                )
            kind = msg.get("type")
            if kind == "progress":
                progress.echo(str(msg.get("line", "")))
            elif kind == "accepted":
                progress.log(f"job {msg.get('job')} runs in the luoagent daemon (pid {c.hello.get('pid')}); "
                             "it goes on if this command dies (`luoagent status --follow`)")
            elif kind == "announce":
                announced = True
                if on_announce is not None:
                    on_announce(msg.get("result") or {})
                c.send({"id": 2, "op": "ack"})  # the daemon kexecs once we have it
            elif kind == "result":
                return msg.get("result") or {}
            elif kind == "error":
                raise control.error_from(msg)
    finally:
        c.close()
