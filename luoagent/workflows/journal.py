"""The update journal: what an update did to VMs and the kernel, written atomically (fsync'd)
before each step, and the recovery that undoes exactly that after a crash (`luoagent recover`).

One file, ``RUN_DIR/journal.json`` (``$LUOAGENT_RUN_DIR``, default /run/luoagent: a tmpfs, so a
kexec leaves no stale journal). It is created 0600 when an update starts and removed when the
update rolled back cleanly. Each entry is written *before* its step (an intent), so recovery
treats it as "may have happened" and every undo is idempotent: cancel a migration and reset
cpr-reboot settings, `cont` a VM that was running before and is not now, `remove-fd` the
vmstate fdset, unload the kexec image. LUO sessions need no undo: they die with the process
that held them (closing an outgoing session unpreserves its files); they are listed so status
and recovery can say so. Schema: docs/daemon.md "Journal"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent.adapters import cpr, kexec, procfs, qmp_client
from luoagent.errors import JournalError, LuoAgentError
from luoagent.log import get_logger

log = get_logger(__name__)

RUN_DIR_ENV = "LUOAGENT_RUN_DIR"
DEFAULT_RUN_DIR = Path("/run/luoagent")
JOURNAL_FILE = "journal.json"
SCHEMA = 1


def run_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Where the agent keeps its runtime state (journal, control socket)."""
    return Path(explicit or os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR)


def journal_path(directory: Path | None = None) -> Path:
    return (directory or run_dir()) / JOURNAL_FILE


def _write_atomic(path: Path, doc: dict) -> None:
    """tmp file created 0600 + fsync + rename + fsync of the directory: all or nothing on disk."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass
class JsonJournal:
    """A journal document on disk, rewritten whole (``_write_atomic``) by every ``record*``:
    the shared mechanics of the update journal and the restore journal (restore_journal.py)."""

    path: Path
    doc: dict = field(default_factory=dict)

    def _flush(self) -> None:
        _write_atomic(self.path, self.doc)

    def record(self, **facts) -> None:
        self.doc.update(facts)
        self._flush()

    def record_vm(self, name: str, **facts) -> None:
        self.doc["vms"].setdefault(name, {}).update(facts)
        self._flush()

    def finish(self) -> None:
        """The job left nothing to undo or resume: drop the journal."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_document(path: Path, kind: str, schema: int) -> dict | None:
    """The ``kind`` ("update", "restore") journal at ``path``, or None when there is none. A
    torn file cannot exist (rename); anything else unreadable is a JournalError."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise JournalError(f"cannot read the {kind} journal {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict) or doc.get("schema") != schema or not isinstance(doc.get("vms"), dict):
            raise ValueError(f"not a luoagent {kind} journal of schema {schema}")
    except ValueError as exc:
        raise JournalError(f"{path} is not a usable {kind} journal ({exc}); inspect it and remove it by hand") from None
    return doc


@dataclass
class Journal(JsonJournal):
    """The journal of one running update; ``record_*`` write it before the step they name."""

    @classmethod
    def begin(cls, job: str, path: Path | None = None, **facts) -> "Journal":
        """Start a journal; refuse if an unfinished one exists (its VMs may still be stopped)."""
        path = path or journal_path()
        old = read(path)
        if old is not None:
            owner = int(old.get("pid") or 0)
            who = (f"pid {owner} is still running it" if owner and procfs.pid_alive(owner)
                   else "its process is gone")
            raise JournalError(
                f"an earlier {old.get('job', 'update')} did not finish ({path}; {who}): "
                "run `luoagent recover` to undo what it did, then retry"
            )
        j = cls(path=path, doc={"schema": SCHEMA, "job": job, "pid": os.getpid(), "started_ns": time.time_ns(),
                                "step": "start", "kexec_loaded": False, "sessions": [], "vms": {}, **facts})
        try:
            j._flush()
        except OSError as exc:
            raise JournalError(
                f"cannot write the update journal {path} ({exc.strerror or exc}); nothing was touched. "
                f"Free space in {path.parent} or set ${RUN_DIR_ENV} to a writable tmpfs"
            ) from None
        return j

    def record_session(self, name: str) -> None:
        if name not in self.doc["sessions"]:
            self.doc["sessions"].append(name)
            self._flush()


def read(path: Path | None = None) -> dict | None:
    """The update journal document, or None when there is none."""
    return read_document(path or journal_path(), "update", SCHEMA)


# ---------------------------------------------------------------------------------------
# recovery
# ---------------------------------------------------------------------------------------
async def _undo_vm(name: str, entry: dict, timeout: float) -> str:
    sock = Path(entry.get("qmp_socket") or "")
    if not sock.exists():
        return f"VM {name}: QMP socket {sock} is gone (QEMU exited); nothing to undo"
    try:
        q = await qmp_client.Qmp.connect(sock, timeout=timeout)
    except LuoAgentError as exc:
        return f"VM {name}: unreachable ({exc}); nothing to undo"
    try:
        status = await q.status()
        if entry.get("migrate_configured") or entry.get("stop_issued"):
            await cpr.cancel_and_reset(q)
        if entry.get("stop_issued") and entry.get("was_running"):
            if await q.status() != "running":
                await q.cont()
            if (now := await q.status()) != "running":
                raise JournalError(f"VM {name} is {now!r} after cont")
        if entry.get("fdset_id") is not None:
            with contextlib.suppress(LuoAgentError):
                await q.execute("remove-fd", {"fdset-id": int(entry["fdset_id"])})
        final = await q.status()
    finally:
        with contextlib.suppress(Exception):
            await q.close()
    return f"VM {name}: was {status}, now {final}"


async def recover_async(path: Path | None = None, timeout: float = 30.0) -> dict:
    """Undo what the journal at ``path`` records. Returns {"recovered", "actions", "problems"};
    the journal is removed only when nothing is left to undo."""
    path = path or journal_path()
    doc = read(path)
    if doc is None:
        return {"recovered": False, "actions": [], "problems": [], "journal": str(path)}
    owner = int(doc.get("pid") or 0)
    if owner and owner != os.getpid() and procfs.pid_alive(owner):
        raise JournalError(
            f"the {doc.get('job', 'update')} journaled in {path} is still running (pid {owner}); "
            "it rolls back by itself on failure, a signal (SIGTERM) makes it roll back now"
        )
    names = sorted(doc["vms"])
    results = await asyncio.gather(*(_undo_vm(n, doc["vms"][n], timeout) for n in names), return_exceptions=True)
    actions, problems = [], []
    for n, r in zip(names, results):
        if isinstance(r, BaseException):
            problems.append(f"VM {n}: {r}")
        else:
            actions.append(r)
    if doc.get("sessions"):
        actions.append("sessions " + ", ".join(doc["sessions"]) + ": released when their holder died")
    if doc.get("kexec_loaded"):
        try:
            kexec.unload()
            actions.append("kexec image unloaded")
        except LuoAgentError as exc:
            problems.append(f"kexec image: {exc}")
    if not problems:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    log.info("journal.recovered", actions=actions, problems=problems)
    return {"recovered": True, "job": doc.get("job"), "step": doc.get("step"), "pid": owner,
            "actions": actions, "problems": problems, "journal": str(path)}


def recover(path: Path | None = None, timeout: float = 30.0) -> dict:
    return asyncio.run(recover_async(path, timeout))

