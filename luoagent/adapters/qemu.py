"""QEMU adapter: find and launch qemu-system-x86_64, talk QMP, run cpr-reboot save/load.

No policy: it reports what a QEMU can do and what RAM it has; workflows decide what to do."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from luoagent.errors import (
    MigrationFailed,
    QemuError,
    QemuNotFound,
    QmpCommandFailed,
    QmpUnreachable,
    UsageError,
    VmNotPreservable,
)

QEMU_ENV = "LUOAGENT_QEMU"
QEMU_BINARY_NAME = "qemu-system-x86_64"

#: QOM type prefix of every host-memory backend object
MEMORY_BACKEND_PREFIX = "memory-backend"

# qemu.qmp logs every failed connect attempt at ERROR through the root logger; this adapter
# turns those into exceptions with the socket and a remedy, so keep the library quiet
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)

# ---------------------------------------------------------------------------------------
# finding QEMU
# ---------------------------------------------------------------------------------------


def find_qemu(explicit: str | os.PathLike | None = None) -> Path:
    """Return the QEMU binary: ``explicit``, else ``$LUOAGENT_QEMU``, else PATH; QemuNotFound."""
    if explicit is not None:
        return _usable_binary(Path(explicit), "the path given")
    env = os.environ.get(QEMU_ENV)
    if env:
        return _usable_binary(Path(env), f"${QEMU_ENV}")
    found = shutil.which(QEMU_BINARY_NAME)
    if found:
        return Path(found)
    raise QemuNotFound(
        f"no {QEMU_BINARY_NAME} found: not on PATH and ${QEMU_ENV} is not set; "
        f"install QEMU >= 11.1, pass --qemu PATH, or set {QEMU_ENV} "
        "(the lab's wrapper: `luoagent lab build` prints it)"
    )


def _usable_binary(path: Path, origin: str) -> Path:
    if not path.exists():
        raise QemuNotFound(f"QEMU binary {path} ({origin}) does not exist")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise QemuNotFound(f"QEMU binary {path} ({origin}) is not an executable file")
    return path


_VERSION_RE = re.compile(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)")


def qemu_version(binary: str | os.PathLike) -> str:
    """Return QEMU's version string (e.g. ``"11.1.3"``) from ``BINARY --version``."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise QemuNotFound(f"cannot run {binary} --version: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"{binary} --version did not answer within 30 s") from exc
    match = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or not match:
        raise QemuNotFound(
            f"{binary} --version failed (exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[:300]!r}; is it a qemu-system binary?"
        )
    return match.group(1)


# ---------------------------------------------------------------------------------------
# QMP
# ---------------------------------------------------------------------------------------


