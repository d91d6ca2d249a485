"""Workflow `luoagent vm start|list|stop|upgrade`: run QEMU VMs whose RAM is a memfd LUO can preserve.

Each VM has a VM directory (record vm.json, QMP socket, logs) inside the VM root; `update`
reads the records. When the daemon serves, the verbs run in it (its operations vm-start,
vm-stop, vm-list, vm-upgrade): the CLI only sends the request with its paths made absolute."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from luoagent import log
from luoagent import manifest as mf
from luoagent import memfd
from luoagent.adapters import qemu_binary, qemu_ram, qmp_client
from luoagent.adapters import private_files, procfs, systemctl
from luoagent.adapters.procfs import pid_alive
from luoagent.errors import QemuError, QmpUnreachable, UsageError, VmNotPreservable

#: the VM root (one VM directory per VM) unless --vm-root / $LUOAGENT_VM_ROOT says otherwise
DEFAULT_VM_ROOT = Path("/run/luoagent/vms")
VM_ROOT_ENV = "LUOAGENT_VM_ROOT"
RECORD_FILE = "vm.json"
RECORD_SCHEMA = 1
RAM_BACKEND_ID = "ram0"
#: fdset used for RAM when the QEMU can open /dev/fdset/N as a memory backend
RAM_FDSET = 1

logger = log.get_logger(__name__)


@dataclass
class VmRecord:
    """What `vm start` (or `restore`, via register_restored) wrote about a VM: its vm.json."""

    name: str
    pid: int
    qemu: str = ""
    qemu_version: str = ""
    argv: list[str] = field(default_factory=list)  # everything after the binary except -qmp
    memory: int = 0
    smp: int = 1
    vm_dir: str = ""
    qmp_socket: str = ""
    serial_log: str | None = None
    log: str = ""
    ram: list[dict] = field(default_factory=list)  # [{"id", "size", "fd"}]: fd = number in QEMU
    created_ns: int = 0
    restored: bool = False
    upgrades: list[dict] = field(default_factory=list)  # one entry per `vm upgrade`
    #: the transient systemd scope QEMU runs in (host booted with systemd), else ""
    unit: str = ""
    schema: int = RECORD_SCHEMA

    @property
    def session_name(self) -> str:
        return session_name(self.name)


# --- names and places -----------------------------------------------------------------------
def session_name(vm_name: str) -> str:
    """The VM's LUO session name (one rule for `vm`, `update` and `restore`: luoagent.manifest)."""
    return mf.vm_session_name(vm_name)


def validate_name(name: str) -> str:
    """Return ``name`` if it can name a VM (and its LUO session); InvalidName otherwise."""
    mf.vm_session_name(name)
    return name


def vm_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(VM_ROOT_ENV) or DEFAULT_VM_ROOT)


def _prepare_dir(path: Path) -> None:
    try:
        private_files.makedirs(path)  # 0700 from creation: it holds the argv and the QMP socket
    except OSError as exc:
        raise UsageError(
            f"cannot create VM directory {path}: {exc.strerror}; run as root or pass "
            f"--vm-root / --vm-dir (or set ${VM_ROOT_ENV}) to a directory you own"
        ) from exc


#: in the VM root: held by `update` and `restore` for their whole run, by `vm start`/`stop`
#: while they change a VM directory (so no VM is started or stopped under an update)
LOCK_FILE = ".luoagent.lock"


@contextlib.contextmanager
def agent_lock(root: str | os.PathLike, verb: str):
    """One run at a time of the verbs that change VMs in this VM root; UsageError at once
    (naming the holder) if another is running."""
    path = Path(root) / LOCK_FILE
    try:
        with private_files.exclusive_lock(path):
            yield
    except private_files.Busy as exc:
        raise UsageError(
            f"another luoagent update/restore/vm start|stop is running on VM root {root} (pid {exc.holder or '?'} "
            f"holds {path}); wait for it to finish, then run `luoagent {verb}` again") from None
    except PermissionError as exc:
        raise UsageError(f"cannot lock {path}: {exc.strerror}; run as root or pass --vm-root to a directory you own") from None


