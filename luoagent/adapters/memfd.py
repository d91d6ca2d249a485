"""memfd helpers: create, size, map, seal, reopen with another access mode, fill and verify
deterministic patterns, and a fast streaming SHA-256 that skips holes without changing the digest."""

from __future__ import annotations

import errno as E
import fcntl
import hashlib
import mmap
import os
import random

from luoagent.errors import MemfdError

SEAL_SEAL = fcntl.F_SEAL_SEAL
SEAL_SHRINK = fcntl.F_SEAL_SHRINK
SEAL_GROW = fcntl.F_SEAL_GROW
SEAL_WRITE = fcntl.F_SEAL_WRITE
SEAL_FUTURE_WRITE = 0x0010  # linux/fcntl.h; Python's fcntl does not name it
SEAL_EXEC = 0x0020  # linux/fcntl.h (6.3+); LUO 7.2 preserves it too
SEAL_NAMES = {SEAL_SEAL: "seal", SEAL_SHRINK: "shrink", SEAL_GROW: "grow",
              SEAL_WRITE: "write", SEAL_FUTURE_WRITE: "future_write", SEAL_EXEC: "exec"}

# Patterns are generated per block so any (offset, length) can be produced or checked alone.
PATTERN_BLOCK = 1 << 20
CHUNK = 4 << 20  # I/O and hashing granularity: big enough for syscall cost to vanish
_ZEROS = memoryview(bytes(CHUNK))


def _fail(what: str, exc: OSError, fix: str = "") -> MemfdError:
    msg = f"{what}: {os.strerror(exc.errno)} ({E.errorcode.get(exc.errno, exc.errno)})"
    return MemfdError(msg + (f"; {fix}" if fix else ""))


def create(name: str, size: int = 0, *, sealing: bool = False, hugetlb: bool = False) -> int:
    """Create a memfd (close-on-exec) of ``size`` bytes (a hole until written); return its fd."""
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0) | (os.MFD_HUGETLB if hugetlb else 0)
    try:
        fd = os.memfd_create(name, flags)
    except OSError as exc:
        fix = "configure huge pages (vm.nr_hugepages)" if hugetlb else "use a name of at most 249 bytes"
        raise _fail(f"memfd_create({name!r})", exc, fix) from None
    if size:
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            os.close(fd)
            fix = "hugetlb sizes must be multiples of the huge page size" if hugetlb else "check free memory/limits"
            raise _fail(f"sizing memfd {name!r} to {size} bytes", exc, fix) from None
    return fd


def size(fd: int) -> int:
    """Current size of the file in bytes."""
    return os.fstat(fd).st_size


def resize(fd: int, new_size: int) -> None:
    try:
        os.ftruncate(fd, new_size)
    except OSError as exc:
        raise _fail(f"resizing fd {fd} to {new_size}", exc, "a seal may forbid it (see seals())") from None


def map(fd: int, length: int | None = None, *, write: bool = True) -> mmap.mmap:  # noqa: A001
    """Map the file shared (writes reach the memfd); ``length`` defaults to its size."""
    length = size(fd) if length is None else length
    try:
        return mmap.mmap(fd, length, mmap.MAP_SHARED,
                         mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))
    except OSError as exc:
        raise _fail(f"mapping fd {fd} ({length} bytes)", exc, "the fd's access mode or a write seal may forbid it") from None


def seal(fd: int, seals: int) -> None:
    """Add ``seals`` (SEAL_* bits OR-ed); needs a memfd created with sealing=True."""
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError as exc:
        fix = ("create the memfd with sealing=True, or SEAL_SEAL is already set" if exc.errno == E.EPERM
               else "SEAL_WRITE needs no writable shared mapping to exist" if exc.errno == E.EBUSY else "")
        raise _fail(f"adding seals {seal_names(seals)} to fd {fd}", exc, fix) from None


def seals(fd: int) -> int:
    """The seals set on the file (0 when none)."""
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:
        raise _fail(f"reading seals of fd {fd}", exc, "only memfds and shmem files carry seals") from None


def seal_names(value: int) -> list[str]:
    return [n for bit, n in SEAL_NAMES.items() if value & bit] + ([hex(value & ~sum(SEAL_NAMES))]
                                                                   if value & ~sum(SEAL_NAMES) else [])


def reopen(fd: int, flags: int) -> int:
    """Open the same file again with another access mode (e.g. os.O_WRONLY) via /proc/self/fd.

    The result is a new open file description (own offset and mode) on the same inode, which is
    what QEMU's fdsets need: an exact O_WRONLY fd to save vmstate and an O_RDONLY one to load.
    """
    path = f"/proc/self/fd/{fd}"
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        fix = "mount /proc (e.g. inside a chroot)" if exc.errno == E.ENOENT and not os.path.exists("/proc/self") else ""
        raise _fail(f"reopening {path} with flags {flags:#o}", exc, fix) from None


