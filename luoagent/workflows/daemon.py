"""Workflow `luoagent daemon`: the long-lived process that runs updates, restores, recovery and
the `vm` verbs for the CLI's clients over the control socket; holds every LUO fd they make.

A client that dies changes nothing: the job is the daemon's, not the connection's; `luoagent
status --follow` re-attaches. On start the daemon first takes back what systemd's fd store
hands it (outgoing sessions of a daemon that died before the kexec: closed and removed, i.e.
rolled back), undoes what an unfinished update journal records, serves, and then restores the
VMs of the last kexec by itself when incoming sessions exist (from the fd store, else from
/dev/liveupdate). SIGTERM/SIGINT/SIGHUP during an update roll it back, then the daemon exits.
Protocol and status fields: docs/daemon.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import __version__, testmode
from luoagent.adapters import control, sd_notify
from luoagent.errors import DaemonError, LuoAgentError, UsageError
from luoagent.log import get_logger
from luoagent.report import Progress
from luoagent import manifest as mf
from luoagent.workflows import client, fd_store, journal
from luoagent.workflows import restore as restorewf
from luoagent.workflows import update as updatewf
from luoagent.workflows import vm as vmwf

log = get_logger(__name__)

#: seconds a real update waits for a client to acknowledge its result before the kexec
ANNOUNCE_WAIT = 2.0

def configure(parser) -> None:
    parser.add_argument("--socket", default=None, metavar="PATH",
                        help=f"control socket (default ${journal.RUN_DIR_ENV}/{client.SOCKET_FILE}, "
                             f"i.e. {journal.DEFAULT_RUN_DIR / client.SOCKET_FILE})")


def run(args) -> int:
    return asyncio.run(Daemon(client.socket_path(args.socket)).main())


# ---------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------
class _Lines:
    """A text stream for a job's Progress: each line goes to the daemon's stderr, into the
    job's history (for clients that attach later) and to every attached client."""

    def __init__(self, job: "Job"):
        self.job = job
        self._partial = ""

    def write(self, text: str) -> int:
        sys.stderr.write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self.job.emit({"type": "progress", "line": line})
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


@dataclass
class Job:
    id: int
    op: str
    args: dict
    started_ns: int = field(default_factory=time.time_ns)
    ended_ns: int = 0
    state: str = "running"  # running | done | failed
    history: list[dict] = field(default_factory=list)
    subscribers: list[tuple[control.Channel, object]] = field(default_factory=list)
    runner: object = None  # the update (updatewf.job) while it exists
    result: dict | None = None
    error: dict | None = None
    vm_root: Path | None = None  # the VM root whose lock the job takes
    task: asyncio.Task | None = None
    #: set when a client acknowledged the announce of a real update (it printed the result)
    acked: asyncio.Event = field(default_factory=asyncio.Event)

    def emit(self, msg: dict) -> None:
        self.history.append(msg)
        for ch, req_id in list(self.subscribers):
            if ch.closed:
                self.subscribers.remove((ch, req_id))
            else:
                ch.send({**msg, "id": req_id, "job": self.id})

    def attach(self, ch: control.Channel, req_id) -> None:
        for msg in self.history:
            ch.send({**msg, "id": req_id, "job": self.id})
        if self.state == "running":
            self.subscribers.append((ch, req_id))
        else:
            ch.send({**self.final(), "id": req_id, "job": self.id})

    def final(self) -> dict:
        if self.error is not None:
            return {"type": "error", **self.error}
        return {"type": "result", "result": self.result}

    def summary(self) -> dict:
        doc = {"id": self.id, "op": self.op, "state": self.state, "started_ns": self.started_ns,
               "ended_ns": self.ended_ns, "dry_run": bool(self.args.get("dry_run"))}
        if self.error is not None:
            doc["error"] = self.error.get("message")
        return doc


