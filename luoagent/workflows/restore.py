"""Workflow `luoagent restore`: after kexec, read the manifest from LUO, retrieve each VM's RAM
and vmstate memfds, start QEMU on them with -incoming defer, load, resume, finish the session.

A VM that cannot be restored loses nothing: its RAM and vmstate are written out as a standard
cpr-reboot image (RAM files + vmstate file + restore.json) that a plain QEMU loads, and
`luoagent restore --from-rescue DIR` retries it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import manifest as mf
from luoagent import memfd, testmode
from luoagent.adapters import cpr, private_files, procfs, qemu_binary, qemu_ram, qmp_client, systemctl
from luoagent.errors import (
    LuoAgentError,
    LuoBusy,
    ManifestCorrupt,
    ManifestMissing,
    QmpCommandFailed,
    RestoreError,
    SessionAlreadyRetrieved,
    SessionNotFound,
    TokenNotFound,
    UsageError,
)
from luoagent.log import get_logger
from luoagent.report import Progress
from luoagent.luo import LiveUpdate
from luoagent.workflows import ram_sample, restore_journal, summary
from luoagent.workflows import vm as vmwf

log = get_logger(__name__)

#: on disk, not tmpfs: a rescue image must survive this boot too
DEFAULT_RESCUE_DIR = Path("/var/lib/luoagent/rescue")
INCOMING_FDSET = 0x4C56


def boot_clock_ns() -> int:
    """CLOCK_BOOTTIME: the clock the kernel's own boot messages count from, so the restore's
    steps line up with the kernel's in one time line (`*_boot_ns` timings)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def configure(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--qemu", metavar="PATH", help="QEMU binary (default: the one recorded, else PATH)")
    parser.add_argument(
        "--vm-root", "--root", dest="vm_root", default=None,
        help=f"the VM root: directory holding one directory per VM (default $LUOAGENT_VM_ROOT or {vmwf.DEFAULT_VM_ROOT})",
    )
    parser.add_argument(
        "--rescue-dir",
        default=str(DEFAULT_RESCUE_DIR),
        help=f"where a VM that cannot be restored is written as a cpr-reboot image (default {DEFAULT_RESCUE_DIR})",
    )
    parser.add_argument(
        "--from-rescue", metavar="DIR", help="restore one VM from a rescue image written by an earlier restore"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per QEMU step (default 60)")


def run(args) -> int:
    opts = RestoreOptions(
        qemu=args.qemu,
        vm_root=vmwf.vm_root(args.vm_root),  # same rule as `luoagent vm`
        rescue_dir=Path(args.rescue_dir),
        timeout=args.timeout,
    )
    if args.from_rescue:
        result = restore_from_rescue(Path(args.from_rescue), opts)
    else:
        result = _via_daemon(opts)
        if result is None:
            result = restore(opts)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        summary.restore_summary(result)
    return 0 if result["ok"] else 1


def _via_daemon(opts: "RestoreOptions") -> dict | None:
    """Run the restore in the luoagent daemon if one serves the control socket (it holds the
    sessions, keeps them in systemd's fd store, and finishes the job if this command dies);
    a restore it already runs (the one at boot) is followed. None when no daemon runs."""
    from luoagent.errors import DaemonNotRunning
    from luoagent.workflows import client

    _check_timeout(opts)
    request = {"qemu": opts.qemu, "vm_root": str(opts.vm_root.absolute()),
               "rescue_dir": str(opts.rescue_dir.absolute()), "timeout": opts.timeout}
    try:
        return client.call("restore", request, label="restore")
    except DaemonNotRunning as exc:
        Progress("restore").log(f"{exc}: restoring in this process; if it dies, RAM not yet handed to a "
                                "QEMU is lost (the daemon under systemd keeps it in the fd store)")
        return None


@dataclass
class RestoreOptions:
    qemu: str | None = None
    vm_root: Path = vmwf.DEFAULT_VM_ROOT
    rescue_dir: Path = DEFAULT_RESCUE_DIR
    timeout: float = 60.0
    #: progress lines go here (stderr by default; luoagent.report decides human or JSON)
    progress: object = None

    @property
    def reporter(self) -> Progress:
        return Progress("restore", stream=self.progress)


@dataclass
class VmOutcome:
    name: str
    ok: bool = False
    pid: int = 0
    status: str = ""
    error: str = ""
    rescue: str = ""
    retry: str = ""
    blackout_ns: int = 0
    vmstate_bytes: int = 0
    ram_bytes: int = 0
    ram_bytes_copied: int = 0  # upper bound, from what the source QEMU measured (manifest)
    ram_blocks_in_stream_bytes: int = -1
    no_guest_ram_block_in_stream: bool | None = None
    was_running: bool = False
    uid: int = 0
    gid: int = 0
    #: the guest ran in the new QEMU (cont answered, or it resumed by itself): from here on it
    #: is never started again, killed or written as a rescue image (its disks moved on)
    resumed: bool = False
    #: the systemd scope its QEMU runs in ("" without systemd)
    unit: str = ""
    timings: dict = field(default_factory=dict)
    blackout_parts: dict = field(default_factory=dict)


def retrieve_manifest(lu) -> tuple[object, mf.Manifest]:
    """(incoming manifest session, manifest); ManifestMissing when this boot has none."""
    try:
        session = lu.retrieve_session(mf.MANIFEST_SESSION)
    except SessionNotFound:
        raise ManifestMissing(
            f"nothing to restore: no LUO session {mf.MANIFEST_SESSION!r} came across the last kexec "
            "(this boot was not started by `luoagent update`, that update was rolled back, or an "
            "earlier `luoagent restore` in this boot already finished it: see `luoagent vm list`)"
        ) from None
    except SessionAlreadyRetrieved:
        raise ManifestMissing(
            f"the manifest session {mf.MANIFEST_SESSION!r} was already retrieved in this boot (by an "
            "earlier `luoagent restore`); see `luoagent vm list` and any rescue images in "
            f"{DEFAULT_RESCUE_DIR}"
        ) from None
    try:
        fd = session.retrieve(mf.MANIFEST_TOKEN)
    except TokenNotFound:
        session.close()
        raise ManifestCorrupt(
            f"session {mf.MANIFEST_SESSION!r} holds no manifest (token {mf.MANIFEST_TOKEN}); it was not written by luoagent"
        ) from None
    try:
        return session, mf.read_memfd(fd)
    except LuoAgentError as exc:
        # Keep the raw document: once this session closes it is gone, while the VM sessions it
        # describes stay retrievable for the rest of this boot (by a luoagent that reads it).
        saved = DEFAULT_RESCUE_DIR / f"manifest-{time.time_ns()}.json"
        try:
            private_files.makedirs(DEFAULT_RESCUE_DIR)  # VM argv may hold secrets: 0700 / 0600
            private_files.write_bytes(saved, os.pread(fd, mf.MANIFEST_MAX_BYTES, 0))
            exc.args = (f"{exc}; the manifest was saved to {saved}; the VM sessions stay preserved "
                        "until the next reboot",) + exc.args[1:]
        except OSError:
            pass
        session.close()
        raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# argv
# ---------------------------------------------------------------------------------------
def _prepare_paths(argv: list[str], qmp_socket: str) -> None:
    """Recreate the directories (tmpfs /run is empty after kexec) and remove a stale socket."""
    sock = Path(qmp_socket)
    private_files.makedirs(sock.parent)
    try:
        if not stat.S_ISSOCK(os.lstat(sock).st_mode):
            # the manifest names a file that is not a socket: never delete what is not ours
            raise RestoreError(f"QMP socket path {sock} exists and is not a socket; move it away, then retry")
        sock.unlink()
    except FileNotFoundError:
        pass
    for i, a in enumerate(argv[:-1]):
        value = argv[i + 1]
        path = None
        if a in ("-pidfile", "--pidfile", "-D"):
            path = value
        elif a in ("-serial", "--serial") and value.startswith("file:"):
            path = value[len("file:"):]
        if path and path.startswith("/"):
            private_files.makedirs(Path(path).parent)


def qmp_socket_paths(argv: list[str]) -> list[str]:
    """Unix socket paths a QEMU argv serves QMP on: ``-qmp unix:PATH[,...]`` and
    ``-chardev socket,id=ID,path=PATH`` used by ``-mon chardev=ID`` (mode control is the default)."""
    found, chardevs, monitors = [], {}, []
    for opt, value in zip(argv, argv[1:]):
        opt = opt[1:] if opt.startswith("--") else opt
        if opt in ("-qmp", "-qmp-pretty") and value.startswith("unix:"):
            found.append(value[len("unix:"):].split(",", 1)[0])
        elif opt == "-chardev" and value.startswith("socket,"):
            keys = dict(kv.split("=", 1) for kv in value.split(",")[1:] if "=" in kv)
            if "id" in keys and "path" in keys:
                chardevs[keys["id"]] = keys["path"]
        elif opt == "-mon":
            keys = dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
            if keys.get("mode", "control") == "control" and "chardev" in keys:
                monitors.append(keys["chardev"])
    return found + [chardevs[m] for m in monitors if m in chardevs]


def _has_qmp_on(argv: list[str], qmp_socket: str) -> bool:
    """Does the argv already serve QMP on exactly this path (compared as paths, not substrings)?"""
    want = os.path.normpath(qmp_socket)
    return any(os.path.normpath(p) == want for p in qmp_socket_paths(argv))


def _binary(vm: mf.PreservedVm, opts: RestoreOptions) -> str:
    """--qemu / $LUOAGENT_QEMU (the operator's choice), else the recorded binary, else PATH;
    the latter two only if root alone can change them (qemu_binary.check_trusted)."""
    if opts.qemu or os.environ.get(qemu_binary.QEMU_ENV):
        return str(qemu_binary.find_qemu(opts.qemu))
    if vm.binary and os.access(vm.binary, os.X_OK) and not Path(vm.binary).name.startswith("ld-"):
        qemu_binary.check_trusted(vm.binary)
        return vm.binary
    found = qemu_binary.find_qemu()
    qemu_binary.check_trusted(found)
    return str(found)


def identity_args(vm: mf.PreservedVm, argv: list[str]) -> list[str]:
    """QEMU options that make the restored QEMU drop to the identity the old one had: it is
    started as root (it must inherit the RAM fds) and switches after opening its files.
    Nothing is added for a root QEMU or an argv that already names a user itself."""
    if vm.uid == 0 and vm.gid == 0:
        return []
    for opt, value in zip(argv, argv[1:]):
        opt = opt[1:] if opt.startswith("--") else opt
        if opt == "-runas" or (opt == "-run-with" and any(kv.startswith("user=") for kv in value.split(","))):
            return []
    return ["-run-with", f"user={vm.uid}:{vm.gid}"]


# ---------------------------------------------------------------------------------------
# one VM
# ---------------------------------------------------------------------------------------
async def start_incoming(
    vm: mf.PreservedVm,
    ram_fds: list[int],
    vmstate_fd: int,
    mem_paths: dict[str, str],
    opts: RestoreOptions,
    out: VmOutcome,
    note=None,
) -> None:
    """Start QEMU on the given RAM, load the vmstate, resume; fills ``out``. ``note(**facts)``
    journals each step before it happens (restore_journal: qemu-starting, qemu-started,
    cont-issued, then resumed or loaded)."""
    note = note or (lambda **facts: None)
    t_start = time.time_ns()
    out.timings["qemu_launch_boot_ns"] = boot_clock_ns()
    binary = _binary(vm, opts)
    argv = qemu_ram.restore_argv(vm.argv, mem_paths)
    argv += identity_args(vm, argv)
    _prepare_paths(argv, vm.qmp_socket)
    vm_dir = opts.vm_root / vm.name
    private_files.makedirs(vm_dir)
    log_path = vm_dir / "qemu.log"
    # `luoagent vm start` records argv without its -qmp; an adopted QEMU's argv has its own
    own_qmp = None if _has_qmp_on(argv, vm.qmp_socket) else vm.qmp_socket
    unit = vmwf.qemu_unit(vm.name)  # under systemd: its own scope, never luoagent.service's cgroup
    out.unit = unit or ""
    note(step="qemu-starting", binary=binary, argv=argv, log=str(log_path), unit=unit or "")
    proc = qemu_binary.launch(binary, argv, pass_fds=ram_fds, qmp_socket=own_qmp, log=log_path, daemon=True,
                              scope_unit=unit)
    out.pid = proc.pid
    try:
        note(step="qemu-started", pid=proc.pid, pid_start=procfs.start_time(proc.pid))
        q = await qmp_client.Qmp.connect(vm.qmp_socket, timeout=opts.timeout, process=proc)
        try:
            out.timings["qemu_up_ns"] = time.time_ns()
            out.timings["qemu_up_boot_ns"] = boot_clock_ns()
            # QEMU drops privileges before it serves QMP: by now it must be who it was
            now = procfs.identity(proc.pid)
            if now != (vm.uid, vm.gid):
                raise RestoreError(f"VM {vm.name}: restored QEMU runs as uid/gid {now[0]}:{now[1]}, "
                                   f"the old one ran as {vm.uid}:{vm.gid}; refusing to resume it")
            out.uid, out.gid = now
            await testmode.pause("restore-after-qemu-start", vm.name)
            rfd = memfd.reopen(vmstate_fd, os.O_RDONLY)  # the fdset's access mode must match the load
            try:
                await q.add_fd(rfd, INCOMING_FDSET, opaque=f"luoagent vmstate {vm.name}")
            finally:
                os.close(rfd)
            testmode.fault("restore-vm", vm.name, RestoreError)
            await cpr.load(q, f"file:/dev/fdset/{INCOMING_FDSET}", timeout=opts.timeout)
            out.timings["incoming_done_ns"] = time.time_ns()
            out.timings["incoming_done_boot_ns"] = boot_clock_ns()
            if vm.was_running and await q.status() != "running":
                note(step="cont-issued")  # from here on this guest may run: never started again
                try:
                    await q.cont()
                except QmpCommandFailed:
                    raise  # QEMU refused: the guest did not run
                except BaseException:
                    out.resumed = True  # no answer: it may run; never start it a second time
                    raise
            out.resumed = vm.was_running
            note(step="resumed" if vm.was_running else "loaded")
            out.status = await q.status()
            out.timings["running_ns"] = time.time_ns()
            out.timings["running_boot_ns"] = boot_clock_ns()
            with contextlib.suppress(LuoAgentError):
                await q.execute("remove-fd", {"fdset-id": INCOMING_FDSET})
            expected = "running" if vm.was_running else "paused"
            if out.status != expected:
                raise RestoreError(f"VM {vm.name} is {out.status!r} after restore, expected {expected!r}")
        finally:
            await q.close()
    except BaseException:
        if not out.resumed:
            qemu_binary.kill_process(proc)
        raise
    out.timings["restore_started_ns"] = t_start
    out.ok = True
    out.blackout_ns = out.timings["running_ns"] - vm.stopped_at_ns
    # where the blackout went, in seconds from `stop` (realtime; after kexec the clock is
    # re-read from the RTC, so the kexec share is good to about a second)
    out.blackout_parts = {
        "save": round((vm.saved_at_ns - vm.stopped_at_ns) / 1e9, 3),
        "kexec_boot_and_agent_start": round((t_start - vm.saved_at_ns) / 1e9, 3),
        "qemu_start": round((out.timings["qemu_up_ns"] - t_start) / 1e9, 3),
        "load_vmstate": round((out.timings["incoming_done_ns"] - out.timings["qemu_up_ns"]) / 1e9, 3),
        "cont": round((out.timings["running_ns"] - out.timings["incoming_done_ns"]) / 1e9, 3),
    }
    # runs `QEMU --version` and writes vm.json: off the event loop, other VMs may still be loading
    try:
        await asyncio.to_thread(register_vm, opts.vm_root, vm, binary, argv, proc.pid, log_path, unit or "")
    except (OSError, LuoAgentError) as exc:
        out.ok = False
        raise RestoreError(
            f"VM {vm.name} runs again (pid {proc.pid}) but could not be recorded in {opts.vm_root} "
            f"({exc}); it is NOT restored again and needs no retry: fix the cause, then manage it "
            f"through its QMP socket {vm.qmp_socket}"
        ) from None


def register_vm(vm_root: Path, vm: mf.PreservedVm, binary: str, argv: list[str], pid: int, log_path: Path,
                unit: str = "") -> None:
    """Record the restored VM in the `luoagent vm` VM root so `luoagent vm list` shows it."""
    vmwf.register_restored(
        name=vm.name,
        pid=pid,
        qmp_socket=vm.qmp_socket,
        binary=binary,
        argv=argv,
        ram=[{"id": r.id, "size": r.size} for r in vm.ram],
        log=str(log_path),
        vm_root=vm_root,
        unit=unit,
    )


def write_rescue(vm: mf.PreservedVm, ram_fds: list[int], vmstate_fd: int, rescue_root: Path) -> Path:
    """Write RAM files + vmstate + restore.json under ``rescue_root/NAME-TIME``; fsync'd."""
    target = rescue_root / f"{vm.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    private_files.mkdir(target)  # guest RAM: 0700, files 0600, from creation on
    need = vm.ram_bytes + vm.vmstate.size
    free = shutil.disk_usage(target).free
    if free < need:
        raise RestoreError(f"rescue dir {target} has {free} bytes free, the image needs {need}")
    ram_files = {}
    for r, fd in zip(vm.ram, ram_fds):
        path = target / f"{r.id}.ram"
        _copy_fd(fd, path, r.size)
        ram_files[r.id] = str(path)
    _copy_fd(vmstate_fd, target / "vmstate", vm.vmstate.size)
    doc = {
        "what": "luoagent rescue image: a cpr-reboot checkpoint (mode cpr-reboot, x-ignore-shared)",
        "how": (
            "start BINARY ARGV (RAM from the .ram files, -incoming defer); over QMP: "
            "migrate-set-parameters mode=cpr-reboot, migrate-set-capabilities x-ignore-shared=on, "
            "migrate-incoming uri=file:DIR/vmstate, then cont — or run `luoagent restore --from-rescue DIR`"
        ),
        "vm": dataclasses.asdict(vm),
        "ram_files": ram_files,
        "vmstate": str(target / "vmstate"),
    }
    private_files.write_text(target / "restore.json", json.dumps(doc, indent=1), fsync=True)
    dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target


async def write_rescue_async(vm: mf.PreservedVm, ram_fds: list[int], vmstate_fd: int, rescue_root: Path) -> Path:
    """write_rescue in a worker thread: copying GiBs must not hold up the event loop, on which
    the other VMs' restores (their `cont`) run."""
    return await asyncio.to_thread(write_rescue, vm, ram_fds, vmstate_fd, rescue_root)


def _copy_fd(src: int, path: Path, size: int) -> None:
    with os.fdopen(private_files.open_new(path), "wb") as f:
        os.ftruncate(f.fileno(), size)
        # only data extents: guest RAM is mostly holes/zero pages, and the file stays sparse
        for start, end in memfd.data_extents(src, size):
            pos = start
            while pos < end:
                chunk = os.pread(src, min(end - pos, 4 << 20), pos)
                if not chunk:
                    raise RestoreError(f"short read copying into {path} at offset {pos}")
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(f.fileno(), view, pos)
                    view = view[n:]
                    pos += n
        f.flush()
        os.fsync(f.fileno())


def restore_from_rescue(directory: Path, opts: RestoreOptions) -> dict:
    """Restore one VM from a rescue image (RAM stays in the files, share=on)."""
    _check_timeout(opts)
    with vmwf.agent_lock(opts.vm_root, "restore"):
        return _restore_from_rescue(directory, opts)


def _restore_from_rescue(directory: Path, opts: RestoreOptions) -> dict:
    meta_path = directory / "restore.json"
    try:
        meta = json.loads(meta_path.read_text())
        vm = mf.Manifest.from_dict(
            {"schema": "1.0", "created_ns": 0, "kernel_from": "", "kernel_to": "", "kernel_cmdline": "",
             "agent_version": "", "vms": [meta["vm"]]}
        ).vms[0]
    except (OSError, ValueError, KeyError, TypeError, LuoAgentError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RestoreError(f"{directory} is not a luoagent rescue image ({meta_path}: {why}); give --from-rescue "
                           "the directory a failed `luoagent restore` printed (restore.json, vmstate, *.ram)") from None
    _check_rescue_owner(directory)
    # the files are named by the image's layout, never taken from restore.json: a path in
    # it could point anywhere
    ram_files = {r.id: str(directory / f"{r.id}.ram") for r in vm.ram}
    out = VmOutcome(name=vm.name, was_running=vm.was_running, vmstate_bytes=vm.vmstate.size, ram_bytes=vm.ram_bytes)
    try:
        vfd = os.open(directory / "vmstate", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise RestoreError(f"rescue image {directory}: cannot open vmstate: {exc.strerror}") from None
    try:
        asyncio.run(start_incoming(vm, [], vfd, ram_files, opts, out))
    except LuoAgentError as exc:
        if not out.resumed:
            raise
        out.error = str(exc)  # the guest runs from the rescue image: reported, never retried
        out.retry = f"none: the VM runs (pid {out.pid}); starting it again would run it twice"
    finally:
        os.close(vfd)
    out.ram_bytes_copied = vm.ram_bytes_copied
    return {"ok": out.ok, "vms": [out.__dict__], "from_rescue": str(directory)}


def _check_rescue_owner(directory: Path) -> None:
    """A rescue image is run as a VM: only one that this user owns and nobody else can change."""
    for p in [directory, *(directory / n for n in os.listdir(directory))]:
        st = os.lstat(p)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
            raise RestoreError(
                f"rescue image {directory}: {p} is owned by uid {st.st_uid} with mode "
                f"{stat.S_IMODE(st.st_mode):o}{' (a symlink)' if stat.S_ISLNK(st.st_mode) else ''}; "
                f"only an image owned by uid {os.geteuid()} and writable by nobody else is restored")


# ---------------------------------------------------------------------------------------
# where the incoming sessions come from
# ---------------------------------------------------------------------------------------
#: how long to wait for /dev/liveupdate while someone else (PID 1 at boot, systemd-shutdown)
#: has it open for a moment
DEVICE_BUSY_WAIT = 5.0


def open_device() -> LiveUpdate:
    """Open /dev/liveupdate, waiting up to DEVICE_BUSY_WAIT while it is busy (LuoBusy):
    systemd opens it briefly too, e.g. at boot, just when the daemon starts."""
    deadline = time.monotonic() + DEVICE_BUSY_WAIT
    while True:
        try:
            return LiveUpdate.open()
        except LuoBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class SessionSource:
    """The incoming sessions of a restore: those systemd's fd store handed back (by name),
    else retrieved from /dev/liveupdate, opened only for that retrieve (PID 1 and
    systemd-shutdown open it too). A session retrieved from the device goes into the fd store
    at once (when the daemon has one), so a crash from then on keeps it."""

    def __init__(self, handed: dict | None = None, fd_store=None):
        self.handed = dict(handed or {})
        self.fd_store = fd_store
        self.held: dict[str, object] = {}
        # VMs retrieve in worker threads: one at a time opens the singleton /dev/liveupdate and
        # hands the session to the fd store (_device); the dicts change under _lock, which is
        # never held while waiting for the device (the event loop takes it too)
        self._device = threading.Lock()
        self._lock = threading.Lock()

    def retrieve_session(self, name: str):
        with self._lock:
            if name in self.held:
                return self.held[name]
            session = self.handed.pop(name, None)
        if session is None:
            with self._device:
                with open_device() as lu:
                    session = lu.retrieve_session(name)
                if self.fd_store is not None:
                    try:
                        self.fd_store.push(session)
                    except LuoAgentError as exc:  # the restore goes on; only crash safety is lost
                        log.warning("restore.fd_store_push_failed", session=name, error=str(exc))
        with self._lock:
            self.held[name] = session
        return session

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self.held or name in self.handed

    def release(self, name: str) -> None:
        """Close the session (an incoming session is finished by that) and drop its copy in
        the fd store: once both are closed the kernel lets it go."""
        with self._lock:
            session = self.held.pop(name, None) or self.handed.pop(name, None)
        if session is not None:
            session.close()
        if self.fd_store is not None:
            self.fd_store.forget(name)

    def names(self) -> list[str]:
        """Every session this source holds (retrieved, or handed back and not yet used)."""
        with self._lock:
            return sorted({*self.held, *self.handed})


# ---------------------------------------------------------------------------------------
# the restore
# ---------------------------------------------------------------------------------------
def restore(opts: RestoreOptions | None = None) -> dict:
    opts = opts or RestoreOptions()
    _check_timeout(opts)
    with vmwf.agent_lock(opts.vm_root, "restore"):
        return asyncio.run(job(opts).run())


def _check_timeout(opts: RestoreOptions) -> None:
    if not opts.timeout > 0:
        raise UsageError(f"--timeout {opts.timeout:g}: give the seconds each QEMU step may take, more than 0 (default 60)")


def job(opts: RestoreOptions, source: SessionSource | None = None, journal_path: Path | None = None) -> "RestoreJob":
    """A restore to run in the caller's event loop (``await job.run()``); the daemon's boot
    restore gives it the sessions systemd handed back and its fd store."""
    return RestoreJob(opts, source or SessionSource(), journal_path)


def _check_ram_sample(vm: mf.PreservedVm, ram_fds: list[int], opts: RestoreOptions, out: VmOutcome) -> None:
    """Before QEMU starts: the pages hashed after the VM stopped must hash the same now."""
    seconds = 0.0
    for r, fd in zip(vm.ram, ram_fds):
        if r.sample is None:
            continue  # written by a luoagent before schema 1.1
        if testmode.armed("corrupt-ram-sample", vm.name) and r.sample["offsets"]:
            # test only: really change one sampled byte of the retrieved memfd
            off = int(r.sample["offsets"][len(r.sample["offsets"]) // 2]) + 123
            os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 0xFF]), off)
        seconds += ram_sample.verify(r.id, fd, r.sample)
    out.timings["ram_sample_ms_per_gib"] = round(ram_sample.ms_per_gib(seconds, vm.ram_bytes), 3)
    opts.reporter.note(f"{vm.name}: RAM sample verified in {seconds * 1000:.1f} ms "
                       f"({out.timings['ram_sample_ms_per_gib']:.1f} ms/GiB)")


def _kexec_request(msession) -> int | None:
    """When the old boot called `systemctl kexec` (its token in the manifest session), if it did."""
    try:
        fd = msession.retrieve(mf.KEXEC_REQUEST_TOKEN)
    except LuoAgentError:
        return None  # the direct reboot syscall, or a luoagent that did not record it
    try:
        return mf.read_kexec_request(fd)
    finally:
        os.close(fd)


def _boot_started_ns() -> int:
    """Realtime at which this kernel started (now minus CLOCK_BOOTTIME; the clock is set from
    the RTC at boot, so good to about a second)."""
    return time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def split_kexec_share(out: VmOutcome, vm: mf.PreservedVm, requested_ns: int | None, boot_ns: int) -> None:
    """Split the blackout's "kexec_boot_and_agent_start" at the `systemctl kexec` call and at
    this kernel's start: saved → call, orderly shutdown + kexec, boot + agent start."""
    parts = out.blackout_parts
    if not requested_ns or "kexec_boot_and_agent_start" not in parts or not vm.saved_at_ns:
        return
    start_ns = out.timings.get("restore_started_ns") or 0
    split = {
        "until_systemctl_kexec": round((requested_ns - vm.saved_at_ns) / 1e9, 3),
        "orderly_shutdown_and_kexec": round((boot_ns - requested_ns) / 1e9, 3),
        "boot_and_agent_start": round((start_ns - boot_ns) / 1e9, 3),
    }
    out.blackout_parts = {k: v for k, v in parts.items() if k == "save"}
    out.blackout_parts.update(split)
    out.blackout_parts.update({k: v for k, v in parts.items() if k not in ("save", "kexec_boot_and_agent_start")})


class RestoreJob:
    """The restore state machine: manifest → per VM (in parallel, each as soon as its own
    memfds are retrieved) retrieve → QEMU → load → cont → finish → release → manifest released.
    Journaled (restore_journal) so that a restarted daemon finishes an interrupted restore
    with every VM running exactly once."""

    def __init__(self, opts: RestoreOptions, source: SessionSource, journal_path: Path | None = None):
        self.opts = opts
        self.source = source
        self.journal_path = journal_path
        self.journal: restore_journal.RestoreJournal | None = None
        self.step = "manifest"
        self.manifest: mf.Manifest | None = None
        self.outcomes: dict[str, VmOutcome] = {}
        self.rolling_back = False  # the daemon's status asks; a restore never rolls back
        #: realtime of the old boot's `systemctl kexec` call (manifest session), or None
        self.kexec_requested_ns: int | None = None

    # -- what the daemon's status shows ---------------------------------------------------
    def held_sessions(self) -> list[str]:
        """Names of the incoming LUO sessions this restore holds open right now."""
        return self.source.names()

    def status_vms(self) -> list[dict]:
        return [{"name": o.name, "pid": o.pid, "status": o.status, "ok": o.ok, "resumed": o.resumed,
                 "unit": o.unit or None, "action": o.timings.get("action", ""), "error": o.error}
                for o in self.outcomes.values()]

    def interrupt(self, sig: int, task: asyncio.Future) -> None:
        """A stop signal: a restore is never rolled back (the guests that run keep running,
        the journal and the fd store let the next daemon finish); it just stops here."""
        self.opts.reporter.log(f"signal {sig}: restore stops at step {self.step}; the next daemon start finishes it")
        task.cancel()

    # -- driver ---------------------------------------------------------------------------
    async def run(self) -> dict:
        t0 = time.monotonic()
        progress = self.opts.reporter
        clock = {"luo_open_boot_ns": boot_clock_ns()}  # the agent's first LUO call
        try:
            msession, manifest = retrieve_manifest(self.source)
            clock["manifest_retrieved_boot_ns"] = boot_clock_ns()
        except LuoAgentError:
            if self.source.has(mf.MANIFEST_SESSION):
                self.source.release(mf.MANIFEST_SESSION)
            raise
        self.kexec_requested_ns = _kexec_request(msession)
        del msession  # held by the source until released, last
        self.manifest = manifest
        self.journal = restore_journal.RestoreJournal.open(self.journal_path, kernel_from=manifest.kernel_from)
        if self.journal.previous is not None:
            steps = ", ".join(f"{n} {e.get('step')}" for n, e in sorted(self.journal.previous["vms"].items()))
            progress.log(f"resuming the restore of pid {self.journal.previous.get('pid')} (this boot): "
                         + (steps or "no VM was started yet"))
        self.journal.record(step="vms", vm_names=[v.name for v in manifest.vms])
        progress.log(f"manifest: schema {manifest.schema[0]}.{manifest.schema[1]}, {len(manifest.vms)} VM(s), "
                     f"written by kernel {manifest.kernel_from}, now on {os.uname().release}")
        await testmode.pause("restore-after-manifest")
        self.step = "vms"
        outcomes = list(await asyncio.gather(*(self._one(vm) for vm in manifest.vms)))
        # the manifest session last: while VMs are still being handled it documents them
        self.step = "finish"
        self.source.release(mf.MANIFEST_SESSION)
        self.journal.finish()
        self.step = "done"
        return {
            "ok": all(o.ok for o in outcomes),
            "kernel_from": manifest.kernel_from,
            "kernel_now": os.uname().release,
            "seconds": round(time.monotonic() - t0, 4),
            "resumed_restore": self.journal.previous is not None,
            "kexec_requested_ns": self.kexec_requested_ns,
            "boot_started_ns": _boot_started_ns(),
            "boot_clock_ns": clock,
            "vms": [o.__dict__ for o in outcomes],
        }

    async def _one(self, vm: mf.PreservedVm) -> VmOutcome:
        out = VmOutcome(
            name=vm.name,
            was_running=vm.was_running,
            vmstate_bytes=vm.vmstate.size,
            ram_bytes=vm.ram_bytes,
            ram_bytes_copied=vm.ram_bytes_copied,
            ram_blocks_in_stream_bytes=vm.ram_blocks_in_stream_bytes,
            no_guest_ram_block_in_stream=(None if vm.ram_blocks_in_stream_bytes < 0
                                          else vm.ram_blocks_in_stream_bytes < min(r.size for r in vm.ram)),
        )
        self.outcomes[vm.name] = out
        entry = self.journal.entry(vm.name)
        action = restore_journal.next_action(entry)
        if action == restore_journal.RESTART:
            action = await self._stop_leftover(vm, entry or {})
        out.timings["action"] = action
        if action == restore_journal.CLOSE:
            out.ok, out.pid, out.status = bool(entry.get("ok")), int(entry.get("pid") or 0), entry.get("status", "")
            out.error, out.resumed = entry.get("error", ""), entry.get("step") == "finished"
            self.source.release(vm.session)
            return out
        if action == restore_journal.ADOPT:
            await self._adopt(vm, entry or {}, out)
            return out
        return await self._start(vm, out)

    def _note(self, name: str):
        return lambda **facts: self.journal.record_vm(name, **facts)

    async def _start(self, vm: mf.PreservedVm, out: VmOutcome) -> VmOutcome:
        note = self._note(vm.name)
        ram_fds: list[int] = []
        vmstate_fd = -1
        released = False
        try:
            note(step="retrieving")
            out.timings["retrieve_boot_ns"] = boot_clock_ns()
            # retrieve and sample check in a worker thread: the kernel's retrieve grows with RAM
            # and no other VM's retrieve or QEMU start may wait for it (the ioctl, pread and
            # hashing release the GIL)
            session, ram_fds, vmstate_fd = await asyncio.to_thread(self._retrieve, vm)
            out.timings["retrieved_boot_ns"] = boot_clock_ns()
            await testmode.pause("restore-after-retrieve", vm.name)
            await asyncio.to_thread(_check_ram_sample, vm, ram_fds, self.opts, out)
            mem_paths = {r.id: f"/proc/self/fd/{fd}" for r, fd in zip(vm.ram, ram_fds)}
            await start_incoming(vm, ram_fds, vmstate_fd, mem_paths, self.opts, out, note=note)
            split_kexec_share(out, vm, self.kexec_requested_ns, _boot_started_ns())
            self.opts.reporter.log(f"{vm.name}: {out.status} (pid {out.pid}), blackout {out.blackout_ns / 1e9:.3f} s = "
                                   + " + ".join(f"{k} {s:.3f}" for k, s in out.blackout_parts.items()))
            await testmode.pause("restore-after-cont", vm.name)
            session.finish()  # only now: the VM runs on the preserved RAM
            note(step="finished", ok=True, pid=out.pid, status=out.status)
        except Exception as exc:
            out.ok = False
            out.error = str(exc) if isinstance(exc, LuoAgentError) else f"{type(exc).__name__}: {exc}"
            self.opts.reporter.log(f"{vm.name}: FAILED: {out.error}")
            if out.resumed:
                # a guest that ran must never run twice: no rescue image, no retry
                out.retry = (f"none: the VM runs (pid {out.pid}) on its preserved RAM; starting it again "
                             "would run it twice on the same disks")
                self.opts.reporter.log(f"{vm.name}: {out.retry}")
                with contextlib.suppress(Exception):
                    note(step="resumed", error=out.error)
            elif ram_fds and vmstate_fd >= 0:
                try:
                    path = await write_rescue_async(vm, ram_fds, vmstate_fd, self.opts.rescue_dir)
                    out.rescue = str(path)
                    out.retry = f"luoagent restore --from-rescue {path}"
                    self.opts.reporter.log(f"{vm.name}: nothing lost: written as a cpr-reboot image to {path}; "
                                           f"retry with `{out.retry}`")
                except Exception as rexc:
                    out.retry = f"could not write a rescue image ({rexc}); the VM's RAM is lost once this process exits"
                    self.opts.reporter.log(f"{vm.name}: {out.retry}")
                with contextlib.suppress(Exception):
                    note(step="failed", ok=False, error=out.error, rescue=out.rescue)
            else:
                out.retry = "its session could not be retrieved; nothing of it is held in this boot"
                with contextlib.suppress(Exception):
                    note(step="failed", ok=False, error=out.error)
        except BaseException:
            released = True  # cancelled or killed: the fd store and the journal keep what is needed
            raise
        finally:
            # QEMU (or the rescue image) holds what it needs now
            for fd in ram_fds + ([vmstate_fd] if vmstate_fd >= 0 else []):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if not released:
                self.source.release(vm.session)
        return out

    def _retrieve(self, vm: mf.PreservedVm) -> tuple[object, list[int], int]:
        """(session, RAM memfds in manifest order, vmstate memfd) of ``vm``, sizes checked;
        on failure the fds retrieved so far are closed again."""
        fds: list[int] = []
        try:
            session = self.source.retrieve_session(vm.session)
            for r in vm.ram:
                fds.append(session.retrieve(r.token))
                size = memfd.size(fds[-1])
                if size != r.size:
                    raise RestoreError(f"RAM backend {r.id}: retrieved memfd is {size} bytes, manifest says {r.size}")
            fds.append(session.retrieve(vm.vmstate.token))
            size = memfd.size(fds[-1])
            if size != vm.vmstate.size:
                raise RestoreError(f"vmstate memfd is {size} bytes, manifest says {vm.vmstate.size}")
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        return session, fds[:-1], fds[-1]

    async def _qemu_on_socket(self, vm: mf.PreservedVm):
        """(pid, Qmp) of the QEMU serving this VM's QMP socket, or (0, None)."""
        sock = Path(vm.qmp_socket)
        if not sock.exists():
            return 0, None
        try:
            pid = procfs.peer_pid(sock, timeout=5)
            return pid, await qmp_client.Qmp.connect(sock, timeout=min(self.opts.timeout, 10))
        except LuoAgentError:
            return 0, None

    async def _stop_leftover(self, vm: mf.PreservedVm, entry: dict) -> str:
        """The QEMU an interrupted restore started for ``vm`` never ran the guest (the journal
        says so), so it goes before the VM is started again. One that is found running after
        all (it resumed by itself after its load) is adopted instead, never killed."""
        pid, q = await self._qemu_on_socket(vm)
        if q is not None:
            try:
                status = await q.status()
            finally:
                await q.close()
            if status == "running":
                return restore_journal.ADOPT
        recorded = int(entry.get("pid") or 0)
        victims = {p for p in (pid, recorded) if p and procfs.pid_alive(p)}
        if recorded in victims and entry.get("pid_start") and procfs.start_time(recorded) != entry["pid_start"]:
            victims.discard(recorded)  # that pid is another process now
        for victim in victims:
            self.opts.reporter.log(f"{vm.name}: the QEMU (pid {victim}) an interrupted restore started never ran "
                                   "the guest: stopping it, then starting the VM again")
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(procfs.pid_alive(v) for v in victims):
            if time.monotonic() > deadline:
                raise RestoreError(f"VM {vm.name}: the QEMU of the interrupted restore (pid "
                                   f"{', '.join(map(str, sorted(victims)))}) does not die; not starting a second one")
            await asyncio.sleep(0.05)
        if entry.get("unit") and systemctl.booted():
            # the scope may linger a moment after its process died: its name must be free
            await asyncio.to_thread(systemctl.stop_unit, entry["unit"])
        return restore_journal.START

    async def _adopt(self, vm: mf.PreservedVm, entry: dict, out: VmOutcome) -> None:
        """The guest may have run (``cont`` was issued): it is never started again. Its QEMU is
        taken as it is (``cont`` again only if it is paused), then the session is finished."""
        note = self._note(vm.name)
        out.resumed = True
        pid, q = await self._qemu_on_socket(vm)
        out.pid = pid or int(entry.get("pid") or 0)
        out.unit = entry.get("unit") or ""
        try:
            if q is None:
                raise RestoreError(f"VM {vm.name} was resumed by an interrupted restore and its QEMU (pid {out.pid}) "
                                   f"no longer serves {vm.qmp_socket}; it is not started again (it would run twice)")
            try:
                out.status = await q.status()
                if out.status == "paused" and vm.was_running:
                    await q.cont()
                    out.status = await q.status()
            finally:
                await q.close()
            if out.status != ("running" if vm.was_running else "paused"):
                raise RestoreError(f"VM {vm.name} is {out.status!r} in its adopted QEMU (pid {pid})")
            note(step="resumed", pid=pid)
            if entry.get("argv"):
                with contextlib.suppress(OSError, LuoAgentError):
                    await asyncio.to_thread(register_vm, self.opts.vm_root, vm, entry.get("binary", ""),
                                            list(entry["argv"]), pid, Path(entry.get("log") or "/dev/null"),
                                            entry.get("unit") or "")
            session = self.source.retrieve_session(vm.session)
            await testmode.pause("restore-after-cont", vm.name)
            session.finish()
            out.ok = True
            note(step="finished", ok=True, pid=pid, status=out.status)
            self.opts.reporter.log(f"{vm.name}: {out.status} (pid {pid}), adopted from the interrupted restore")
        except LuoAgentError as exc:
            out.ok = False
            out.error = str(exc)
            out.retry = (f"none: the guest ran (pid {out.pid}); starting it again would run it twice on the same disks")
            self.opts.reporter.log(f"{vm.name}: FAILED: {out.error}; retry: {out.retry}")
            with contextlib.suppress(Exception):
                note(step="failed", ok=False, error=out.error)
        self.source.release(vm.session)
