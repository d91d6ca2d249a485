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
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import manifest as mf
from luoagent import memfd, testmode
from luoagent.adapters import cpr, qemu_binary, qemu_ram, qmp_client
from luoagent.errors import (
    LuoAgentError,
    ManifestCorrupt,
    ManifestMissing,
    RestoreError,
    SessionAlreadyRetrieved,
    SessionNotFound,
    TokenNotFound,
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
    ram_bytes_copied: int = 0
    was_running: bool = False
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
            DEFAULT_RESCUE_DIR.mkdir(parents=True, exist_ok=True)
            saved.write_bytes(os.pread(fd, mf.MANIFEST_MAX_BYTES, 0))
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
    sock.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    for i, a in enumerate(argv[:-1]):
        value = argv[i + 1]
        path = None
        if a in ("-pidfile", "--pidfile", "-D"):
            path = value
        elif a in ("-serial", "--serial") and value.startswith("file:"):
            path = value[len("file:"):]
        if path and path.startswith("/"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def _has_qmp_on(argv: list[str], qmp_socket: str) -> bool:
    return any(qmp_socket in a for a in argv)


def _binary(vm: mf.PreservedVm, opts: RestoreOptions) -> str:
    if opts.qemu or os.environ.get(qemu_binary.QEMU_ENV):
        return str(qemu_binary.find_qemu(opts.qemu))
    if vm.binary and os.access(vm.binary, os.X_OK) and not Path(vm.binary).name.startswith("ld-"):
        return vm.binary
    return str(qemu_binary.find_qemu())


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
    binary = _binary(vm, opts)
    argv = qemu_ram.restore_argv(vm.argv, mem_paths)
    _prepare_paths(argv, vm.qmp_socket)
    vm_dir = opts.vm_root / vm.name
    vm_dir.mkdir(parents=True, exist_ok=True)
    log_path = vm_dir / "qemu.log"
    # `luoagent vm start` records argv without its -qmp; an adopted QEMU's argv has its own
    own_qmp = None if _has_qmp_on(argv, vm.qmp_socket) else vm.qmp_socket
    proc = qemu_binary.launch(binary, argv, pass_fds=ram_fds, qmp_socket=own_qmp, log=log_path, daemon=True)
    out.pid = proc.pid
    try:
        q = await qmp_client.Qmp.connect(vm.qmp_socket, timeout=opts.timeout, process=proc)
        try:
            out.timings["qemu_up_ns"] = time.time_ns()
            rfd = memfd.reopen(vmstate_fd, os.O_RDONLY)  # the fdset's access mode must match the load
            try:
                await q.add_fd(rfd, INCOMING_FDSET, opaque=f"luoagent vmstate {vm.name}")
            finally:
                os.close(rfd)
            testmode.fault("restore-vm", vm.name, RestoreError)
            await cpr.load(q, f"file:/dev/fdset/{INCOMING_FDSET}", timeout=opts.timeout)
            out.timings["incoming_done_ns"] = time.time_ns()
            if vm.was_running and await q.status() != "running":
                await q.cont()
            out.status = await q.status()
            out.timings["running_ns"] = time.time_ns()
            with contextlib.suppress(LuoAgentError):
                await q.execute("remove-fd", {"fdset-id": INCOMING_FDSET})
            expected = "running" if vm.was_running else "paused"
            if out.status != expected:
                raise RestoreError(f"VM {vm.name} is {out.status!r} after restore, expected {expected!r}")
        finally:
            await q.close()
    except BaseException:
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
    register_vm(opts.vm_root, vm, binary, argv, proc.pid, log_path)


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
    target.mkdir(parents=True, exist_ok=False)
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
    (target / "restore.json").write_text(json.dumps(doc, indent=1))
    dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target


def _copy_fd(src: int, path: Path, size: int) -> None:
    with open(path, "wb") as f:
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
    meta_path = directory / "restore.json"
    try:
        meta = json.loads(meta_path.read_text())
        vm = mf.Manifest.from_dict(
            {"schema": "1.0", "created_ns": 0, "kernel_from": "", "kernel_to": "", "kernel_cmdline": "",
             "agent_version": "", "vms": [meta["vm"]]}
        ).vms[0]
    except (OSError, ValueError, KeyError) as exc:
        raise RestoreError(f"{meta_path} is not a luoagent rescue image: {exc}") from None
    out = VmOutcome(name=vm.name, was_running=vm.was_running, vmstate_bytes=vm.vmstate.size, ram_bytes=vm.ram_bytes)
    vfd = os.open(meta["vmstate"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        asyncio.run(start_incoming(vm, [], vfd, meta["ram_files"], opts, out))
    finally:
        os.close(vfd)
    out.ram_bytes_copied = vm.ram_bytes_copied
    return {"ok": out.ok, "vms": [out.__dict__], "from_rescue": str(directory)}


# ---------------------------------------------------------------------------------------
# the restore
# ---------------------------------------------------------------------------------------
def restore(opts: RestoreOptions | None = None) -> dict:
    opts = opts or RestoreOptions()
    t0 = time.monotonic()
    lu = LiveUpdate.open()
    try:
        msession, manifest = retrieve_manifest(lu)
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
    )
    session = None
    ram_fds: list[int] = []
    vmstate_fd = -1
    try:
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
        if ram_fds and vmstate_fd >= 0:
            try:
                path = write_rescue(vm, ram_fds, vmstate_fd, opts.rescue_dir)
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