def record_path(vm_dir: Path) -> Path:
    return vm_dir / RECORD_FILE


def load_record(name: str, root: str | os.PathLike | None = None) -> VmRecord:
    """The record of VM ``name``; UsageError if there is none."""
    validate_name(name)
    path = record_path(vm_root(root) / name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no VM named {name!r} (no {path}); `luoagent vm list` shows the VMs") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"VM record {path} is unreadable ({exc}); remove it with `luoagent vm stop {name}`") from exc
    return _record_from(data, path)


def _record_from(data: dict, path: Path) -> VmRecord:
    if data.get("schema", RECORD_SCHEMA) != RECORD_SCHEMA:
        raise UsageError(f"VM record {path} has schema {data.get('schema')!r}, this luoagent reads {RECORD_SCHEMA}")
    if "qemu" not in data and "binary" in data:
        data = {**data, "qemu": data["binary"]}
    if not isinstance(data.get("name"), str) or not isinstance(data.get("pid"), int):
        raise UsageError(f"VM record {path} lacks a name or pid")
    known = set(VmRecord.__dataclass_fields__)
    record = VmRecord(**{k: v for k, v in data.items() if k in known})
    if not record.vm_dir:
        record.vm_dir = str(path.parent)
    if not record.memory:
        record.memory = sum(int(r.get("size", 0)) for r in record.ram)
    return record


def write_record(record: VmRecord) -> None:
    """Write ``record`` as VM_DIR/vm.json, atomically and 0600 from creation (the argv may carry
    secrets: -object secret,data=...)."""
    private_files.write_text(record_path(Path(record.vm_dir)), json.dumps(asdict(record), indent=2) + "\n")


def qemu_unit(name: str) -> str | None:
    """The scope unit a VM's QEMU is started in: on a host booted with systemd, its own
    transient scope (never the cgroup of luoagent.service or of a login session); else None."""
    return systemctl.vm_unit(name) if systemctl.booted() else None


def register_restored(*, name: str, pid: int, qmp_socket: str, binary: str, argv: list[str],
                      ram: list[dict], log: str, vm_root: str | os.PathLike, unit: str = "") -> VmRecord:
    """Record a VM that `restore` brought back so `vm list`/`vm stop` manage it again.

    ``vm_root``: the VM root; the record goes in VM_ROOT/NAME."""
    validate_name(name)
    sdir = Path(vm_root) / name
    _prepare_dir(sdir)
    serial = next((a[len("file:"):] for prev, a in zip(argv, argv[1:])
                   if prev == "-serial" and a.startswith("file:")), None)
    smp_arg = next((a for prev, a in zip(argv, argv[1:]) if prev == "-smp"), "1")
    smp_match = re.match(r"^(?:cpus=)?(\d+)", smp_arg)
    try:
        version = qemu_binary.qemu_version(binary)
    except QemuError:
        version = ""
    record = VmRecord(
        name=name, pid=int(pid), qemu=str(binary), qemu_version=version, argv=list(argv),
        memory=sum(int(r.get("size", 0)) for r in ram), smp=int(smp_match.group(1)) if smp_match else 1,
        vm_dir=str(sdir), qmp_socket=str(qmp_socket), serial_log=serial, log=str(log),
        ram=[dict(r) for r in ram], created_ns=time.time_ns(), restored=True, unit=unit or "",
    )
    write_record(record)
    return record


def list_records(root: str | os.PathLike | None = None) -> list[VmRecord]:
    """Records of every VM under the root (sorted by name); unreadable ones are skipped with a log."""
    base = vm_root(root)
    records = []
    if not base.is_dir():
        return records
    for entry in sorted(base.iterdir()):
        path = record_path(entry)
        if not path.is_file():
            continue
        try:
            records.append(_record_from(json.loads(path.read_text()), path))
        except (OSError, ValueError, UsageError, TypeError) as exc:
            logger.warning("skipping unreadable VM record", path=str(path), error=str(exc))
    return records


def is_vm_process(record: VmRecord) -> bool:
    """Is ``record.pid`` still this VM's QEMU (and not a recycled pid)? Checks its command line
    for the VM's QMP socket as a whole option value (``unix:PATH`` or ``path=PATH``: a socket
    whose path merely contains this one's is another VM) or ``-name NAME``."""
    if not pid_alive(record.pid):
        return False
    try:
        args = procfs.argv(record.pid)
    except OSError:
        return False
    if record.qmp_socket:
        wanted = {f"unix:{record.qmp_socket}", f"path={record.qmp_socket}"}
        if any(part in wanted for a in args for part in a.split(",")):
            return True
    return any(a == "-name" and b.split(",")[0] in (record.name, f"guest={record.name}")
               for a, b in zip(args, args[1:]))


# --- start ------------------------------------------------------------------------------------
def start_vm(
    name: str,
    memory: int,
    qemu_args: list[str],
    *,
    smp: int = 1,
    binary: str | os.PathLike | None = None,
    vm_dir: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    accel: str = "tcg",
    timeout: float = 30.0,
    user: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> VmRecord:
    """Start a daemonized QEMU whose RAM is a share=on memory-backend-file over a fresh memfd.
    ``user`` (a user name or UID:GID): QEMU drops to it after opening its files
    (``-run-with user=``), so a guest that escapes into QEMU is not root."""
    identity = check_start_args(name, memory, qemu_args, smp=smp, user=user)
    binary = qemu_binary.find_qemu(binary)
    version = qemu_binary.qemu_version(binary)
    probe = qemu_binary.probe_cpr(binary)
    if not probe.usable:
        raise QemuError(
            f"QEMU {version} at {binary} lacks cpr-reboot/x-ignore-shared ({probe.details}); "
            "a live update needs QEMU >= 8.2 (tested with 11.1)"
        )

    base = vm_root(root)
    _prepare_dir(base)
    with agent_lock(base, "vm start"):
        return _start_locked(name, memory, qemu_args, smp=smp, binary=binary, version=version, probe=probe,
                             base=base, vm_dir=vm_dir, accel=accel, timeout=timeout, identity=identity, user=user,
                             cwd=cwd)


def check_start_args(name: str, memory: int, qemu_args: list[str], *, smp: int, user: str | None):
    """UsageError for what `vm start` can refuse before anything runs; the (uid, gid) of ``user``."""
    validate_name(name)
    identity = resolve_user(user) if user else None
    page = os.sysconf("SC_PAGE_SIZE")
    if memory < 2 * 1024 * 1024 or memory % page:
        raise UsageError(f"--memory {memory} B: give at least 2M, a multiple of {page} B (e.g. 512M, 2G)")
    if smp < 1:
        raise UsageError(f"--smp {smp}: need at least one vCPU")
    _reject_conflicting_args(qemu_args)
    if identity and any(a in ("-runas", "--runas", "-run-with", "--run-with") for a in qemu_args):
        raise UsageError("QEMU options -runas/-run-with are set by luoagent --user; remove them from QEMU_ARGS")
    return identity


def _start_locked(name, memory, qemu_args, *, smp, binary, version, probe, base, vm_dir, accel, timeout,
                  identity, user, cwd) -> VmRecord:
    sdir = Path(vm_dir) if vm_dir else base / name
    _prepare_dir(sdir)
    _refuse_running_duplicate(name, base)
    link = base / name
    if sdir != link:
        if link.is_symlink() or link.exists():
            _remove_state(link)
        link.symlink_to(sdir.resolve())

    sock = sdir / "qmp.sock"
    qemu_log = sdir / "qemu.log"
    serial = None if _has_any(qemu_args, "-serial", "-nographic", "-chardev") else sdir / "serial.log"
    os.close(private_files.open_append(qemu_log))
    os.truncate(qemu_log, 0)

    ram = memfd.create(f"luoagent-vm-{name}", memory)
    try:
        argv = ["-name", name, "-accel", accel, "-m", f"{memory}B", "-smp", str(smp)]
        if probe.fdset_mem_backend:
            argv += ["-add-fd", f"fd={ram},set={RAM_FDSET}"]
            argv += qemu_ram.ram_backend_args(RAM_BACKEND_ID, memory, fdset=RAM_FDSET)
        else:
            argv += qemu_ram.ram_backend_args(RAM_BACKEND_ID, memory, fd=ram)
        if identity:
            argv += ["-run-with", f"user={identity[0]}:{identity[1]}"]
        if not _has_any(qemu_args, "-display", "-nographic"):
            argv += ["-display", "none"]
        if serial is not None:
            argv += ["-serial", f"file:{serial}"]
        argv += list(qemu_args)
        unit = qemu_unit(name)
        proc = qemu_binary.launch(binary, argv, pass_fds=[ram], qmp_socket=sock, log=qemu_log, daemon=True,
                                  scope_unit=unit, cwd=cwd)
        logger.info("QEMU started", vm=name, pid=proc.pid, memory=memory)
        try:
            status, backends = qmp_client.run_sync(_check_started(proc, sock, timeout))
            if identity and procfs.identity(proc.pid) != identity:
                raise QemuError(f"QEMU runs as uid/gid {procfs.identity(proc.pid)}, not {identity} (--user {user})")
        except (QemuError, VmNotPreservable) as exc:
            qemu_binary.kill_process(proc)
            tail = qemu_binary.log_tail(qemu_log)
            _remove_state(sdir)
            if sdir != link:
                link.unlink(missing_ok=True)
            raise QemuError(f"VM {name!r} did not come up: {exc}; QEMU said: {tail}") from exc
    finally:
        os.close(ram)  # QEMU holds the memfd now

    record = VmRecord(
        name=name, pid=proc.pid, qemu=str(binary), qemu_version=version, argv=argv, memory=memory,
        smp=smp, vm_dir=str(sdir), qmp_socket=str(sock), serial_log=str(serial) if serial else None,
        log=str(qemu_log), ram=[{"id": b.id, "size": b.size, "fd": b.qemu_fd} for b in backends],
        created_ns=time.time_ns(), unit=unit or "",
    )
    write_record(record)
    logger.info("VM running", vm=name, status=status, vm_dir=str(sdir))
    return record


def resolve_user(user: str) -> tuple[int, int]:
    """(uid, gid) of ``--user``: a user name from the password database or ``UID:GID``."""
    import pwd

    m = re.fullmatch(r"(\d+):(\d+)", user)
    if m:
        ids = int(m.group(1)), int(m.group(2))
    else:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user {user!r}: no such user; give an existing user name or UID:GID "
                             "(e.g. a dedicated 'luoagent-qemu' system user)") from None
        ids = pw.pw_uid, pw.pw_gid
    if ids[0] == 0:
        raise UsageError(f"--user {user!r} is root (uid 0); name an unprivileged user, or leave --user out")
    return ids


def _has_any(args: list[str], *options: str) -> bool:
    return any(a == o or a.startswith(o + "=") for a in args for o in options)


def _reject_conflicting_args(args: list[str]) -> None:
    owned = {"-m": "--memory", "-smp": "--smp", "-qmp": "(luoagent's own QMP socket)",
             "-incoming": "(used only by restore)", "-daemonize": "(luoagent daemonizes QEMU itself)",
             "-name": "(the VM name)", "-mem-path": "--memory", "-mem-prealloc": "--memory"}
    for arg in args:
        key = arg.split("=", 1)[0]
        if key.startswith("--"):
            key = key[1:]
        if key in owned:
            raise UsageError(f"QEMU option {arg} is set by luoagent {owned[key]}; remove it from QEMU_ARGS")
        if key in ("-accel", "-enable-kvm"):
            raise UsageError(f"QEMU option {arg}: use luoagent's --accel instead")


def _refuse_running_duplicate(name: str, base: Path) -> None:
    path = record_path(base / name)
    if not path.is_file():
        return
    try:
        old = _record_from(json.loads(path.read_text()), path)
    except (OSError, ValueError, UsageError, TypeError):
        return
    if is_vm_process(old):
        raise UsageError(f"VM {name!r} is already running (pid {old.pid}); stop it first: luoagent vm stop {name}")


async def _check_started(proc, sock: Path, timeout: float):
    async with await qmp_client.Qmp.connect(sock, timeout=timeout, process=proc) as q:
        status = await q.status()
        backends = await qemu_ram.ram_backends(proc.pid, q)
        return status, backends


# --- list -----------------------------------------------------------------------------------
def vm_status(record: VmRecord, timeout: float = 3.0) -> str:
    """``running``/``paused``/… from QMP; ``dead`` if the process is gone; ``unreachable``."""
    if not is_vm_process(record):
        return "dead"

    async def ask():
        async with await qmp_client.Qmp.connect(record.qmp_socket, timeout=timeout) as q:
            return await q.status(timeout=timeout)

    try:
        return qmp_client.run_sync(ask())
    except QemuError:
        return "unreachable"


def describe(record: VmRecord) -> dict:
    try:
        uid = procfs.identity(record.pid)[0] if is_vm_process(record) else None
    except OSError:
        uid = None
    return {"name": record.name, "pid": record.pid, "status": vm_status(record), "uid": uid,
            "memory": record.memory, "smp": record.smp, "qmp_socket": record.qmp_socket,
            "vm_dir": record.vm_dir, "serial_log": record.serial_log,
            "session": record.session_name, "qemu_version": record.qemu_version, "unit": record.unit or None}


# --- stop -----------------------------------------------------------------------------------
def stop_vm(name: str, *, root: str | os.PathLike | None = None, force: bool = False,
            timeout: float = 15.0) -> dict:
    """Quit VM ``name`` via QMP (SIGKILL with ``force`` if QMP does not answer); remove its state."""
    record = load_record(name, root)
    with agent_lock(vm_root(root), "vm stop"):
        return _stop_locked(name, record, root, force, timeout)


def _stop_locked(name: str, record: VmRecord, root, force: bool, timeout: float) -> dict:
    how = "already gone"
    if is_vm_process(record):
        try:
            qmp_client.run_sync(_quit(record.qmp_socket, timeout=min(timeout, 5.0)))
            how = "quit via QMP"
        except QmpUnreachable as exc:
            if not force:
                raise QmpUnreachable(f"VM {name!r} (pid {record.pid}): {exc}; use --force to kill it") from exc
            _kill(record.pid)
            how = "killed (SIGKILL)"
        deadline = time.monotonic() + timeout
        while pid_alive(record.pid):
            if time.monotonic() > deadline:
                if not force:
                    raise QemuError(f"VM {name!r} (pid {record.pid}) did not exit within {timeout:g} s; use --force")
                _kill(record.pid)
                how = "killed (SIGKILL)"
                deadline = time.monotonic() + timeout
            time.sleep(0.05)
    base = vm_root(root)
    _remove_state(Path(record.vm_dir))
    link = base / name
    if link.is_symlink():
        link.unlink()
    return {"name": name, "pid": record.pid, "stopped": how}


async def _quit(sock: str, timeout: float) -> None:
    async with await qmp_client.Qmp.connect(sock, timeout=timeout) as q:
        await q.quit(timeout=timeout)


def _kill(pid: int) -> None:
    # a pidfd pins the process so the signal cannot hit a recycled pid
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


#: files `vm start` creates in a VM directory; only these are ever deleted
STATE_FILES = (RECORD_FILE, RECORD_FILE.replace(".json", ".tmp"), "qmp.sock", "qemu.log", "serial.log")


def _remove_state(path: Path) -> None:
    """Remove luoagent's files from a VM directory (never anything else), then the
    directory if that left it empty; a symlink VM_ROOT/NAME -> --vm-dir is just unlinked."""
    if path.is_symlink():
        path.unlink()
        return
    for name in STATE_FILES:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (the user's own files) or already gone


# --- CLI ------------------------------------------------------------------------------------
class _QemuArgsParser(argparse.ArgumentParser):
    """Takes everything after the first '--' verbatim as ``qemu_args``.

    argparse alone cannot: a '*' positional after NAME matches empty before '--' is seen."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        extra: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, extra = args[:cut], args[cut + 1:]
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.qemu_args = extra
        return namespace, rest


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vm-root", "--root", dest="root",
                        help=f"the VM root: directory holding one directory per VM (default ${VM_ROOT_ENV} or {DEFAULT_VM_ROOT})")
    sub = parser.add_subparsers(dest="vm_action", metavar="ACTION", parser_class=_QemuArgsParser)
    sub.required = True

    p = sub.add_parser("start", help="start a VM whose RAM is a preservable memfd",
                       description="Start QEMU daemonized with its RAM in a memfd "
                       "(memory-backend-file share=on), a QMP socket and a serial log.")
    p.add_argument("name", help="VM name (letters, digits, . _ + -; at most 51 bytes)")
    p.add_argument("--memory", required=True, help="guest RAM, e.g. 512M or 2G")
    p.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    p.add_argument("--qemu", help="qemu-system-x86_64 to use (default $LUOAGENT_QEMU or PATH)")
    p.add_argument("--vm-dir", help="this VM's own directory (default VM_ROOT/NAME; linked from there)")
    p.add_argument("--accel", default="tcg", help="QEMU accelerator (default tcg)")
    p.add_argument("--user", metavar="USER|UID:GID",
                   help="run QEMU as this user after it opened its files (QEMU -run-with user=); "
                   "without it QEMU runs as root and `luoagent doctor` says so")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for QMP (default 30)")
    p.add_argument("--json", action="store_true", help="print the VM record as JSON")
    p.usage = "%(prog)s NAME --memory SIZE [--smp N] [--qemu PATH] [--vm-dir DIR] [--user USER] [--json] [-- QEMU_ARGS...]"
    p.epilog = "QEMU_ARGS: further QEMU options after '--', e.g. -- -machine pc -kernel guest.elf"

    p = sub.add_parser("upgrade", help="move a running guest into a new QEMU process, RAM in place",
                       description="Start a new QEMU (--qemu, default the VM's own binary) on the "
                       "same RAM memfds, move the device state, switch, retire the old process.")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="VM name in the VM root, or NAME=QMP_SOCKET for a QEMU started by another tool")
    p.add_argument("--all", action="store_true", help="every VM in the VM root")
    p.add_argument("--qemu", help="the new qemu-system-x86_64 (default: the binary the VM runs)")
    p.add_argument("--mechanism", default="auto", help="auto (default), handoff or sequential")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per QEMU step (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("list", help="list VMs with their QMP status")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("stop", help="quit a VM via QMP and remove its state")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="SIGKILL QEMU if QMP does not answer")
    p.add_argument("--json", action="store_true", help="machine-readable output")


#: the daemon operation of each verb (docs/daemon.md)
DAEMON_OPS = {"start": "vm-start", "stop": "vm-stop", "list": "vm-list", "upgrade": "vm-upgrade"}


def request_from(args: argparse.Namespace) -> dict:
    """The verb's request as the daemon takes it: every path absolute and the QEMU binary
    resolved here (the daemon has another cwd and environment than this shell)."""
    req: dict = {"root": str(vm_root(args.root).absolute())}
    if args.vm_action == "start":
        memory = qemu_ram.parse_size(args.memory)
        check_start_args(args.name, memory, list(args.qemu_args), smp=args.smp, user=args.user)  # before the QEMU search
        req.update(name=args.name, memory=memory, qemu_args=list(args.qemu_args),
                   smp=args.smp, binary=str(qemu_binary.find_qemu(args.qemu).absolute()),
                   vm_dir=str(Path(args.vm_dir).absolute()) if args.vm_dir else None,
                   accel=args.accel, timeout=args.timeout, user=args.user, cwd=os.getcwd())
    elif args.vm_action == "stop":
        req.update(name=args.name, force=args.force)
    elif args.vm_action == "upgrade":
        req.update(names=list(args.names), all=args.all, mechanism=args.mechanism, timeout=args.timeout,
                   qemu=str(qemu_binary.find_qemu(args.qemu).absolute()) if args.qemu else None,
                   raise_single=not args.json)
    return req


def perform(action: str, req: dict) -> dict:
    """Run `vm start|stop|list` as ``req`` asks (the daemon's thread or the CLI's process)."""
    try:
        if action == "start":
            record = start_vm(str(req["name"]), int(req["memory"]), [str(a) for a in req.get("qemu_args") or []],
                              smp=int(req.get("smp") or 1), binary=req.get("binary"), vm_dir=req.get("vm_dir"),
                              root=req["root"], accel=str(req.get("accel") or "tcg"),
                              timeout=float(req.get("timeout") or 30.0), user=req.get("user"), cwd=req.get("cwd"))
            return asdict(record)
        if action == "stop":
            return stop_vm(str(req["name"]), root=req["root"], force=bool(req.get("force")))
        if action == "list":
            return {"vms": [describe(r) for r in list_records(req["root"])]}
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"vm {action} request is missing or has a bad field: {exc}") from None
    raise UsageError(f"unknown vm action {action!r} (start, stop, list, upgrade)")


def _through_daemon(action: str, req: dict) -> dict | None:
    """The verb's result from the daemon, or None when no daemon serves (then it runs here)."""
    from luoagent.errors import DaemonNotRunning
    from luoagent.report import Progress
    from luoagent.workflows import client

    try:
        return client.call(DAEMON_OPS[action], req, label=f"vm {action}")
    except DaemonNotRunning as exc:
        if action != "list":
            Progress(f"vm {action}").log(f"{exc}: running `vm {action}` in this process")
        return None


def run(args: argparse.Namespace) -> int:
    req = request_from(args)
    result = _through_daemon(args.vm_action, req)
    if args.vm_action == "upgrade":
        from luoagent.workflows import upgrade  # upgrade builds on this module

        return upgrade.print_result(result if result is not None else upgrade.perform(req), json_out=args.json)
    if result is None:
        result = perform(args.vm_action, req)
    if args.vm_action == "start":
        if args.json:
            print(json.dumps({"ok": True, **result}))
        else:
            print(f"VM {result['name']} running: pid {result['pid']}, {result['memory'] >> 20} MiB RAM in a memfd, "
                  f"QMP {result['qmp_socket']}, serial {result['serial_log'] or '(from your QEMU_ARGS)'}")
    elif args.vm_action == "list":
        rows = result["vms"]
        if args.json:
            print(json.dumps({"ok": True, "vms": rows}))
        elif not rows:
            print(f"no VMs under {req['root']}")
        else:
            print(f"{'NAME':<20} {'PID':>8} {'STATUS':<12} {'MEMORY':>8}  {'UNIT':<28} QMP")
            for r in rows:
                print(f"{r['name']:<20} {r['pid']:>8} {r['status']:<12} {r['memory'] >> 20:>6}Mi  "
                      f"{r['unit'] or '-':<28} {r['qmp_socket']}")
    elif args.vm_action == "stop":
        if args.json:
            print(json.dumps({"ok": True, **result}))
        else:
            print(f"VM {result['name']} (pid {result['pid']}): {result['stopped']}; state removed")
    return 0
