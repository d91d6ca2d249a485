"""The restore journal: per VM, how far the restore after a kexec got (written atomically,
fsync'd, before each step), and the rule a restarted daemon follows to finish that restore.

``RUN_DIR/restore.json`` (tmpfs: it belongs to this boot; its boot id is checked too).
A VM's ``step`` is an intent written before the action it names:
``retrieving`` → ``qemu-starting`` (+ ``unit``) → ``qemu-started`` (+ ``pid``, ``pid_start``) →
``cont-issued`` → ``resumed`` → ``finished``; ``loaded`` replaces ``cont-issued``/``resumed`` for a
VM that was paused before the update (it never runs, so it may be started again); ``failed``
once a rescue image holds it (or nothing could be done). Replay rule (``next_action``):

- nothing / ``retrieving``: retrieve the memfds (again: RETRIEVE_FD of a token already retrieved
  returns the same file) and start the VM;
- ``qemu-starting`` / ``qemu-started`` / ``loaded``: the guest never ran in that QEMU, so it is
  killed (only if it is still the process started then: pid and start time, or its scope unit)
  and the VM is started again;
- ``cont-issued`` / ``resumed``: the guest may have run, so it is **never started again**: the
  QEMU found on its QMP socket is adopted (``cont`` again if it is paused), then finish;
- ``finished`` / ``failed``: only close the session and remove it from the fd store."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from luoagent.errors import JournalError
from luoagent.workflows import journal

RESTORE_FILE = "restore.json"
SCHEMA = 1

#: steps of one VM, in order (see the module docstring)
STEPS = ("retrieving", "qemu-starting", "qemu-started", "loaded", "cont-issued", "resumed", "finished", "failed")

#: what a restarted restore does with a VM (next_action)
START = "start"
RESTART = "kill-and-start"
ADOPT = "adopt"
CLOSE = "close"


def next_action(entry: dict | None) -> str:
    """The replay rule for one VM's journal entry (module docstring); pure."""
    step = (entry or {}).get("step") or ""
    if step in ("", "retrieving"):
        return START
    if step in ("qemu-starting", "qemu-started", "loaded"):
        return RESTART
    if step in ("cont-issued", "resumed"):
        return ADOPT
    if step in ("finished", "failed"):
        return CLOSE
    raise JournalError(f"restore journal: VM step {step!r} is not one of {', '.join(STEPS)}")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def restore_path(directory: Path | None = None) -> Path:
    return (directory or journal.run_dir()) / RESTORE_FILE


@dataclass
class RestoreJournal(journal.JsonJournal):
    """The journal of one restore (possibly resumed by a later daemon in the same boot)."""

    #: the document found at open (a restore that was interrupted), else None
    previous: dict | None = None

    @classmethod
    def open(cls, path: Path | None = None, **facts) -> "RestoreJournal":
        """Resume the journal of this boot's interrupted restore, or start a new one."""
        path = path or restore_path()
        old = read(path)
        if old is not None and old.get("boot_id") == boot_id():
            j = cls(path=path, doc=old, previous=json.loads(json.dumps(old)))
            j.doc["pid"] = os.getpid()
            j.doc.setdefault("resumed_by", []).append({"pid": os.getpid(), "at_ns": time.time_ns()})
        else:
            j = cls(path=path, doc={"schema": SCHEMA, "job": "restore", "pid": os.getpid(), "boot_id": boot_id(),
                                    "started_ns": time.time_ns(), "step": "manifest", "vms": {}, **facts})
        try:
            j._flush()
        except OSError as exc:
            raise JournalError(f"cannot write the restore journal {path} ({exc.strerror or exc}); nothing was "
                               f"started. Free space in {path.parent} or set ${journal.RUN_DIR_ENV}") from None
        return j

    def entry(self, name: str) -> dict | None:
        return (self.previous or {}).get("vms", {}).get(name)



def read(path: Path | None = None) -> dict | None:
    """The restore journal document, or None when there is none."""
    return journal.read_document(path or restore_path(), "restore", SCHEMA)