class Qmp:
    """An async QMP connection (qemu.qmp.QMPClient) where every call has a timeout.

    Use ``async with await Qmp.connect(path) as q:`` or call ``await q.close()``."""

    def __init__(self, client, socket_path: Path):
        self._client = client
        self.socket_path = socket_path

    # -- connection ----------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike,
        timeout: float = 10.0,
        process: subprocess.Popen | None = None,
    ) -> "Qmp":
        """Connect to a QMP unix socket, retrying until it appears or ``timeout`` passes.

        ``process``: the QEMU being waited for; if it exits, fail at once with its status."""
        from qemu.qmp import QMPClient

        path = Path(socket_path)
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            if process is not None and process.poll() is not None:
                raise QmpUnreachable(
                    f"QEMU (pid {process.pid}) exited with status {process.returncode} before "
                    f"its QMP socket {path} answered; read its log for the reason"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if path.exists():
                client = QMPClient(f"luoagent:{path.name}")
                try:
                    await asyncio.wait_for(client.connect(str(path)), timeout=remaining)
                    return cls(client, path)
                except asyncio.TimeoutError:
                    last_error = RuntimeError(
                        "connected, but no QMP greeting came (another client may hold the monitor)"
                    )
                    await _quiet_disconnect(client)
                    break
                except Exception as exc:  # ConnectError wraps OSError / EOFError
                    last_error = exc
                    await _quiet_disconnect(client)
            await asyncio.sleep(min(0.05, max(remaining, 0)))
        why = "the socket does not exist" if not path.exists() else f"last error: {last_error}"
        raise QmpUnreachable(
            f"QMP socket {path} did not answer within {timeout:g} s ({why}); check that the "
            "QEMU is running, was started with -qmp unix:PATH,server=on,wait=off, and that "
            "no other client holds the socket"
        )

    async def close(self) -> None:
        await _quiet_disconnect(self._client)

    async def __aenter__(self) -> "Qmp":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- commands ------------------------------------------------------------------------
    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 30.0):
        """Run one QMP command; QmpCommandFailed(error_class, desc) if QEMU refuses it."""
        from qemu.qmp import ExecuteError

        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout=timeout)
        except ExecuteError as exc:
            raise QmpCommandFailed(
                f"QEMU refused {cmd}: {exc.error_class}: {exc}",
                command=cmd,
                error_class=exc.error_class,
                desc=str(exc),
            ) from exc
        except asyncio.TimeoutError as exc:
            raise QmpUnreachable(
                f"QMP command {cmd} on {self.socket_path} got no answer within {timeout:g} s; "
                "QEMU may be hung or busy"
            ) from exc
        except Exception as exc:  # ExecInterruptedError, EOFError, OSError…
            raise QmpUnreachable(
                f"QMP connection {self.socket_path} broke during {cmd}: "
                f"{type(exc).__name__}: {exc}; QEMU may have exited"
            ) from exc

    async def add_fd(self, fd: int, fdset_id: int, opaque: str | None = None, timeout: float = 10.0) -> dict:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) and put it in fdset ``fdset_id`` (``/dev/fdset/N``).

        Returns QEMU's answer ``{"fdset-id": N, "fd": M}``; M is QEMU's fd number."""
        try:
            self._client.send_fd_scm(fd)
        except Exception as exc:
            raise QmpUnreachable(f"cannot pass fd {fd} over {self.socket_path}: {exc}") from exc
        args: dict[str, Any] = {"fdset-id": int(fdset_id)}
        if opaque is not None:
            args["opaque"] = opaque
        return await self.execute("add-fd", args, timeout=timeout)

    async def status(self, timeout: float = 10.0) -> str:
        """QEMU's run state: ``running``, ``paused``, ``postmigrate``, ``inmigrate``…"""
        answer = await self.execute("query-status", timeout=timeout)
        return str(answer["status"])

    async def stop(self, timeout: float = 10.0) -> None:
        await self.execute("stop", timeout=timeout)

    async def cont(self, timeout: float = 10.0) -> None:
        await self.execute("cont", timeout=timeout)

    async def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit; the connection dropping while it does so is success."""
        with contextlib.suppress(QmpUnreachable):
            await self.execute("quit", timeout=timeout)

    # -- cpr-reboot ----------------------------------------------------------------------
    async def set_cpr_reboot(self, timeout: float = 30.0) -> None:
        """Select migration mode cpr-reboot with x-ignore-shared (harmless to a running guest)."""
        await self.execute("migrate-set-parameters", {"mode": "cpr-reboot"}, timeout=timeout)
        await self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            timeout=timeout,
        )

    async def cpr_reboot_save(self, uri: str, timeout: float = 60.0, *, configured: bool = False) -> dict:
        """Checkpoint with mode cpr-reboot + x-ignore-shared to ``uri``; wait until completed.

        ``configured``: the caller already ran set_cpr_reboot (before stopping the guest, so
        the blackout does not pay for it). Returns the final query-migrate answer;
        MigrationFailed with QEMU's error-desc."""
        started = time.monotonic()
        if not configured:
            await self.set_cpr_reboot(timeout)
        await self._start_migration("migrate", uri, "save", timeout)
        info = await self._wait_migration(uri, "save", started + timeout)
        info["luoagent-elapsed-s"] = time.monotonic() - started
        return info

    async def cpr_reboot_load(self, uri: str, timeout: float = 60.0) -> dict:
        """Load a cpr-reboot checkpoint into a QEMU started with ``-incoming defer``."""
        started = time.monotonic()
        await self.set_cpr_reboot(timeout)
        await self._start_migration("migrate-incoming", uri, "load", timeout)
        info = await self._wait_migration(uri, "load", started + timeout)
        info["luoagent-elapsed-s"] = time.monotonic() - started
        return info

    async def _start_migration(self, cmd: str, uri: str, what: str, timeout: float) -> None:
        # QEMU refuses some failures synchronously (fd access mode, path, blockers); to the
        # caller they are the same thing as a migration that fails later
        args: dict[str, Any] = {"uri": uri}
        if cmd == "migrate-incoming":
            # stay alive on a bad stream so query-migrate can tell us why (QEMU >= 9.1)
            args["exit-on-error"] = False
        try:
            try:
                await self.execute(cmd, args, timeout=timeout)
            except QmpCommandFailed as exc:
                if "exit-on-error" not in (exc.desc or ""):
                    raise
                await self.execute(cmd, {"uri": uri}, timeout=timeout)
        except QmpCommandFailed as exc:
            raise MigrationFailed(f"cpr-reboot {what} ({uri}) refused by QEMU: {exc.desc}") from exc

    async def _wait_migration(self, uri: str, what: str, deadline: float) -> dict:
        # Polling query-migrate needs no event subscription and sees a migration that ended
        # before we looked; a 5 ms period costs nothing next to the save itself.
        while True:
            remaining = deadline - time.monotonic()
            try:
                info = await self.execute("query-migrate", timeout=max(remaining, 1.0))
            except QmpUnreachable as exc:
                raise MigrationFailed(
                    f"cpr-reboot {what} via {uri}: QEMU stopped answering ({exc}); "
                    "its log says why"
                ) from exc
            state = info.get("status")
            if state == "completed":
                return dict(info)
            if state in ("failed", "cancelled"):
                raise MigrationFailed(
                    f"cpr-reboot {what} ({uri}) {state}: "
                    f"{info.get('error-desc', 'QEMU gave no reason')}"
                )
            if remaining <= 0:
                raise MigrationFailed(
                    f"cpr-reboot {what} ({uri}) did not complete in time (status {state!r})"
                )
            await asyncio.sleep(0.005)


