"""Files and directories only root can read: created 0600 / 0700 by the syscall that makes
them (never chmod'ed afterwards), for guest RAM, vmstate, argv (secrets) and records.

A file that already exists is replaced through a private temporary file, so no reader can
hold it open at a wider mode; directories that already exist are left as they are. Also the
private lock file that keeps two runs of one verb apart (exclusive_lock)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

#: the modes everything holding guest data or a QEMU argv is created with
FILE_MODE = 0o600
DIR_MODE = 0o700


def makedirs(path: str | os.PathLike) -> Path:
    """Create ``path`` and any missing parents with mode 0700 (existing ones are kept)."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)  # the umask can only narrow 0700
        except FileExistsError:
            pass
    return path


def mkdir(path: str | os.PathLike) -> Path:
    """Create one new directory 0700 (parents 0700 too); FileExistsError if it exists."""
    path = Path(path)
    makedirs(path.parent)
    os.mkdir(path, DIR_MODE)
    return path


def open_new(path: str | os.PathLike) -> int:
    """A new file opened write-only with mode 0600 (O_EXCL: never an existing file or a symlink)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)


def open_append(path: str | os.PathLike) -> int:
    """Open a log for appending; a new one is created 0600 (an existing one keeps its mode)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)


def write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``path`` atomically as a 0600 file (a private temporary file renamed over it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_new(tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    return path


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    return write_bytes(path, text.encode(), fsync=fsync)


class Busy(Exception):
    """The lock is held by another process (its pid, when it wrote one)."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by pid {holder or '?'}")
        self.path, self.holder = path, holder


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created 0600; our pid written into it) for the
    block; Busy at once if another process holds it. The kernel drops it when we exit, even
    by SIGKILL, so a killed run never leaves a stale lock."""
    path = Path(path)
    makedirs(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(path, os.pread(fd, 32, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
