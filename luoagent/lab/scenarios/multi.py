"""Lab scenario multi: several sessions (one empty) holding several kinds of memfd across one kexec.

Covers a zero-size memfd, a sparse one (holes), a fully sealed one, the largest token and file
offsets at, inside and beyond EOF; every file is checked after kexec and every session finished."""

from __future__ import annotations

import errno
import fcntl
import os
import secrets

from luoagent import memfd
from luoagent.luo import LiveUpdate
from luoagent.lab.scenarios._common import check_new_boot

NAME = "multi"
DESCRIPTION = "3 sessions (one empty), 6 memfds: zero-size, sparse, sealed, max token; all verified"
MEMORY = "1G"
SLOW = False

KEY = "multi"
EMPTY_SESSION = "lab/multi/empty"
KiB, MiB = 1024, 1024 * 1024

# Every seal memfd_luo knows (MEMFD_LUO_ALL_SEALS in include/linux/kho/abi/memfd.h, 7.2):
# a memfd carrying any other seal is refused at preserve.
# (Python's fcntl may lack the two newest; their values are uAPI: include/uapi/linux/fcntl.h.)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
F_SEAL_EXEC = getattr(fcntl, "F_SEAL_EXEC", 0x0020)
ALL_KNOWN_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                   | fcntl.F_SEAL_WRITE | F_SEAL_FUTURE_WRITE | F_SEAL_EXEC)

# Sparse file: data only in these (offset, length) extents; the rest are holes the kernel fills.
SPARSE_SIZE = 16 * MiB
SPARSE_EXTENTS = ((0, 4 * KiB), (5 * MiB, 64 * KiB), (SPARSE_SIZE - 4 * KiB, 4 * KiB))

# (session, token, label, size, offset, kind)
FILES = (
    ("lab/multi/a", 1, "random-1m", 1 * MiB, 777, "random"),
    ("lab/multi/a", 2, "zero-size", 0, 100, "empty"),          # offset beyond EOF is legal
    ("lab/multi/a", 3, "sparse-16m", SPARSE_SIZE, 5 * MiB, "sparse"),
    ("lab/multi/b", 10, "sealed-256k", 256 * KiB, 4 * KiB, "sealed"),
    ("lab/multi/b", 11, "random-2m", 2 * MiB, 2 * MiB, "random"),  # offset exactly at EOF
    ("lab/multi/b", 2**64 - 1, "max-token", 64 * KiB, 0, "random"),
)
SESSIONS = (EMPTY_SESSION, "lab/multi/a", "lab/multi/b")


def _make(label: str, size: int, kind: str, seed: int) -> int:
    fd = memfd.create(f"lab-multi-{label}", size, sealing=(kind == "sealed"))
    if kind in ("random", "sealed"):
        memfd.fill_random(fd, size, seed)
    elif kind == "sparse":
        for i, (off, length) in enumerate(SPARSE_EXTENTS):
            memfd.write_pattern(fd, off, length, seed + i)
    if kind == "sealed":
        memfd.seal(fd, ALL_KNOWN_SEALS)
    return fd


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def stage_preserve(ctx) -> None:
    st = ctx.state.setdefault(KEY, {"boot_id": ctx.boot_id, "files": []})
    fds = {}
    for session_name, token, label, size, offset, kind in FILES:
        seed = secrets.randbits(48)
        fd = _make(label, size, kind, seed)
        st["files"].append({
            "session": session_name, "token": token, "label": label, "kind": kind, "seed": seed,
            "size": size, "offset": offset, "sha256": memfd.sha256(fd), "seals": memfd.seals(fd),
        })
        os.lseek(fd, offset, os.SEEK_SET)
        fds[label] = fd

    sealed = next(f for f in st["files"] if f["kind"] == "sealed")
    ctx.check(sealed["seals"] == ALL_KNOWN_SEALS, "sealed memfd carries every seal LUO knows before kexec",
              f"seals {sealed['seals']:#x}, want {ALL_KNOWN_SEALS:#x}")
    sparse_fd = fds["sparse-16m"]
    before = _allocated(sparse_fd)

    with LiveUpdate.open() as lu:
        sessions = {name: lu.create_session(name) for name in SESSIONS}
        ctx.keep.extend(sessions.values())
        for f in st["files"]:
            sessions[f["session"]].preserve(fds[f["label"]], f["token"])
        ctx.keep.extend(fds.values())
        names = {name: s.name for name, s in sessions.items()}
        ctx.check(all(k == v for k, v in names.items()), "every session reports its own name (GET_NAME)",
                  f"names {names}")
    ctx.diag(f"sparse memfd: {before} bytes allocated before preserve, {_allocated(sparse_fd)} after "
             "(preserve fills holes)")


def stage_verify(ctx) -> None:
    st = ctx.state[KEY]
    check_new_boot(ctx, st)
    with LiveUpdate.open() as lu:
        sessions = {name: lu.retrieve_session(name) for name in SESSIONS}
    try:
        for f in st["files"]:
            fd = sessions[f["session"]].retrieve(f["token"])
            try:
                _verify_file(ctx, fd, f)
            finally:
                os.close(fd)
        for name, session in sessions.items():
            session.finish()
            ctx.ok(f"session {name} finished")
    finally:
        for session in sessions.values():
            session.close()


def _verify_file(ctx, fd: int, f: dict) -> None:
    what = f"{f['label']} (token {f['token']:#x})"
    offset = os.lseek(fd, 0, os.SEEK_CUR)
    ctx.check(offset == f["offset"], f"{what}: file offset kept", f"offset {offset}, want {f['offset']}")
    size = memfd.size(fd)
    ctx.check(size == f["size"], f"{what}: size kept", f"size {size}, want {f['size']}")
    seals = memfd.seals(fd)
    ctx.check(seals == f["seals"], f"{what}: seals kept", f"seals {seals:#x}, want {f['seals']:#x}")
    digest = memfd.sha256(fd)
    ctx.check(digest == f["sha256"], f"{what}: SHA-256 kept", f"sha256 {digest}, want {f['sha256']}")
    if f["kind"] == "sparse":
        good = all(memfd.verify_pattern(fd, off, length, f["seed"] + i)
                   for i, (off, length) in enumerate(SPARSE_EXTENTS))
        ctx.check(good, f"{what}: data extents hold their patterns", "a pattern differs")
    if f["kind"] == "sealed":
        try:
            os.pwrite(fd, b"x", 0)
            refused = None
        except OSError as exc:
            refused = exc.errno
        ctx.check(refused == errno.EPERM, f"{what}: write refused by the restored F_SEAL_WRITE",
                  f"pwrite result: {errno.errorcode.get(refused, 'succeeded') if refused else 'succeeded'}")


def stages():
    return [stage_preserve, stage_verify]