async def _quiet_disconnect(client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), timeout=5)


def run_sync(coro):
    """Run a coroutine to completion from synchronous code (CLI, tests)."""
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------


def qmp_args(socket_path: str | os.PathLike) -> list[str]:
    return ["-qmp", f"unix:{socket_path},server=on,wait=off"]


def launch(
    binary: str | os.PathLike,
    argv: Sequence[str],
    pass_fds: Iterable[int] = (),
    qmp_socket: str | os.PathLike | None = None,
    log: str | os.PathLike | None = None,
    *,
    daemon: bool = False,
) -> subprocess.Popen:
    """Start ``binary argv...`` with ``pass_fds`` inherited at the same numbers.

    ``qmp_socket`` adds ``-qmp unix:PATH,server=on,wait=off`` (a stale socket file is removed);
    ``log`` receives QEMU's stdout+stderr; ``daemon`` puts it in its own session so it
    outlives the caller."""
    full = [str(binary), *argv]
    if qmp_socket is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_socket)
        full += qmp_args(qmp_socket)
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            full,
            pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            start_new_session=daemon,
        )
    except OSError as exc:
        raise QemuNotFound(f"cannot start {binary}: {exc}") from exc
    finally:
        if log is not None:
            out.close()


def kill_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a QEMU we started (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int) -> int:
    """Parse ``"512M"``/``"2G"``/``"1048576"`` (binary units, like QEMU's -m) into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"cannot parse size {text!r}: use a number with an optional K/M/G/T suffix")
    value = int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())
    if value <= 0:
        raise UsageError(f"size {text!r} must be greater than zero")
    return value


def ram_backend_args(
    backend_id: str,
    size: int,
    fd: int | None = None,
    *,
    fdset: int | None = None,
    machine_backend: bool = True,
) -> list[str]:
    """argv for a share=on memory-backend-file over a memfd QEMU inherits at ``fd``.

    ``fdset``: use ``mem-path=/dev/fdset/N`` instead (only when probe_cpr said
    fdset_mem_backend; QEMU 11.1.3 opens mem-path with plain open() and refuses it)."""
    if (fd is None) == (fdset is None):
        raise ValueError("give exactly one of fd or fdset")
    mem_path = f"/dev/fdset/{fdset}" if fdset is not None else f"/proc/self/fd/{fd}"
    args = ["-object", f"memory-backend-file,id={backend_id},size={int(size)},mem-path={mem_path},share=on"]
    if machine_backend:
        args += ["-machine", f"memory-backend={backend_id}"]
    return args


# ---------------------------------------------------------------------------------------
# capability probe
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CprProbe:
    """What a QEMU binary supports for a RAM-in-place live update."""

    cpr_reboot: bool
    x_ignore_shared: bool
    fdset_mem_backend: bool
    version: str
    details: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.cpr_reboot and self.x_ignore_shared


def probe_cpr(binary: str | os.PathLike, timeout: float = 30.0) -> CprProbe:
    """Start ``BINARY -machine none`` and ask it over QMP what cpr-reboot support it has."""
    version = qemu_version(binary)
    with tempfile.TemporaryDirectory(prefix="luoagent-probe-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        log = Path(tmp) / "qemu.log"
        proc = launch(
            binary,
            ["-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"],
            qmp_socket=sock,
            log=log,
        )
        try:
            return run_sync(_probe(proc, sock, version, timeout))
        except QmpUnreachable as exc:
            raise QemuError(f"probe of {binary} failed: {exc}; log: {log_tail(log)}") from exc
        finally:
            kill_process(proc)


async def _probe(proc: subprocess.Popen, sock: Path, version: str, timeout: float) -> CprProbe:
    details: dict[str, Any] = {}
    async with await Qmp.connect(sock, timeout=timeout, process=proc) as q:
        try:
            await q.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
            cpr_reboot = True
        except QmpCommandFailed as exc:
            cpr_reboot = False
            details["cpr_reboot_error"] = exc.desc
        caps = await q.execute("query-migrate-capabilities")
        names = {c["capability"] for c in caps}
        x_ignore_shared = "x-ignore-shared" in names
        details["capabilities"] = sorted(names)
        # Can RAM come from an fdset? Try it with a tiny memfd; QEMU 11.1.3 opens mem-path
        # with plain open(), so /dev/fdset/N is "No such file or directory" there.
        fd = os.memfd_create("luoagent-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * 1024 * 1024)
            added = await q.add_fd(fd, 42)
            try:
                await q.execute(
                    "object-add",
                    {
                        "qom-type": "memory-backend-file",
                        "id": "luoagent-probe",
                        "size": 2 * 1024 * 1024,
                        "mem-path": f"/dev/fdset/{added['fdset-id']}",
                        "share": True,
                    },
                )
                fdset_mem_backend = True
                with contextlib.suppress(QmpCommandFailed):
                    await q.execute("object-del", {"id": "luoagent-probe"})
            except QmpCommandFailed as exc:
                fdset_mem_backend = False
                details["fdset_mem_backend_error"] = exc.desc
        finally:
            os.close(fd)
        await q.quit()
    return CprProbe(cpr_reboot, x_ignore_shared, fdset_mem_backend, version, details)


def log_tail(path: Path, limit: int = 600) -> str:
    """The last ``limit`` characters of a QEMU log, quoted, for error messages."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return repr(text[-limit:]) if text else "(empty)"