# --- patterns --------------------------------------------------------------------------
def _pattern_block(seed: int, index: int) -> bytes:
    return random.Random(f"luoagent:{seed}:{index}").randbytes(PATTERN_BLOCK)


def pattern(offset: int, length: int, seed: int) -> bytes:
    """The bytes of pattern ``seed`` at file positions [offset, offset+length)."""
    out = bytearray()
    pos, end = offset, offset + length
    while pos < end:
        index, skip = divmod(pos, PATTERN_BLOCK)
        take = min(PATTERN_BLOCK - skip, end - pos)
        out += _pattern_block(seed, index)[skip:skip + take]
        pos += take
    return bytes(out)


def _spans(offset: int, length: int):
    """Split [offset, offset+length) at PATTERN_BLOCK boundaries into (pos, len) pieces."""
    pos, end = offset, offset + length
    while pos < end:
        take = min(PATTERN_BLOCK - pos % PATTERN_BLOCK, end - pos)
        yield pos, take
        pos += take


def write_pattern(fd: int, offset: int, length: int, seed: int) -> None:
    """Write pattern ``seed`` at [offset, offset+length); the bytes depend on position, so a
    block that moved or was swapped with another is detected by verify_pattern."""
    for pos, take in _spans(offset, length):
        data = pattern(pos, take, seed)
        done = 0
        while done < take:
            try:
                done += os.pwrite(fd, data[done:], pos + done)
            except OSError as exc:
                raise _fail(f"writing pattern at offset {pos + done} of fd {fd}", exc,
                            "the fd must be writable and not write-sealed") from None


def verify_pattern(fd: int, offset: int, length: int, seed: int) -> bool:
    """True if [offset, offset+length) holds exactly pattern ``seed``."""
    for pos, take in _spans(offset, length):
        try:
            got = os.pread(fd, take, pos)
        except OSError as exc:
            raise _fail(f"reading fd {fd} at offset {pos}", exc, "the fd must be readable") from None
        if got != pattern(pos, take, seed):
            return False
    return True


def fill_random(fd: int, size_bytes: int, seed: int) -> None:
    """Make the file ``size_bytes`` long and fill all of it with pattern ``seed``."""
    if size(fd) != size_bytes:
        resize(fd, size_bytes)
    write_pattern(fd, 0, size_bytes, seed)


# --- hashing ---------------------------------------------------------------------------
def data_extents(fd: int, length: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) of the file's data regions; everything between them is a hole.

    SEEK_DATA/SEEK_HOLE move the file offset; it is put back, because LUO preserves it."""
    length = size(fd) if length is None else length
    saved = os.lseek(fd, 0, os.SEEK_CUR)
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < length:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == E.ENXIO:  # no data after pos: the rest is a hole
                    break
                if exc.errno == E.EINVAL:  # filesystem without SEEK_DATA: treat it all as data
                    extents.append((pos, length))
                    break
                raise
            if start >= length:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), length)
            extents.append((start, end))
            pos = end
    finally:
        os.lseek(fd, saved, os.SEEK_SET)
    return extents


def sha256(fd: int) -> str:
    """Hex SHA-256 of the whole file, identical to hashing every byte, but holes are never read:
    their zeros come from one shared buffer, so a sparse GiB costs only the hash arithmetic.
    Uses pread, so the fd's file offset is left alone."""
    digest = hashlib.sha256()
    total = size(fd)
    buf = bytearray(CHUNK)
    view = memoryview(buf)

    def zeros(n: int) -> None:
        while n:
            step = min(n, CHUNK)
            digest.update(_ZEROS[:step])
            n -= step

    pos = 0
    # data_extents() walks with lseek(SEEK_DATA/SEEK_HOLE), which moves the file offset; LUO
    # preserves that offset, so callers must see it unchanged after hashing.
    saved_offset = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        for start, end in data_extents(fd, total):
            zeros(start - pos)
            pos = start
            while pos < end:
                got = os.preadv(fd, [view[:min(CHUNK, end - pos)]], pos)
                if got == 0:  # file shrank under us
                    raise MemfdError(f"fd {fd} shrank while hashing (at offset {pos}); seal it first")
                digest.update(view[:got])
                pos += got
    except OSError as exc:
        raise _fail(f"hashing fd {fd}", exc, "the fd must be readable") from None
    finally:
        os.lseek(fd, saved_offset, os.SEEK_SET)
    zeros(total - pos)
    return digest.hexdigest()
