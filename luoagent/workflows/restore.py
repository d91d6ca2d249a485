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
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import manifest as mf
from luoagent import memfd, testmode
from luoagent.adapters import cpr, private_files, procfs, qemu_binary, qemu_ram, qmp_client
from luoagent.errors import (
    LuoAgentError,
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
from luoagent.workflows import ram_sample, summary
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
        result = restore(opts)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        summary.restore_summary(result)
    return 0 if result["ok"] else 1


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
) -> None:
    """Start QEMU on the given RAM, load the vmstate, resume; fills ``out``."""
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
    proc = qemu_binary.launch(binary, argv, pass_fds=ram_fds, qmp_socket=own_qmp, log=log_path, daemon=True)
    out.pid = proc.pid
    try:
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
                try:
                    await q.cont()
                except QmpCommandFailed:
                    raise  # QEMU refused: the guest did not run
                except BaseException:
                    out.resumed = True  # no answer: it may run; never start it a second time
                    raise
            out.resumed = vm.was_running
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
        await asyncio.to_thread(register_vm, opts.vm_root, vm, binary, argv, proc.pid, log_path)
    except (OSError, LuoAgentError) as exc:
        out.ok = False
        raise RestoreError(
            f"VM {vm.name} runs again (pid {proc.pid}) but could not be recorded in {opts.vm_root} "
            f"({exc}); it is NOT restored again and needs no retry: fix the cause, then manage it "
            f"through its QMP socket {vm.qmp_socket}"
        ) from None


def register_vm(vm_root: Path, vm: mf.PreservedVm, binary: str, argv: list[str], pid: int, log_path: Path) -> None:
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
# the restore
# ---------------------------------------------------------------------------------------
def restore(opts: RestoreOptions | None = None) -> dict:
    opts = opts or RestoreOptions()
    _check_timeout(opts)
    with vmwf.agent_lock(opts.vm_root, "restore"):
        return _restore(opts)


def _check_timeout(opts: RestoreOptions) -> None:
    if not opts.timeout > 0:
        raise UsageError(f"--timeout {opts.timeout:g}: give the seconds each QEMU step may take, more than 0 (default 60)")


def _restore(opts: RestoreOptions) -> dict:
    t0 = time.monotonic()
    clock = {"luo_open_boot_ns": boot_clock_ns()}  # the agent's first LUO call
    lu = LiveUpdate.open()
    try:
        msession, manifest = retrieve_manifest(lu)
        clock["manifest_retrieved_boot_ns"] = boot_clock_ns()
        opts.reporter.log(f"manifest: schema {manifest.schema[0]}.{manifest.schema[1]}, {len(manifest.vms)} VM(s), "
                   f"written by kernel {manifest.kernel_from}, now on {os.uname().release}")
        outcomes = asyncio.run(_restore_all(lu, manifest, opts))
    finally:
        lu.close()
    # the manifest session last: while VMs are still being handled it documents them
    msession.close()  # closing a retrieved session finishes it
    ok = all(o.ok for o in outcomes)
    return {
        "ok": ok,
        "kernel_from": manifest.kernel_from,
        "kernel_now": os.uname().release,
        "seconds": round(time.monotonic() - t0, 4),
        "boot_clock_ns": clock,
        "vms": [o.__dict__ for o in outcomes],
    }


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


async def _restore_all(lu, manifest: mf.Manifest, opts: RestoreOptions) -> list[VmOutcome]:
    return list(await asyncio.gather(*(_restore_one(lu, vm, opts) for vm in manifest.vms)))


async def _restore_one(lu, vm: mf.PreservedVm, opts: RestoreOptions) -> VmOutcome:
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
    session = None
    ram_fds: list[int] = []
    vmstate_fd = -1
    try:
        out.timings["retrieve_boot_ns"] = boot_clock_ns()
        session = lu.retrieve_session(vm.session)
        for r in vm.ram:
            fd = session.retrieve(r.token)
            ram_fds.append(fd)
            size = memfd.size(fd)
            if size != r.size:
                raise RestoreError(f"RAM backend {r.id}: retrieved memfd is {size} bytes, manifest says {r.size}")
        vmstate_fd = session.retrieve(vm.vmstate.token)
        size = memfd.size(vmstate_fd)
        if size != vm.vmstate.size:
            raise RestoreError(f"vmstate memfd is {size} bytes, manifest says {vm.vmstate.size}")
        out.timings["retrieved_boot_ns"] = boot_clock_ns()
        _check_ram_sample(vm, ram_fds, opts, out)
        mem_paths = {r.id: f"/proc/self/fd/{fd}" for r, fd in zip(vm.ram, ram_fds)}
        await start_incoming(vm, ram_fds, vmstate_fd, mem_paths, opts, out)
        opts.reporter.log(f"{vm.name}: {out.status} (pid {out.pid}), blackout {out.blackout_ns / 1e9:.3f} s = "
                   + " + ".join(f"{k} {s:.3f}" for k, s in out.blackout_parts.items()))
        session.finish()  # only now: the VM runs on the preserved RAM
    except Exception as exc:
        out.ok = False
        out.error = str(exc) if isinstance(exc, LuoAgentError) else f"{type(exc).__name__}: {exc}"
        opts.reporter.log(f"{vm.name}: FAILED: {out.error}")
        if out.resumed:
            # a guest that ran must never run twice: no rescue image, no retry
            out.retry = (f"none: the VM runs (pid {out.pid}) on its preserved RAM; starting it again "
                         "would run it twice on the same disks")
            opts.reporter.log(f"{vm.name}: {out.retry}")
        elif ram_fds and vmstate_fd >= 0:
            try:
                path = await write_rescue_async(vm, ram_fds, vmstate_fd, opts.rescue_dir)
                out.rescue = str(path)
                out.retry = f"luoagent restore --from-rescue {path}"
                opts.reporter.log(f"{vm.name}: nothing lost: written as a cpr-reboot image to {path}; retry with `{out.retry}`")
            except Exception as rexc:
                out.retry = (
                    "could not write a rescue image "
                    f"({rexc}); the VM's RAM is lost once this process exits"
                )
                opts.reporter.log(f"{vm.name}: {out.retry}")
        else:
            out.retry = "its session could not be retrieved; nothing of it is held in this boot"
    finally:
        # QEMU (or the rescue image) holds what it needs now
        for fd in ram_fds + ([vmstate_fd] if vmstate_fd >= 0 else []):
            with contextlib.suppress(OSError):
                os.close(fd)
        if session is not None:
            session.close()
    return out