# ---------------------------------------------------------------------------------------
# RAM backends of a running QEMU
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RamBackend:
    """One memory-backend object of a running QEMU and the fd (in QEMU) behind it."""

    id: str
    size: int
    share: bool
    mem_path: str | None
    qemu_fd: int | None
    qom_type: str = "memory-backend-file"
    #: readlink of /proc/PID/fd/qemu_fd, e.g. "/memfd:luoagent-vm-a (deleted)"
    target: str | None = None
    #: why it cannot be kept in place (None: it can)
    problem: str | None = None


_FD_PATH_RE = re.compile(r"^/(?:proc/self/fd|dev/fd)/(\d+)$")
_FDSET_PATH_RE = re.compile(r"^/dev/fdset/(\d+)$")


async def inspect_ram(pid: int, qmp: Qmp) -> list[RamBackend]:
    """Every memory backend of the QEMU at ``pid``, each with ``problem`` set if it would be
    copied by cpr-reboot (sorted by id, so token order is stable)."""
    children = await qmp.execute("qom-list", {"path": "/objects"})
    found: list[RamBackend] = []
    fdsets: list | None = None
    for child in children:
        ctype = str(child.get("type", ""))
        m = re.match(r"^child<(.+)>$", ctype)
        if not m or not m.group(1).startswith(MEMORY_BACKEND_PREFIX):
            continue
        qom_type, bid = m.group(1), child["name"]
        path = f"/objects/{bid}"
        size = int(await qmp.execute("qom-get", {"path": path, "property": "size"}))
        share = bool(await qmp.execute("qom-get", {"path": path, "property": "share"}))
        mem_path = None
        if qom_type == "memory-backend-file":
            mem_path = str(await qmp.execute("qom-get", {"path": path, "property": "mem-path"}))
        qemu_fd = target = problem = None
        if qom_type == "memory-backend-ram":
            problem = "memory-backend-ram is private anonymous memory: cpr-reboot would copy it"
        elif qom_type == "memory-backend-memfd":
            problem = (
                "memory-backend-memfd RAM is still copied by x-ignore-shared (it only skips "
                "share=on memory-backend-file); use memory-backend-file,mem-path=/proc/self/fd/N"
            )
        elif qom_type != "memory-backend-file":
            problem = f"{qom_type} is not supported; use memory-backend-file over a memfd"
        elif not share:
            problem = "share=off: QEMU maps the file privately, its RAM would be copied"
        else:
            if _FDSET_PATH_RE.match(mem_path or "") and fdsets is None:
                fdsets = await qmp.execute("query-fdsets")
            qemu_fd, problem = _resolve_mem_path(mem_path or "", fdsets or [])
            if qemu_fd is not None:
                target, problem = _check_memfd(pid, qemu_fd)
        found.append(RamBackend(bid, size, share, mem_path, qemu_fd, qom_type, target, problem))
    return sorted(found, key=lambda b: b.id)


