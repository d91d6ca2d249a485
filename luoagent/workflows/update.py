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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import __version__, memfd
from luoagent import manifest as mf
from luoagent import testmode
from luoagent.adapters import kexec, procfs
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
from luoagent.workflows import doctor, landing, ram_sample, summary
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
    result = update(req)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        summary.update_summary(result)
    return 0


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


@dataclass
class VmTarget:
    """A running QEMU to carry across: how to reach it and how to start it again."""

    name: str
    qmp_socket: Path
    pid: int = 0
    binary: str = ""
    argv: list[str] = field(default_factory=list)
    adopted: bool = False


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
    guest_ram_bytes_copied: int = 0
    other_ram_bytes_copied: int = 0
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
    return asyncio.run(_Update(req).run())


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

    # -- driver --------------------------------------------------------------------------
    async def run(self) -> dict:
        if self.skip:
            self.progress.log(f"TEST MODE: skipping {', '.join(sorted(self.skip))} ({testmode.SKIP_ENV})")
        try:
            await self._preflight()
            testmode.fault("after-preflight")
            await self._preserve_ram()
            testmode.fault("after-preserve-ram")
            await self._quiesce_all()
            testmode.fault("after-quiesce")
            self._preserve_vmstate()
            self._write_manifest()
            testmode.fault("after-manifest")
            if self.req.dry_run:
                self.step = "dry-run"
                await self._rollback()
                return self._result("dry-run: everything reversible done, then rolled back")
            self._reboot()  # returns only by raising
            raise AssertionError("unreachable")  # pragma: no cover
        except BaseException as exc:
            failing_vm = getattr(exc, "vm", None)
            problems = await self._rollback(quiet=self.step == "preflight" and not self.kexec_loaded)
            if self.step == "preflight" and not problems and isinstance(exc, LuoAgentError):
                raise  # nothing was touched: the precise error (bad image, QMP, RAM) is the answer
            if isinstance(exc, (KeyboardInterrupt, asyncio.CancelledError)):
                raise
            raise self._update_error(exc, failing_vm, problems) from exc

    def _update_error(self, exc: BaseException, vm: str | None, problems: list[str]) -> UpdateError:
        cause = str(exc) if isinstance(exc, LuoAgentError) else f"{type(exc).__name__}: {exc}"
        step = getattr(exc, "step", None) or self.step
        where = f"at step {step}" + (f" (VM {vm})" if vm else "")
        if problems:
            tail = "; ROLLBACK INCOMPLETE: " + "; ".join(problems)
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
            if "luo" not in self.skip:
                self.lu = LiveUpdate.open()  # LuoUnavailable / LuoBusy say why not
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
        failed = [c for c in doctor.gather(with_qemu=False) if not c.ok]
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
            binary, argv = qemu_binary.qemu_cmdline(pid)
            t.binary = t.binary or binary
            t.argv = t.argv or argv
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
        with self.progress.timed("preserve-ram", "(VMs keep running; pages are pinned now)"):
            for w in self.work:
                try:
                    for b in w.backends:
                        w.ram_fds.append(procfs.steal_fd(w.target.pid, b.qemu_fd))
                    if self.lu is not None:
                        w.session = self.lu.create_session(w.session_name)
                        for i, (b, fd) in enumerate(zip(w.backends, w.ram_fds)):
                            t0 = time.monotonic()
                            w.session.preserve(fd, mf.ram_token(i))
                            self.progress.note(f"{w.name}: {b.id} ({b.size >> 20} MiB) preserved in {time.monotonic() - t0:.3f} s")
                except LuoAgentError as exc:
                    exc.vm = w.name  # type: ignore[attr-defined]
                    raise

    # -- QUIESCE (parallel) --------------------------------------------------------------
    async def _quiesce_all(self) -> None:
        self.step = "quiesce"
        with self.progress.timed("quiesce", f"({len(self.work)} VMs in parallel: stop + cpr-reboot save to memfd)"):
            results = await asyncio.gather(*(self._quiesce(w) for w in self.work), return_exceptions=True)
            for w, r in zip(self.work, results):
                if isinstance(r, BaseException):
                    if not hasattr(r, "vm"):
                        with contextlib.suppress(Exception):
                            r.vm = w.name  # type: ignore[attr-defined]
                    raise r
            for w in self.work:
                self.progress.note(
                    f"{w.name}: stop→saved {w.quiesce_s * 1000:.1f} ms, vmstate {w.vmstate_size} B "
                    f"({100.0 * w.vmstate_size / max(w.ram_bytes, 1):.3f} % of RAM), guest RAM copied "
                    f"{w.guest_ram_bytes_copied} B; RAM sample hashed in {w.sample_s * 1000:.1f} ms "
                    f"({ram_sample.ms_per_gib(w.sample_s, w.ram_bytes):.1f} ms/GiB)"
                )

    async def _quiesce(self, w: VmWork) -> None:
        q = w.qmp
        try:
            w.vmstate_fd = memfd.create(f"luoagent-vmstate-{w.name}")
            wfd = memfd.reopen(w.vmstate_fd, os.O_WRONLY)  # the fdset's access mode must be exact
            try:
                w.fdset_id = await q.free_fdset(VMSTATE_FDSET_BASE)
                await q.add_fd(wfd, w.fdset_id, opaque=f"luoagent vmstate {w.name}")
            finally:
                os.close(wfd)
            blocks = await qemu_ram.ramblocks(q)
            w.was_running = (await q.status()) == "running"
            # mode + capability before stop: they do not disturb a running guest, and the
            # blackout then holds only stop + save
            await cpr.configure(q, timeout=self.req.timeout)
            w.migrate_configured = True
            t0 = time.monotonic()
            w.stopped_at_ns = time.time_ns()
            w.stop_issued = True
            await q.stop()
            testmode.fault("quiesce", w.name)
            info = await cpr.save(q, f"file:/dev/fdset/{w.fdset_id}", timeout=self.req.timeout, configured=True)
            w.saved_at_ns = time.time_ns()
            w.quiesce_s = time.monotonic() - t0
            w.migrate_info = info
            w.vmstate_size = memfd.size(w.vmstate_fd)
            # stopped and saved: guest RAM no longer changes until restore verifies this sample
            for b, fd in zip(w.backends, w.ram_fds):
                record, seconds = ram_sample.take(fd, b.size)
                w.samples.append(record)
                w.sample_s += seconds
            ram = info.get("ram", {})
            backend_ids = {b.id for b in w.backends}
            other = sum(used for name, used in blocks.items() if name not in backend_ids)
            # QEMU's ram.total counts every RAM block it migrates; what exceeds the non-guest
            # blocks (firmware, ROMs) is guest RAM that went into the stream
            w.guest_ram_bytes_copied = max(0, int(ram.get("total", 0)) - other)
            w.other_ram_bytes_copied = int(ram.get("normal-bytes", 0))
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
                        ram_bytes_copied=w.guest_ram_bytes_copied,
                        pid=w.target.pid,
                    )
                    for w in self.work
                ],
            )
            self.manifest_fd = mf.write_sealed_memfd(self.manifest)
            if self.lu is not None:
                self.manifest_session = self.lu.create_session(mf.MANIFEST_SESSION)
                self.manifest_session.preserve(self.manifest_fd, mf.MANIFEST_TOKEN)

    # -- REBOOT --------------------------------------------------------------------------
    def _reboot(self) -> None:
        self.step = "reboot"
        if testmode.armed("reboot") and self.kexec_loaded:
            # make the real syscall fail: the kernel refuses LINUX_REBOOT_CMD_KEXEC with no image
            kexec.unload()
            self.kexec_loaded = False
        if testmode.enabled() and kexec.loaded():
            # a test switch must never end in a real kexec: the syscall is made only when it
            # cannot succeed (no image loaded), which is what the refused-reboot tests exercise
            raise UpdateError(
                "test mode (--test-mode): a kexec image is loaded, refusing to reboot; "
                "test runs never kexec", step="reboot",
            )
        result = self._result("rebooting into the new kernel")
        if self.req.json:
            print(json.dumps(result, indent=1), flush=True)
        else:
            summary.update_summary(result)
        sys.stdout.flush()
        self.progress.note(f"kexec now (preparation took {time.monotonic() - self.progress.started:.3f} s)")
        kexec.reboot_kexec()  # sync + reboot(LINUX_REBOOT_CMD_KEXEC); returns only by raising
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
            # sessions: closing an outgoing session unpreserves its files
            for s in [w.session for w in self.work] + [self.manifest_session]:
                if s is not None:
                    try:
                        s.close()
                    except Exception as exc:
                        problems.append(f"closing session {s!r}: {exc}")
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
    def _result(self, status: str) -> dict:
        return {
            "ok": True,
            "status": status,
            "dry_run": self.req.dry_run,
            "kernel": str(self.req.kernel),
            "kernel_version": self.kernel_release,
            "cmdline": self.cmdline,
            "skipped": sorted(self.skip),
            "phases": self.progress.steps,
            "vms": [
                {
                    "name": w.name,
                    "pid": w.target.pid,
                    "session": w.session_name,
                    "was_running": w.was_running,
                    "ram_bytes": w.ram_bytes,
                    "ram_backends": [dataclasses.asdict(b) for b in w.backends],
                    "vmstate_bytes": w.vmstate_size,
                    "vmstate_percent_of_ram": round(100.0 * w.vmstate_size / max(w.ram_bytes, 1), 4),
                    "guest_ram_bytes_copied": w.guest_ram_bytes_copied,
                    "firmware_ram_bytes_copied": w.other_ram_bytes_copied,
                    "quiesce_seconds": round(w.quiesce_s, 4),
                    "ram_sample_ms_per_gib": round(ram_sample.ms_per_gib(w.sample_s, w.ram_bytes), 3),
                    "stopped_at_ns": w.stopped_at_ns,
                }
                for w in self.work
            ],
        }
