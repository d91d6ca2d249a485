"""/proc and pidfd helpers: who holds a file open, what an fd points at, a process's argv, its
executable and identity as the kernel reports them, who serves a unix socket (SO_PEERCRED),
and taking a copy of another process's fd (pidfd_getfd)."""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from luoagent.errors import QemuError, QmpUnreachable


@dataclass(frozen=True)
class Holder:
    """One open file descriptor of a process on some file."""

    pid: int
    fd: int
    cmdline: str


def cmdline(pid: int, proc: Path = Path("/proc")) -> str:
    """The command line of ``pid`` as one string ('' once it has exited or for kernel threads)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)


def argv(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """The argument vector of ``pid`` (arguments kept apart); OSError once it has exited."""
    parts = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    if parts[-1] == b"":
        parts.pop()  # the NUL that ends the last argument
    return [part.decode(errors="surrogateescape") for part in parts]


def exe(pid: int, proc: Path = Path("/proc")) -> str:
    """The file the kernel is running as ``pid`` (/proc/PID/exe; a process cannot rewrite it as
    it can its cmdline). A binary replaced on disk since shows as 'PATH (deleted)': PATH is
    returned, and names the file that is there now. OSError once it has exited."""
    target = os.readlink(proc / str(pid) / "exe")
    return target[: -len(" (deleted)")] if target.endswith(" (deleted)") else target


def mapped_executables(pid: int, proc: Path = Path("/proc")) -> list[str]:
    """Files mapped executable into ``pid`` (from /proc/PID/maps), in map order."""
    found: list[str] = []
    for line in (proc / str(pid) / "maps").read_text().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and "x" in fields[1] and fields[5].startswith("/"):
            path = fields[5].removesuffix(" (deleted)")
            if path not in found:
                found.append(path)
    return found


def identity(pid: int, proc: Path = Path("/proc")) -> tuple[int, int]:
    """(effective uid, effective gid) of ``pid`` from /proc/PID/status; OSError once it exited."""
    uid = gid = None
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[2])
        elif line.startswith("Gid:"):
            gid = int(line.split()[2])
    if uid is None or gid is None:
        raise OSError(f"/proc/{pid}/status has no Uid/Gid lines")
    return uid, gid


def fd_target(pid: int, fd: int, proc: Path = Path("/proc")) -> str | None:
    """Where /proc/PID/fd/FD points (e.g. '/dev/liveupdate', '/memfd:x (deleted)'), or None."""
    try:
        return os.readlink(proc / str(pid) / "fd" / str(fd))
    except OSError:
        return None


def holders(path: str, proc: Path = Path("/proc")) -> list[Holder]:
    """Every (pid, fd) with ``path`` open, found by scanning /proc/*/fd (needs root to see all)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(entry / "fd")
        except OSError:  # exited, or not ours to look at
            continue
        for fd in fds:
            if fd_target(int(entry.name), int(fd), proc) == path:
                found.append(Holder(int(entry.name), int(fd), cmdline(int(entry.name), proc)))
    return found


def pid_alive(pid: int, proc: Path = Path("/proc")) -> bool:
    """True if process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists; it is just not ours to signal
    try:
        with open(proc / str(pid) / "stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def start_time(pid: int, proc: Path = Path("/proc")) -> int:
    """When ``pid`` started (clock ticks since boot, /proc/PID/stat field 22): with the pid it
    names one process for this boot, even after the pid is reused; 0 if it is gone."""
    try:
        with open(proc / str(pid) / "stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def peer_pid(sock_path: Path, timeout: float = 5.0) -> int:
    """PID of the process serving a unix socket (SO_PEERCRED), i.e. the QEMU behind a QMP socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock_path))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError as exc:
        raise QmpUnreachable(
            f"QMP socket {sock_path} is unreachable ({exc.strerror or exc}); is the VM running? "
            "(`luoagent vm list`)"
        ) from None
    finally:
        s.close()
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


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
