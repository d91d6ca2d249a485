"""Workflow `luoagent update`: preflight, preserve VM RAM, quiesce VMs in parallel, preserve
vmstate + manifest with LUO, kexec into the new kernel — or roll back everything before that.

State machine (docs/architecture.md "Update"): PREFLIGHT → PRESERVE_RAM → QUIESCE →
PRESERVE_VMSTATE → MANIFEST → REBOOT. Any failure before the reboot syscall succeeds resumes
every VM this run stopped that was running before (a VM the user had paused stays paused),
closes every outgoing session (which unpreserves its files) and unloads the kexec image.
Test-only fault points and skipped steps: `luoagent.testmode`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import __version__, memfd
from luoagent import manifest as mf
from luoagent import testmode
from luoagent.adapters import kexec, procfs, systemctl
from luoagent.adapters import cpr, qemu_binary, qemu_ram, qmp_client
from luoagent.errors import (
    LuoAgentError,
    QmpUnreachable,
    RebootRefused,
    UpdateError,
    UsageError,
    VmNotPreservable,
)
from luoagent.log import get_logger
from luoagent.report import Progress
from luoagent.luo import LiveUpdate
from luoagent.workflows import doctor, journal, landing, ram_sample, summary
from luoagent.workflows import vm as vmwf

log = get_logger(__name__)

#: where `luoagent vm` keeps one directory per VM (owner: workflows.vm)
#: fdset ids we use for vmstate; high so they do not collide with a user's -add-fd sets
VMSTATE_FDSET_BASE = 0x4C55


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------
def configure(parser) -> None:
    parser.add_argument("--kernel", required=True, metavar="BZIMAGE", help="kernel image to kexec into")
    parser.add_argument("--initrd", metavar="FILE", help="initramfs for the new kernel")
    cmd = parser.add_mutually_exclusive_group()
    cmd.add_argument("--append", metavar="CMDLINE", help="command line of the new kernel")
    cmd.add_argument(
        "--reuse-cmdline", action="store_true", help="give the new kernel this kernel's command line (default)"
    )
    parser.add_argument(
        "--vm",
        action="append",
        metavar="NAME[=QMP_SOCKET]",
        help="VM to carry across (repeatable; default: every VM in the VM root). "
        "NAME=SOCKET adopts a QEMU started by another tool through its QMP socket",
    )
    parser.add_argument(
        "--vm-root", "--root", dest="vm_root", default=None,
        help=f"the VM root: directory holding one directory per VM (default $LUOAGENT_VM_ROOT or {vmwf.DEFAULT_VM_ROOT})",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="do everything reversible, then roll back instead of kexec"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per QEMU step (default 60)")
    parser.add_argument(
        "--allow-loss", action="append", default=[], metavar="NAME",
        help="accept that this QEMU / VM (name or pid), which is not carried, dies with the kexec (repeatable)",
    )
    parser.add_argument(
        "--running-kernel", metavar="BZIMAGE",
        help="the running kernel's image, to read its LUO ABI strings (default /boot/vmlinuz-RELEASE)",
    )
    parser.add_argument(
        "--allow-unverified-kernel", action="store_true",
        help="go ahead when the target's configuration or LUO ABI cannot be read (a known mismatch is still refused)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print the result as JSON on stdout (a real update prints it just before the kexec; "
        "if the update then fails, the error document follows on its own line)",
    )


def run(args) -> int:
    cmdline = args.append
    req = UpdateRequest(
        kernel=Path(args.kernel),
        initrd=Path(args.initrd) if args.initrd else None,
        cmdline=cmdline,
        vms=list(args.vm or []),
        vm_root=vmwf.vm_root(args.vm_root),  # same rule as `luoagent vm`
        dry_run=args.dry_run,
        timeout=args.timeout,
        json=args.json,
        allow_loss=list(args.allow_loss),
        running_kernel=Path(args.running_kernel) if args.running_kernel else None,
        allow_unverified_kernel=args.allow_unverified_kernel,
    )
    result = _via_daemon(req, args)
    if result is not None and not req.dry_run:
        return 0  # the daemon announced the result (printed) and kexecs
    if result is None:
        result = update(req)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        summary.update_summary(result)
    return 0


def _via_daemon(req: "UpdateRequest", args) -> dict | None:
    """Run the update in the luoagent daemon if one serves the control socket (it then goes
    on, or rolls back, whatever happens to this process); None when no daemon runs."""
    from luoagent.errors import DaemonNotRunning
    from luoagent.workflows import client

    def announce(result: dict) -> None:  # a real update: the result comes just before the kexec
        if args.json:
            print(json.dumps(result, indent=1), flush=True)
        else:
            summary.update_summary(result)

    request = {"kernel": str(req.kernel.absolute()), "initrd": str(req.initrd.absolute()) if req.initrd else None,
               "cmdline": req.cmdline, "vms": req.vms, "vm_root": str(req.vm_root.absolute()),
               "dry_run": req.dry_run, "timeout": req.timeout, "allow_loss": req.allow_loss,
               "running_kernel": str(req.running_kernel.absolute()) if req.running_kernel else None,
               "allow_unverified_kernel": req.allow_unverified_kernel}
    try:
        result = client.call("update", request, label="update", on_announce=announce)
    except DaemonNotRunning as exc:
        Progress("update").log(f"{exc}: running the update in this process; if it is killed, "
                               "`luoagent recover` undoes what it did")
        return None
    return result


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------
@dataclass
class UpdateRequest:
    kernel: Path
    initrd: Path | None = None
    cmdline: str | None = None  # None: reuse the running kernel's
    vms: list[str] = field(default_factory=list)
    vm_root: Path = vmwf.DEFAULT_VM_ROOT
    dry_run: bool = False
    timeout: float = 60.0
    json: bool = False
    #: landing-side preflight (workflows/landing.py): losses accepted, running image, override
    allow_loss: list[str] = field(default_factory=list)
    running_kernel: Path | None = None
    allow_unverified_kernel: bool = False
    #: progress lines go here (stderr by default; luoagent.report decides human or JSON)
    progress: object = None
    #: the journal file (default: journal.journal_path(), i.e. $LUOAGENT_RUN_DIR/journal.json)
    journal_path: Path | None = None
    #: awaited with the result document just before the kexec instead of printing it (the
    #: daemon: it returns once its clients have the result, or after a short timeout)
    announce: object = None
    #: the daemon's workflows.fd_store.FdStore: every session made is pushed into systemd's
    #: fd store right away and removed from it on rollback (None: the CLI, no store)
    fd_store: object = None


@dataclass
class VmTarget:
    """A running QEMU to carry across: how to reach it and how to start it again."""

    name: str
    qmp_socket: Path
    pid: int = 0
    binary: str = ""
    argv: list[str] = field(default_factory=list)
    adopted: bool = False
    uid: int = 0  # the QEMU's effective uid/gid as the kernel reports them
    gid: int = 0


@dataclass
class VmWork:
    """Everything this run did to one VM, so rollback can undo exactly that."""

    target: VmTarget
    session_name: str
    qmp: object = None
    backends: list = field(default_factory=list)
    ram_fds: list[int] = field(default_factory=list)
    session: object = None
    was_running: bool = False
    status_before: str = ""
    stop_issued: bool = False
    stopped_at_ns: int = 0
    saved_at_ns: int = 0
    migrate_configured: bool = False
    fdset_id: int | None = None
    vmstate_fd: int = -1
    vmstate_size: int = 0
    migrate_info: dict = field(default_factory=dict)
    ram_figures: cpr.RamFigures = cpr.RamFigures(None, None, None, None)
    qemu_version: str = ""
    quiesce_s: float = 0.0
    #: per RAM backend, the page sample hashed after stop (workflows/ram_sample.py)
    samples: list = field(default_factory=list)
    sample_s: float = 0.0

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def ram_bytes(self) -> int:
        return sum(b.size for b in self.backends)


# ---------------------------------------------------------------------------------------
# VM discovery
# ---------------------------------------------------------------------------------------
def discover(names: list[str], vm_root: Path) -> list[VmTarget]:
    """Resolve ``--vm`` arguments (or every VM in the VM root) to VmTargets."""
    targets: list[VmTarget] = []
    if not names:
        if not vm_root.is_dir():
            raise UsageError(
                f"no VMs to update: {vm_root} does not exist; start VMs with `luoagent vm start` "
                "or name them with --vm NAME=QMP_SOCKET"
            )
        names = sorted(p.name for p in vm_root.iterdir() if (p / "vm.json").is_file())
        if not names:
            raise UsageError(f"no VMs to update: {vm_root} is empty; start VMs with `luoagent vm start`")
    seen = set()
    for item in names:
        name, _, sock = item.partition("=")
        mf.vm_session_name(name)  # InvalidName early, before anything is touched
        if name in seen:
            raise UsageError(f"VM {name!r} named twice")
        seen.add(name)
        if sock:
            targets.append(VmTarget(name=name, qmp_socket=Path(sock), adopted=True))
        else:
            targets.append(_from_vm_root(name, vm_root))
    return targets


def _from_vm_root(name: str, vm_root: Path) -> VmTarget:
    """A VM `luoagent vm start` (or an earlier restore) recorded in ``vm_root/NAME/vm.json``."""
    vm_dir = vm_root / name
    if not (vm_dir / vmwf.RECORD_FILE).is_file():
        raise UsageError(
            f"VM {name!r} is not known: no {vm_dir / vmwf.RECORD_FILE}; list VMs with `luoagent vm list` "
            f"or adopt one with --vm {name}=QMP_SOCKET"
        )
    rec = vmwf.load_record(name, vm_root)
    return VmTarget(
        name=name,
        qmp_socket=Path(rec.qmp_socket or vm_dir / "qmp.sock"),
        pid=int(rec.pid or 0),
        binary=str(rec.qemu or ""),
        argv=[str(a) for a in rec.argv],
    )


# ---------------------------------------------------------------------------------------
# the update
# ---------------------------------------------------------------------------------------
class _Rollback(Exception):
    pass


def update(req: UpdateRequest) -> dict:
    """Run the whole update. Returns the result document (only for --dry-run does it return
    normally after rolling back; a real update ends in kexec). Raises UpdateError after a
    complete rollback, naming the step and the VM."""
    if not req.timeout > 0:
        raise UsageError(f"--timeout {req.timeout:g}: give the seconds each QEMU step may take, more than 0 (default 60)")
    with vmwf.agent_lock(req.vm_root, "update"):
        return asyncio.run(run_interruptible(_Update(req)))


def job(req: UpdateRequest) -> "_Update":
    """An update to run in the caller's event loop (the daemon): ``await job.run()``;
    ``job.step``, ``job.work`` and ``job.held_sessions()`` describe it while it runs."""
    return _Update(req)


#: signals that make an update roll back before the point of no return
ROLLBACK_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def run_interruptible(u: "_Update") -> dict:
    """Run ``u`` so that SIGTERM/SIGINT/SIGHUP cancel it (it then rolls back, once: a second
    signal does not interrupt the rollback). Handlers only in the main thread."""
    task = asyncio.ensure_future(u.run())
    loop = asyncio.get_running_loop()
    installed = []
    if threading.current_thread() is threading.main_thread():
        for sig in ROLLBACK_SIGNALS:
            loop.add_signal_handler(sig, u.interrupt, sig, task)
            installed.append(sig)
    try:
        return await task
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


class _Update:
    def __init__(self, req: UpdateRequest):
        self.req = req
        self.progress = Progress("update", stream=req.progress)
        self.skip = testmode.skipped()
        self.work: list[VmWork] = []
        self.lu = None  # LiveUpdate
        self.manifest_session = None
        self.manifest_fd = -1
        self.kexec_loaded = False
        self.cmdline = ""
        self.step = "preflight"
        self.manifest: mf.Manifest | None = None
        self.kernel_release = ""
        self.journal: journal.Journal | None = None
        #: name of the signal that interrupted this run ("" if none)
        self.interrupted = ""
        self.rolling_back = False
        #: `systemctl kexec` was called: from now on a stop signal is the orderly shutdown
        #: (no rollback); set when it arrives
        self.kexec_requested_ns = 0
        self.shutdown_signal = asyncio.Event()

    def interrupt(self, sig: int, task: asyncio.Future) -> None:
        """A rollback signal arrived: cancel the run once (it then rolls back)."""
        if self.interrupted or self.rolling_back:
            return  # never interrupt the rollback itself
        if self.kexec_requested_ns:
            self.progress.log(f"{signal.Signals(sig).name}: the orderly shutdown of `systemctl kexec` is under way: "
                              "no rollback; systemd's fd store carries the sessions across the kexec")
            self.shutdown_signal.set()
            return
        self.interrupted = signal.Signals(sig).name
        self.progress.log(f"{self.interrupted} received at step {self.step}: rolling back")
        task.cancel()

    def held_sessions(self) -> list[str]:
        """Names of the outgoing LUO sessions this run holds open right now."""
        names = [w.session_name for w in self.work if w.session is not None]
        return names + ([mf.MANIFEST_SESSION] if self.manifest_session is not None else [])

    # -- driver --------------------------------------------------------------------------
    async def run(self) -> dict:
        if self.skip:
            self.progress.log(f"TEST MODE: skipping {', '.join(sorted(self.skip))} ({testmode.SKIP_ENV})")
        # before anything is touched: refuses while an earlier update's journal is unfinished
        self.journal = journal.Journal.begin("update", self.req.journal_path, kernel=str(self.req.kernel),
                                             dry_run=self.req.dry_run)
        try:
            await self._preflight()
            testmode.fault("after-preflight")
            await testmode.pause("after-preflight")
            await self._preserve_ram()
            testmode.fault("after-preserve-ram")
            # flush the page cache while the VMs still run: the sync before the reboot, inside
            # the blackout, then has (almost) nothing left to write, or is skipped
            with self.progress.timed("sync", "(VMs keep running)"):
                await asyncio.to_thread(os.sync)
            await self._quiesce_all()
            testmode.fault("after-quiesce")
            await testmode.pause("after-quiesce")
            self._preserve_vmstate()
            self._write_manifest()
            testmode.fault("after-manifest")
            await testmode.pause("after-manifest")
            if self.req.dry_run:
                self.step = "dry-run"
                if await self._rollback():
                    raise UpdateError("dry-run rollback incomplete", step="dry-run")
                self.journal.finish()
                return self._result("dry-run: everything reversible done, then rolled back")
            if self.req.announce is not None:
                await self.req.announce(self._result("rebooting into the new kernel"))
            if self._kexec_through_systemd():
                self._reboot_checks()
                return await self._systemctl_kexec()  # returns once the orderly shutdown stops us
            self._reboot()  # returns only by raising
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException as exc:
            failing_vm = getattr(exc, "vm", None)
            self.rolling_back = True
            problems = await self._rollback(quiet=self.step == "preflight" and not self.kexec_loaded)
            if not problems:
                self.journal.finish()  # nothing left to undo
            if self.step == "preflight" and not problems and isinstance(exc, LuoAgentError):
                raise  # nothing was touched: the precise error (bad image, QMP, RAM) is the answer
            if isinstance(exc, asyncio.CancelledError) and self.interrupted:
                raise self._update_error(
                    UpdateError(f"interrupted by {self.interrupted}"), failing_vm, problems) from None
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                raise
            raise self._update_error(exc, failing_vm, problems) from exc

    def _update_error(self, exc: BaseException, vm: str | None, problems: list[str]) -> UpdateError:
        cause = str(exc) if isinstance(exc, LuoAgentError) else f"{type(exc).__name__}: {exc}"
        step = getattr(exc, "step", None) or self.step
        where = f"at step {step}" + (f" (VM {vm})" if vm else "")
        if problems:
            tail = ("; ROLLBACK INCOMPLETE: " + "; ".join(problems)
                    + f"; fix what is named, then run `luoagent recover` (journal {self.journal.path})")
        else:
            stopped = [w.name for w in self.work if w.stop_issued]
            tail = "; rolled back: " + (
                f"VMs {', '.join(stopped)} resumed, " if stopped else "no VM was stopped, "
            ) + "sessions released" + (", kexec image unloaded" if "kexec-load" not in self.skip else "")
        err = UpdateError(f"update failed {where}: {cause}{tail}", step=step, vm=vm)
        err.rollback_problems = problems
        return err

    # -- PREFLIGHT -----------------------------------------------------------------------
    async def _preflight(self) -> None:
        with self.progress.timed("preflight"):
            self.kernel_release = kexec.check_image(self.req.kernel, self.req.initrd)
            self._run_doctor_checks()
            targets = discover(self.req.vms, self.req.vm_root)
            self.work = [VmWork(target=t, session_name=mf.vm_session_name(t.name)) for t in targets]
            if self.req.fd_store is not None and "luo" not in self.skip:
                try:
                    self.req.fd_store.check_room(len(self.work) + 1)
                except LuoAgentError as exc:
                    raise UpdateError(str(exc), step="preflight") from None
            if "luo" not in self.skip:
                # only a check: the device is a singleton (systemd and other tools open it
                # too), so it is opened again only for the moment sessions are created
                LiveUpdate.open().close()  # LuoUnavailable / LuoBusy say why not
            # every VM: QMP reachable, RAM preservable; collected so the user sees them all
            results = await asyncio.gather(*(self._inspect(w) for w in self.work), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if len(failed) == 1 or (failed and not all(isinstance(r, LuoAgentError) for r in failed)):
                raise failed[0]  # _inspect already named the VM in the message
            if failed:
                err = UpdateError(
                    f"{len(failed)} VMs cannot be carried across (nothing was touched):\n"
                    + "\n".join(f"  - {r}" for r in failed),
                    step="preflight",
                )
                raise err
            self.cmdline = self.req.cmdline if self.req.cmdline is not None else kexec.current_cmdline()
            verdict = await landing.preflight(
                kernel=self.req.kernel, header_version=self.kernel_release, cmdline=self.cmdline, work=self.work,
                recorded=[(r.name, int(r.pid or 0)) for r in vmwf.list_records(self.req.vm_root)],
                running_image=self.req.running_kernel, allow_unverified=self.req.allow_unverified_kernel,
                allow_loss=self.req.allow_loss, scan_host="other-qemus" not in self.skip,
            )
            for note in verdict.notes:
                self.progress.note(note)
            if "kexec-load" not in self.skip:
                self.journal.record(kexec_loaded=True)
                kexec.load(self.req.kernel, self.req.initrd, self.cmdline)
                self.kexec_loaded = True
            for w in self.work:
                self.progress.note(
                    f"{w.name}: pid {w.target.pid}, {w.status_before}, RAM "
                    + ", ".join(f"{b.id}={b.size >> 20} MiB" for b in w.backends)
                )

    def _run_doctor_checks(self) -> None:
        """The doctor's host checks (kernel, config, command line, /dev/liveupdate, privileges):
        the same verdicts `luoagent doctor` gives, before anything is touched. QEMU is checked
        per running VM instead (its own binary), so the doctor's QEMU probe is skipped."""
        if "luo" in self.skip:
            return  # test mode on a host without LUO: those checks cannot pass here
        failed = [c for c in doctor.gather(with_qemu=False, with_daemon=False) if not c.ok]
        if failed:
            raise UpdateError(
                "this host cannot do a live update (`luoagent doctor` says the same):\n"
                + "\n".join(f"  - {c.name}: {c.detail}" + (f"\n      fix: {c.fix}" if c.fix else "") for c in failed),
                step="preflight",
            )

    async def _inspect(self, w: VmWork) -> None:
        t = w.target
        try:
            if not t.qmp_socket.exists():
                raise QmpUnreachable(
                    f"QMP socket {t.qmp_socket} does not exist; is the VM running? (`luoagent vm list`)"
                )
            pid = procfs.peer_pid(t.qmp_socket)
            if t.pid and t.pid != pid:
                log.warning("update.pid_mismatch", vm=t.name, recorded=t.pid, actual=pid)
            t.pid = pid
            # an adopted VM's binary is what the kernel runs (/proc/PID/exe), never its argv[0];
            # a `vm start` VM's is the one luoagent itself recorded. Either must be root's only.
            binary, argv = qemu_binary.qemu_cmdline(pid)
            t.binary = t.binary or binary
            t.argv = t.argv or argv
            qemu_binary.check_trusted(t.binary)
            try:
                t.uid, t.gid = procfs.identity(pid)  # restore runs it again as exactly this identity
            except OSError as exc:
                raise QmpUnreachable(f"QEMU pid {pid} vanished: {exc}") from None
            w.qmp = await qmp_client.Qmp.connect(t.qmp_socket, timeout=min(self.req.timeout, 10))
            w.status_before = await w.qmp.status()
            if w.status_before in ("inmigrate", "postmigrate", "finish-migrate", "shutdown", "internal-error"):
                raise VmNotPreservable(f"VM is in state {w.status_before!r}; only running or paused VMs can be carried")
            w.backends = await qemu_ram.ram_backends(pid, w.qmp)
            w.qemu_version = await w.qmp.version()
        except LuoAgentError as exc:
            exc.vm = t.name  # type: ignore[attr-defined]
            exc.args = (f"VM {t.name}: {exc}",) + exc.args[1:]
            raise

    # -- PRESERVE_RAM (VMs still running) ------------------------------------------------
    async def _preserve_ram(self) -> None:
        self.step = "preserve-ram"
        self.journal.record(step=self.step)
        with self.progress.timed("preserve-ram", "(VMs keep running; pages are pinned now)"):
            for w in self.work:
                try:
                    for b in w.backends:
                        w.ram_fds.append(procfs.steal_fd(w.target.pid, b.qemu_fd))
                    if "luo" not in self.skip:
                        self.journal.record_session(w.session_name)
                        with LiveUpdate.open() as lu:  # open only while creating the session
                            w.session = lu.create_session(w.session_name)
                        self._keep(w.session)
                        for i, (b, fd) in enumerate(zip(w.backends, w.ram_fds)):
                            t0 = time.monotonic()
                            w.session.preserve(fd, mf.ram_token(i))
                            self.progress.note(f"{w.name}: {b.id} ({b.size >> 20} MiB) preserved in {time.monotonic() - t0:.3f} s")
                except LuoAgentError as exc:
                    exc.vm = w.name  # type: ignore[attr-defined]
                    raise
                await testmode.pause("preserve-ram", w.name)

    def _keep(self, session) -> None:
        """A copy in systemd's fd store (daemon under systemd): a crash of the daemon then
        leaves the session to the next daemon start, which closes it (rollback) and removes it."""
        if self.req.fd_store is not None:
            self.req.fd_store.push(session)

    # -- QUIESCE (parallel) --------------------------------------------------------------
    async def _quiesce_all(self) -> None:
        self.step = "quiesce"
        self.journal.record(step=self.step)
        with self.progress.timed("quiesce", f"({len(self.work)} VMs in parallel: stop + cpr-reboot save to memfd)"):
            # two rounds: every VM's fdset and migration set-up first (its guest still runs),
            # then every stop at once, so that no guest's pause includes another VM's set-up
            for stage in (self._prepare_quiesce, self._stop_and_save):
                results = await asyncio.gather(*(stage(w) for w in self.work), return_exceptions=True)
                for w, r in zip(self.work, results):
                    if isinstance(r, BaseException):
                        if not hasattr(r, "vm"):
                            with contextlib.suppress(Exception):
                                r.vm = w.name  # type: ignore[attr-defined]
                        raise r
            for w in self.work:
                self.progress.note(
                    f"{w.name}: stop→saved {w.quiesce_s * 1000:.1f} ms, vmstate {w.vmstate_size} B "
                    f"({100.0 * w.vmstate_size / max(w.ram_bytes, 1):.3f} % of RAM); "
                    + summary.ram_figures_text(self._figures(w))
                    + f"; RAM sample hashed in {w.sample_s * 1000:.1f} ms "
                    f"({ram_sample.ms_per_gib(w.sample_s, w.ram_bytes):.1f} ms/GiB)"
                )

    async def _prepare_quiesce(self, w: VmWork) -> None:
        q = w.qmp
        try:
            w.vmstate_fd = memfd.create(f"luoagent-vmstate-{w.name}")
            wfd = memfd.reopen(w.vmstate_fd, os.O_WRONLY)  # the fdset's access mode must be exact
            try:
                w.fdset_id = await q.free_fdset(VMSTATE_FDSET_BASE)
                self.journal.record_vm(w.name, qmp_socket=str(w.target.qmp_socket), pid=w.target.pid,
                                       status_before=w.status_before, fdset_id=w.fdset_id)
                await q.add_fd(wfd, w.fdset_id, opaque=f"luoagent vmstate {w.name}")
            finally:
                os.close(wfd)
            w.was_running = (await q.status()) == "running"
            # mode + capability before stop: they do not disturb a running guest, and the
            # blackout then holds only stop + save
            self.journal.record_vm(w.name, was_running=w.was_running, migrate_configured=True)
            await cpr.configure(q, timeout=self.req.timeout)
            w.migrate_configured = True
        except LuoAgentError as exc:
            exc.vm = w.name  # type: ignore[attr-defined]
            raise

    async def _stop_and_save(self, w: VmWork) -> None:
        q = w.qmp
        try:
            self.journal.record_vm(w.name, stop_issued=True)  # fsync'd before the guest stops
            t0 = time.monotonic()
            w.stopped_at_ns = time.time_ns()
            w.stop_issued = True
            await q.stop()
            testmode.fault("quiesce", w.name)
            info = await cpr.save(q, f"file:/dev/fdset/{w.fdset_id}", timeout=self.req.timeout, configured=True,
                                  on_started=lambda: testmode.pause("quiesce-migrating", w.name))
            w.saved_at_ns = time.time_ns()
            w.quiesce_s = time.monotonic() - t0
            w.migrate_info = info
            w.vmstate_size = memfd.size(w.vmstate_fd)
            w.ram_figures = cpr.RamFigures.from_query_migrate(info)  # what QEMU measured, nothing inferred
            # stopped and saved: guest RAM no longer changes until restore verifies this sample
            for b, fd in zip(w.backends, w.ram_fds):
                record, seconds = ram_sample.take(fd, b.size)
                w.samples.append(record)
                w.sample_s += seconds
        except LuoAgentError as exc:
            exc.vm = w.name  # type: ignore[attr-defined]
            raise

    # -- PRESERVE_VMSTATE + MANIFEST -----------------------------------------------------
    def _preserve_vmstate(self) -> None:
        self.step = "preserve-vmstate"
        with self.progress.timed("preserve-vmstate"):
            for w in self.work:
                if w.session is not None:
                    try:
                        w.session.preserve(w.vmstate_fd, mf.VMSTATE_TOKEN)
                    except LuoAgentError as exc:
                        exc.vm = w.name  # type: ignore[attr-defined]
                        raise

    def _write_manifest(self) -> None:
        self.step = "manifest"
        with self.progress.timed("manifest"):
            self.manifest = mf.Manifest(
                created_ns=time.time_ns(),
                kernel_from=os.uname().release,
                kernel_to=str(self.req.kernel.resolve()),
                kernel_to_version=self.kernel_release,
                kernel_cmdline=self.cmdline,
                agent_version=__version__,
                vms=[
                    mf.PreservedVm(
                        name=w.name,
                        binary=w.target.binary,
                        argv=list(w.target.argv),
                        qmp_socket=str(w.target.qmp_socket),
                        ram=[mf.RamRecord(id=b.id, size=b.size, token=mf.ram_token(i),
                                          sample=w.samples[i] if i < len(w.samples) else None)
                             for i, b in enumerate(w.backends)],
                        vmstate=mf.VmstateRecord(token=mf.VMSTATE_TOKEN, size=w.vmstate_size),
                        was_running=w.was_running,
                        stopped_at_ns=w.stopped_at_ns,
                        saved_at_ns=w.saved_at_ns,
                        qemu_version=w.qemu_version,
                        ram_bytes_copied=self._figures(w)["guest_ram_bytes_copied_at_most"],
                        ram_blocks_in_stream_bytes=-1 if w.ram_figures.blocks_bytes is None else w.ram_figures.blocks_bytes,
                        pid=w.target.pid,
                        uid=w.target.uid,
                        gid=w.target.gid,
                    )
                    for w in self.work
                ],
            )
            self.manifest_fd = mf.write_sealed_memfd(self.manifest)
            if "luo" not in self.skip:
                self.journal.record(step=self.step)
                self.journal.record_session(mf.MANIFEST_SESSION)
                with LiveUpdate.open() as lu:  # open only while creating the session
                    self.manifest_session = lu.create_session(mf.MANIFEST_SESSION)
                self._keep(self.manifest_session)
                self.manifest_session.preserve(self.manifest_fd, mf.MANIFEST_TOKEN)

    # -- REBOOT --------------------------------------------------------------------------
    def _kexec_through_systemd(self) -> bool:
        """`systemctl kexec` only when systemd's fd store holds the sessions: the orderly
        shutdown stops every service and kills the rest, so a process holding them itself (the
        CLI, a daemon without a store) would take them down with it; it reboots directly."""
        return self.req.fd_store is not None and getattr(self.req.fd_store, "enabled", False)

    async def _systemctl_kexec(self) -> dict:
        self.step = "kexec-requested"
        t = time.time_ns()
        self.journal.record(step=self.step, kexec_requested_ns=t)
        if self.manifest_session is not None:  # the orderly shutdown's start, for the next boot
            fd = mf.write_kexec_request_memfd(t)
            try:
                self.manifest_session.preserve(fd, mf.KEXEC_REQUEST_TOKEN)
            finally:
                os.close(fd)
        self.kexec_requested_ns = t
        self.progress.note(f"systemctl kexec (preparation took {time.monotonic() - self.progress.started:.3f} s): "
                           "orderly shutdown, then kexec of the loaded image")
        try:
            await asyncio.to_thread(systemctl.kexec)
        except LuoAgentError:
            if self.shutdown_signal.is_set():  # the shutdown is under way after all: never roll back
                self.progress.log("`systemctl kexec` exited non-zero but the orderly shutdown already stops us")
            else:
                self.kexec_requested_ns = 0  # nothing stopped: roll back with systemctl's reason
                raise
        await self.shutdown_signal.wait()
        return self._result("kexec requested through systemctl; the orderly shutdown is under way")

    def _reboot_checks(self) -> None:
        self.step = "reboot"
        if testmode.armed("reboot") and self.kexec_loaded:
            # make the real syscall fail: the kernel refuses LINUX_REBOOT_CMD_KEXEC with no image
            kexec.unload()
            self.kexec_loaded = False
        if testmode.enabled() and (self.kexec_loaded or kexec.loaded_state() is not False):
            # a test switch must never end in a real kexec: the syscall is made only when it
            # cannot succeed (no image loaded), which is what the refused-reboot tests exercise
            raise UpdateError(
                "test mode (--test-mode): a kexec image is loaded, refusing to reboot; "
                "test runs never kexec", step="reboot",
            )

    def _reboot(self) -> None:
        self._reboot_checks()
        result = self._result("rebooting into the new kernel")
        if self.req.announce is not None:
            pass  # announced by run() (the daemon's clients)
        elif self.req.json:
            print(json.dumps(result, indent=1), flush=True)
        else:
            summary.update_summary(result)
        sys.stdout.flush()
        dirty = kexec.dirty_bytes()
        self.progress.note(f"kexec now (preparation took {time.monotonic() - self.progress.started:.3f} s; "
                           + ("nothing dirty since the sync before quiesce, no second sync" if dirty == 0 else
                              f"{'unknown' if dirty is None else dirty} B dirty since the sync before quiesce: syncing again")
                           + ")")
        # sync again only if something became dirty after the first one (or we cannot tell)
        kexec.reboot_kexec(sync=dirty != 0)  # reboot(LINUX_REBOOT_CMD_KEXEC); returns only by raising
        raise RebootRefused("reboot(LINUX_REBOOT_CMD_KEXEC) returned without rebooting")

    # -- ROLLBACK ------------------------------------------------------------------------
    async def _rollback(self, quiet: bool = False) -> list[str]:
        """Undo everything; returns what could not be undone (empty: clean). ``quiet``: only
        connections to close (preflight), no progress line."""
        problems: list[str] = []
        with self.progress.timed("rollback") if not quiet else contextlib.nullcontext():
            results = await asyncio.gather(*(self._resume(w) for w in self.work), return_exceptions=True)
            for w, r in zip(self.work, results):
                if isinstance(r, BaseException):
                    problems.append(f"VM {w.name} may still be stopped: {r}")
            # sessions: closing an outgoing session unpreserves its files (once the copy in
            # systemd's fd store, if any, is removed too)
            for s in [w.session for w in self.work] + [self.manifest_session]:
                if s is not None:
                    try:
                        s.close()
                    except Exception as exc:
                        problems.append(f"closing session {s!r}: {exc}")
            if self.req.fd_store is not None:
                for name in [w.session_name for w in self.work] + [mf.MANIFEST_SESSION]:
                    try:
                        self.req.fd_store.forget(name)
                    except LuoAgentError as exc:
                        problems.append(f"removing session {name} from the fd store: {exc}")
            for w in self.work:
                w.session = None
                for fd in w.ram_fds + ([w.vmstate_fd] if w.vmstate_fd >= 0 else []):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                w.ram_fds = []
                w.vmstate_fd = -1
            self.manifest_session = None
            if self.manifest_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.manifest_fd)
                self.manifest_fd = -1
            if self.lu is not None:
                self.lu.close()
                self.lu = None
            if self.kexec_loaded:
                try:
                    kexec.unload()
                    self.kexec_loaded = False
                except Exception as exc:
                    problems.append(f"unloading the kexec image: {exc}")
            await self._close_qmp()
        return problems

    async def _resume(self, w: VmWork) -> None:
        q = w.qmp
        if q is None:
            return
        if w.stop_issued or w.migrate_configured:
            await cpr.cancel_and_reset(q)
            w.migrate_configured = False
        if w.stop_issued and w.was_running:
            if await q.status() != "running":
                await q.cont()
            status = await q.status()
            if status != "running":
                raise UpdateError(f"VM {w.name} is {status!r} after cont", step="rollback", vm=w.name)
        if w.fdset_id is not None:
            with contextlib.suppress(LuoAgentError):
                await q.execute("remove-fd", {"fdset-id": w.fdset_id})
            w.fdset_id = None

    async def _close_qmp(self) -> None:
        for w in self.work:
            if w.qmp is not None:
                with contextlib.suppress(Exception):
                    await w.qmp.close()
                w.qmp = None

    # -- result --------------------------------------------------------------------------
    def _figures(self, w: VmWork) -> dict:
        """RAM figures as measured by QEMU (see cpr.RamFigures) and the bounds that follow."""
        f = w.ram_figures
        return {
            "ram_pages_written_bytes": f.pages_bytes,
            "zero_pages_written": f.zero_pages,
            "ram_blocks_in_stream_bytes": f.blocks_bytes,
            "qemu_stream_bytes": f.qemu_stream_bytes,
            "guest_ram_bytes_copied_at_most": f.guest_ram_copied_at_most(w.vmstate_size),
            "no_guest_ram_block_in_stream": f.no_guest_block_migrated([b.size for b in w.backends]),
        }

    def _result(self, status: str) -> dict:
        return {
            "ok": True,
            "status": status,
            "dry_run": self.req.dry_run,
            "kexec_via": "systemctl kexec" if self._kexec_through_systemd() else "reboot(LINUX_REBOOT_CMD_KEXEC)",
            "kexec_requested_ns": self.kexec_requested_ns or None,
            "kernel": str(self.req.kernel),
            "kernel_version": self.kernel_release,
            "cmdline": self.cmdline,
            "skipped": sorted(self.skip),
            "phases": self.progress.steps,
            "vms": [
                {
                    "name": w.name,
                    "pid": w.target.pid,
                    "uid": w.target.uid,
                    "gid": w.target.gid,
                    "binary": w.target.binary,
                    "session": w.session_name,
                    "was_running": w.was_running,
                    "ram_bytes": w.ram_bytes,
                    "ram_backends": [dataclasses.asdict(b) for b in w.backends],
                    "vmstate_bytes": w.vmstate_size,
                    "vmstate_percent_of_ram": round(100.0 * w.vmstate_size / max(w.ram_bytes, 1), 4),
                    **self._figures(w),
                    "quiesce_seconds": round(w.quiesce_s, 4),
                    "ram_sample_ms_per_gib": round(ram_sample.ms_per_gib(w.sample_s, w.ram_bytes), 3),
                    "stopped_at_ns": w.stopped_at_ns,
                }
                for w in self.work
            ],
        }