# ---------------------------------------------------------------------------------------
# the daemon
# ---------------------------------------------------------------------------------------
class Daemon:
    def __init__(self, sock: Path):
        self.sock = sock
        self.progress = Progress("daemon")
        self.started_ns = time.time_ns()
        self.job: Job | None = None
        self._next_id = 1
        self._stop = asyncio.Event()
        self.phase = "starting"
        self.stopping = ""
        self.fd_store = fd_store.FdStore.from_environment()

    def _take_back(self) -> dict:
        """What the fd store handed back at start: outgoing sessions (a daemon died before the
        kexec) are closed and removed, which rolls them back; incoming ones are returned."""
        try:
            handed = fd_store.take_listen_fds(self.fd_store)
        except LuoAgentError as exc:
            self.progress.log(f"fds passed by systemd not usable: {exc}")
            return {}
        for name in handed.foreign:
            self.progress.note(f"fd store entry {name!r} is no LUO session: closed and removed")
        for name, session in handed.outgoing.items():
            self.progress.note(f"outgoing session {name} from a daemon that died before the kexec: closed and "
                               "removed from the fd store (its files are unpreserved)")
            session.close()
            try:
                self.fd_store.forget(name)
            except LuoAgentError as exc:
                self.progress.note(f"NOT UNDONE: removing {name} from the fd store: {exc}")
        if handed.incoming:
            self.progress.note("incoming sessions handed back by systemd: " + ", ".join(sorted(handed.incoming)))
        return handed.incoming

    def _incoming_manifest(self, incoming: dict) -> bool:
        """Is there a restore to do? The manifest session handed back by systemd, else retrieved
        from /dev/liveupdate (opened only for that; it joins ``incoming``)."""
        if mf.MANIFEST_SESSION in incoming:
            return True
        if "luo" in testmode.skipped():
            return False
        from luoagent.errors import LuoUnavailable, SessionAlreadyRetrieved, SessionNotFound

        try:
            with restorewf.open_device() as lu:
                session = lu.retrieve_session(mf.MANIFEST_SESSION)
        except (LuoUnavailable, SessionNotFound):
            return False
        except SessionAlreadyRetrieved:
            self.progress.note(f"session {mf.MANIFEST_SESSION!r} was already retrieved in this boot "
                               "(an earlier restore): nothing to restore")
            return False
        except LuoAgentError as exc:
            self.progress.log(f"cannot look for VMs to restore: {exc}")
            return False
        try:
            self.fd_store.push(session)
        except LuoAgentError as exc:
            self.progress.log(f"manifest session not put into the fd store ({exc}); restoring anyway")
        incoming[mf.MANIFEST_SESSION] = session
        return True

    async def main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in updatewf.ROLLBACK_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        # before serving anyone: what an earlier daemon (or CLI run) left half done
        self.phase = "recovering"
        self.progress.log(self.fd_store.describe())
        incoming = self._take_back()
        await self._recover_at_start()
        server = await control.serve(self.sock, self._serve, allowed_uids={0, os.geteuid()})
        self.phase = "idle"
        self.progress.log(f"luoagent {__version__} daemon (pid {os.getpid()}) serving {self.sock}")
        self._notify({"READY": 1, "STATUS": f"serving {self.sock}"})  # Type=notify: up only now
        if self._incoming_manifest(incoming):
            self.progress.log("VMs preserved by the last kexec: restoring them (job 1; `luoagent status --follow`)")
            self._start_restore({}, incoming)
        elif incoming:
            for name in sorted(incoming):
                self.progress.note(f"incoming session {name} has no manifest to restore it by: released")
                incoming[name].close()
                with contextlib.suppress(LuoAgentError):
                    self.fd_store.forget(name)
        try:
            await self._stop.wait()
        finally:
            server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.sock)
        self._notify({"STOPPING": 1, "STATUS": f"stopping ({self.stopping or 'stopped'})"})
        if self.job is not None and self.job.task is not None and not self.job.task.done():
            await asyncio.wait([self.job.task])
        self.progress.log(f"daemon exits ({self.stopping or 'stopped'})")
        return 0

    def _notify(self, fields: dict) -> None:
        try:
            sd_notify.notify(fields)
        except LuoAgentError as exc:  # systemd's bookkeeping must never stop the daemon
            self.progress.log(f"sd_notify: {exc}")

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping:
            return
        self.stopping = name
        job = self.job
        if job is not None and job.state == "running" and job.task is not None:
            self.progress.log(f"{name}: rolling back job {job.id}, then exiting")
            if job.runner is not None:
                job.runner.interrupt(sig, job.task)
            else:
                job.task.cancel()
            job.task.add_done_callback(lambda _t: self._stop.set())
        else:
            self._stop.set()

    async def _recover_at_start(self) -> None:
        try:
            doc = journal.read()
        except LuoAgentError as exc:
            self.progress.log(f"journal unreadable, left as it is: {exc}")
            return
        if doc is None:
            return
        self.progress.log(f"unfinished {doc.get('job')} journal (pid {doc.get('pid')}, step {doc.get('step')}): "
                          "undoing what it records")
        try:
            out = await journal.recover_async()
        except LuoAgentError as exc:
            self.progress.log(f"recovery refused: {exc}")
            return
        for line in out["actions"]:
            self.progress.note(line)
        for line in out["problems"]:
            self.progress.note(f"NOT UNDONE: {line}")

    # -- connections ----------------------------------------------------------------------
    async def _serve(self, ch: control.Channel) -> None:
        ch.send({"type": "hello", "protocol": control.PROTOCOL, "agent_version": __version__, "pid": os.getpid()})
        while True:
            try:
                msg = await ch.recv()
            except LuoAgentError as exc:
                ch.send(_error_msg(exc))
                return
            if msg is None:
                return  # the client went away; its job (if any) carries on
            req_id = msg.get("id")
            try:
                await self._dispatch(ch, req_id, str(msg.get("op")), msg.get("args") or {})
            except LuoAgentError as exc:
                ch.send({**_error_msg(exc), "id": req_id})

    async def _dispatch(self, ch, req_id, op: str, args: dict) -> None:
        if op == "status":
            ch.send({"type": "result", "id": req_id, "result": self.status()})
        elif op == "follow":
            if self.job is None:
                ch.send({"type": "result", "id": req_id, "result": {"job": None, "status": self.status()}})
            else:
                self.job.attach(ch, req_id)
        elif op == "update":
            job = self._start_update(args)
            ch.send({"type": "accepted", "id": req_id, "job": job.id})
            job.attach(ch, req_id)
        elif op == "restore":
            if self.job is not None and self.job.op == "restore" and self.job.state == "running":
                job = self.job  # the boot restore (or another client's): follow it
            else:
                job = self._start_restore(args, {})
            ch.send({"type": "accepted", "id": req_id, "job": job.id})
            job.attach(ch, req_id)
        elif op == "vm-list":
            result = await asyncio.to_thread(vmwf.perform, "list", args)
            ch.send({"type": "result", "id": req_id, "result": result})
        elif op in ("vm-start", "vm-stop", "vm-upgrade"):
            job = self._start_vm_job(op, args)
            ch.send({"type": "accepted", "id": req_id, "job": job.id})
            job.attach(ch, req_id)
        elif op == "ack":
            if self.job is not None:
                self.job.acked.set()
        elif op == "recover":
            self._refuse_if_busy("recover")
            self.phase = "recovering"
            try:
                out = await journal.recover_async()
            finally:
                self.phase = "idle"
            ch.send({"type": "result", "id": req_id, "result": out})
        else:
            raise UsageError(f"unknown daemon operation {op!r} (status, follow, update, restore, recover, ack, "
                             "vm-start, vm-stop, vm-list, vm-upgrade)")

    def _refuse_if_busy(self, what: str) -> None:
        if self.stopping:
            raise DaemonError(f"the daemon is stopping ({self.stopping}); {what} refused")
        if self.job is not None and self.job.state == "running":
            step = getattr(self.job.runner, "step", "?")
            raise DaemonError(
                f"job {self.job.id} ({self.job.op}) is running, at step {step}: {what} refused; "
                "watch it with `luoagent status --follow`"
            )

    # -- update ---------------------------------------------------------------------------
    def _start_update(self, args: dict) -> Job:
        self._refuse_if_busy("update")
        try:
            req = updatewf.UpdateRequest(
                kernel=Path(args["kernel"]),
                initrd=Path(args["initrd"]) if args.get("initrd") else None,
                cmdline=args.get("cmdline"),
                vms=[str(v) for v in args.get("vms") or []],
                vm_root=vmwf.vm_root(args.get("vm_root")),
                dry_run=bool(args.get("dry_run")),
                timeout=float(args.get("timeout") or 60.0),
                json=True,
                allow_loss=[str(v) for v in args.get("allow_loss") or []],
                running_kernel=Path(args["running_kernel"]) if args.get("running_kernel") else None,
                allow_unverified_kernel=bool(args.get("allow_unverified_kernel")),
                fd_store=self.fd_store,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"update request is missing or has a bad field: {exc}") from None
        job = Job(id=self._next_id, op="update", args=args)
        self._next_id += 1
        req.progress = _Lines(job)
        req.announce = lambda result: self._announce(job, result)
        job.runner = updatewf.job(req)
        job.vm_root = req.vm_root
        self.job = job
        job.task = asyncio.ensure_future(self._run_job(job))
        return job

    # -- restore --------------------------------------------------------------------------
    def _start_restore(self, args: dict, incoming: dict) -> Job:
        """The restore state machine as a daemon job, on the sessions systemd handed back
        (``incoming``) or retrieved from /dev/liveupdate, each kept in the fd store."""
        self._refuse_if_busy("restore")
        try:
            opts = restorewf.RestoreOptions(
                qemu=args.get("qemu"),
                vm_root=vmwf.vm_root(args.get("vm_root")),
                rescue_dir=Path(args.get("rescue_dir") or restorewf.DEFAULT_RESCUE_DIR),
                timeout=float(args.get("timeout") or 60.0),
            )
        except (TypeError, ValueError) as exc:
            raise UsageError(f"restore request has a bad field: {exc}") from None
        job = Job(id=self._next_id, op="restore", args=args)
        self._next_id += 1
        opts.progress = _Lines(job)
        job.runner = restorewf.job(opts, restorewf.SessionSource(incoming, self.fd_store))
        job.vm_root = opts.vm_root
        self.job = job
        job.task = asyncio.ensure_future(self._run_job(job))
        return job

    # -- vm start | stop | upgrade -------------------------------------------------------
    def _start_vm_job(self, op: str, args: dict) -> Job:
        """A `vm` verb as a daemon job, so a VM's QEMU is started, stopped or replaced by the
        daemon (under systemd: in the VM's own scope) whatever becomes of the client."""
        self._refuse_if_busy(op.replace("-", " "))
        job = Job(id=self._next_id, op=op, args=args)
        self._next_id += 1
        if op == "vm-upgrade":
            from luoagent.workflows import upgrade as upgradewf  # only an upgrade needs it

            job.runner = upgradewf.UpgradeBatch.from_request(args, progress=Progress("upgrade", stream=_Lines(job)))
            job.vm_root = Path(args.get("root") or vmwf.vm_root())  # no update or restore under it
        else:
            job.runner = _VmVerb(op.removeprefix("vm-"), args)  # start/stop take the VM-root lock themselves
        self.job = job
        job.task = asyncio.ensure_future(self._run_job(job))
        return job

    async def _announce(self, job: Job, result: dict) -> None:
        """A real update is about to kexec: hand the result to the attached clients and give
        them up to ANNOUNCE_WAIT seconds to say they have it (op ``ack``)."""
        job.emit({"type": "announce", "result": result})
        if job.subscribers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(job.acked.wait(), ANNOUNCE_WAIT)

    async def _run_job(self, job: Job) -> None:
        try:
            # the same one-run-per-VM-root lock a CLI update takes: a daemon job and a direct
            # `luoagent update|restore|vm start` never touch the same VMs at once
            with vmwf.agent_lock(job.vm_root, job.op) if job.vm_root is not None else contextlib.nullcontext():
                job.result = await job.runner.run()
            job.state = "done"
        except LuoAgentError as exc:
            job.error = _error_msg(exc)
            job.state = "failed"
        except asyncio.CancelledError:
            job.error = ({"error": "UpdateError", "message": "update cancelled (rolled back)", "exit_code": 1}
                         if job.op == "update" else
                         {"error": "RestoreError", "message": "restore stopped by a signal; the next daemon start "
                          "finishes it (restore journal, fd store)", "exit_code": 1}
                         if job.op == "restore" else
                         {"error": "DaemonError", "message": f"{job.op} stopped by a signal", "exit_code": 1})
            job.state = "failed"
        except Exception as exc:  # a bug: the client must still get an answer
            log.exception("daemon.job_crashed", job=job.id)
            job.error = {"error": "DaemonError", "message": f"{type(exc).__name__}: {exc}", "exit_code": 1}
            job.state = "failed"
        finally:
            job.ended_ns = time.time_ns()
            if job.op == "restore":  # `systemctl status luoagent` tells how the boot restore went
                vms = (job.result or {}).get("vms") or []
                self._notify({"STATUS": f"serving {self.sock}; restore job {job.id} {job.state}: "
                              f"{sum(1 for v in vms if v.get('ok'))} of {len(vms)} VMs restored"})
            final = job.final()
            for ch, req_id in job.subscribers:
                ch.send({**final, "id": req_id, "job": job.id})
            job.subscribers.clear()

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict:
        job = self.job
        runner = job.runner if job is not None else None
        running = job is not None and job.state == "running"
        if running:
            phase = f"{job.op}:{'rollback' if getattr(runner, 'rolling_back', False) else runner.step}"
        else:
            phase = self.phase
        vms = []
        if runner is not None and job.op != "update":
            vms = runner.status_vms()
        elif runner is not None:
            for w in runner.work:
                vms.append({"name": w.name, "pid": w.target.pid, "qmp_socket": str(w.target.qmp_socket),
                            "status_before": w.status_before, "was_running": w.was_running,
                            "stopped_by_update": w.stop_issued, "session": w.session_name if w.session else None})
        direction = "incoming" if job is not None and job.op == "restore" else "outgoing"
        try:
            pending = journal.read()
        except LuoAgentError as exc:
            pending = {"unreadable": str(exc)}
        return {
            "protocol": control.PROTOCOL,
            "agent_version": __version__,
            "daemon": {"pid": os.getpid(), "started_ns": self.started_ns, "socket": str(self.sock),
                       "test_mode": testmode.enabled()},
            "phase": phase,
            "paused_at": testmode.paused_at or None,
            "job": job.summary() if job is not None else None,
            "vms": vms,
            "sessions": [{"name": n, "direction": direction, "held_by": self.fd_store.where(n)}
                         for n in (runner.held_sessions() if running else [])],
            "fd_store": {"enabled": self.fd_store.enabled, "capacity": self.fd_store.capacity,
                         "stored": sorted(self.fd_store.stored)},
            "journal": pending,
        }


class _VmVerb:
    """`vm start` or `vm stop` as a job's runner: the blocking verb in a worker thread. A signal
    to the daemon lets it finish (seconds), so no VM is left half started or half stopped."""

    def __init__(self, action: str, req: dict):
        self.action, self.req = action, req
        self.step = action
        self.rolling_back = False

    async def run(self) -> dict:
        return await asyncio.to_thread(vmwf.perform, self.action, self.req)

    def interrupt(self, sig: int, task: asyncio.Task) -> None:
        pass  # finish first; the daemon exits when the job is done

    def held_sessions(self) -> list[str]:
        return []

    def status_vms(self) -> list[dict]:
        return [{"name": self.req.get("name"), "action": self.action}]


def _error_msg(exc: LuoAgentError) -> dict:
    return {"type": "error", "error": type(exc).__name__, "message": str(exc), "exit_code": exc.exit_code}