def _resolve_mem_path(mem_path: str, fdsets: list) -> tuple[int | None, str | None]:
    """Which fd number inside QEMU a mem-path names: /proc/self/fd/N, /dev/fd/N, /dev/fdset/N."""
    m = _FD_PATH_RE.match(mem_path)
    if m:
        return int(m.group(1)), None
    m = _FDSET_PATH_RE.match(mem_path)
    if m:
        for fs in fdsets:
            if fs.get("fdset-id") == int(m.group(1)) and fs.get("fds"):
                return int(fs["fds"][0]["fd"]), None
        return None, f"mem-path {mem_path}: no such fdset in QEMU"
    return None, (
        f"mem-path {mem_path!r} is a path, not a memfd QEMU holds: its RAM could not be "
        "preserved by LUO; start QEMU with mem-path=/proc/self/fd/N over a memfd"
    )


def _check_memfd(pid: int, qemu_fd: int) -> tuple[str | None, str | None]:
    """Is fd ``qemu_fd`` of ``pid`` a file LUO can preserve: an unlinked shmem file (memfd)?

    The link name is no proof: a memfd retrieved from LUO is re-created nameless and reads
    as "/ (deleted)", so this checks what the kernel's memfd handler checks: shmem (seals
    can be queried) and no links left."""
    link = f"/proc/{pid}/fd/{qemu_fd}"
    try:
        target = os.readlink(link)
        st = os.stat(link)
        vfs = os.statvfs(link)
    except OSError as exc:
        return None, f"cannot inspect {link}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return target, f"fd {qemu_fd} in QEMU is {target!r}, not a regular memfd"
    if st.st_nlink != 0:
        return target, f"fd {qemu_fd} in QEMU is {target!r}, a linked file, not a memfd"
    try:
        probe_fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return target, f"cannot open {link} to check it is a memfd: {exc.strerror}"
    try:
        fcntl.fcntl(probe_fd, fcntl.F_GET_SEALS)
    except OSError:
        return target, f"fd {qemu_fd} in QEMU is {target!r}, a deleted file but not shmem (not a memfd)"
    finally:
        os.close(probe_fd)
    # hugetlbfs reports its huge page size as the block size; LUO refuses MFD_HUGETLB
    if vfs.f_bsize > os.sysconf("SC_PAGE_SIZE"):
        return target, "hugetlb memfd: LUO cannot preserve MFD_HUGETLB memfds"
    return target, None


async def ram_backends(pid: int, qmp: Qmp) -> list[RamBackend]:
    """The RAM backends of the QEMU at ``pid``; VmNotPreservable (naming each problem) if
    any would be copied, or if the VM has no memory backend at all."""
    backends = await inspect_ram(pid, qmp)
    bad = [b for b in backends if b.problem]
    if bad:
        raise VmNotPreservable(
            "VM RAM cannot stay in place: "
            + "; ".join(f"backend {b.id!r}: {b.problem}" for b in bad)
        )
    if not backends:
        raise VmNotPreservable(
            "VM has no memory-backend object: its RAM is private and would be copied; start "
            "it with -object memory-backend-file,...,share=on -machine memory-backend=ID"
        )
    return backends


def steal_fd(pid: int, fd: int) -> int:
    """Duplicate fd ``fd`` of process ``pid`` into this process (pidfd_getfd); same open file."""
    try:
        from luoagent._luo_shim import lib
    except ImportError as exc:
        raise QemuError(
            f"cannot take fd {fd} from pid {pid}: the luoagent C shim is not built ({exc}); "
            "reinstall with `pip install -e .`"
        ) from exc
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise QemuError(f"pidfd_open({pid}) failed: {exc.strerror}; is QEMU still running?") from exc
    try:
        got = lib.sys_pidfd_getfd(pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if got < 0:
        err = -got
        hint = " (need root or ptrace access to QEMU)" if err == errno.EPERM else ""
        raise QemuError(f"pidfd_getfd(pid {pid}, fd {fd}) failed: {os.strerror(err)}{hint}")
    return got
