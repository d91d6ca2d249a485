"""Lab scenario memfd-basic: one session, one 4 MiB memfd of random bytes, across one real kexec.

After kexec the retrieved memfd must have the same size, file offset and SHA-256; the debug
switch ``corrupt`` flips one byte after preserve so the hash check goes red (failures are real)."""

from __future__ import annotations

import os
import secrets

from luoagent import memfd
from luoagent.luo import LiveUpdate
from luoagent.lab.scenarios._common import check_new_boot

NAME = "memfd-basic"
DESCRIPTION = "one 4 MiB random memfd in one session: size, file offset and SHA-256 survive kexec"
MEMORY = "1G"
SLOW = False

SESSION = "lab/memfd-basic"
TOKEN = 0x4D454D4644  # "MEMFD": any u64 works; a distinctive one shows up in traces
SIZE = 4 * 1024 * 1024
OFFSET = 1_234_567  # an odd, mid-file position so a reset to 0 or EOF cannot pass
KEY = "memfd-basic"

#: KTAP descriptions the host-side tests look up by name
HASH_CHECK = "retrieved memfd has the SHA-256 it had before kexec"


def stage_preserve(ctx) -> None:
    st = ctx.state.setdefault(KEY, {})
    seed = secrets.randbits(63)
    fd = memfd.create("lab-basic", SIZE)
    memfd.fill_random(fd, SIZE, seed)
    digest = memfd.sha256(fd)
    # Set the offset after hashing: the offset is part of what must cross, whatever hashing does.
    os.lseek(fd, OFFSET, os.SEEK_SET)
    st.update(sha256=digest, size=SIZE, offset=OFFSET, seed=seed, boot_id=ctx.boot_id)
    ctx.diag(f"memfd of {SIZE} bytes, seed {seed}, sha256 {digest}, offset {OFFSET}")

    with LiveUpdate.open() as lu:
        session = lu.create_session(SESSION)
        session.preserve(fd, TOKEN)
        ctx.keep.extend([session, fd])  # the session must stay open until kexec
        ctx.check(session.name == SESSION, "GET_NAME returns the session's name",
                  f"got {session.name!r}, want {SESSION!r}")

    if ctx.debug.get("corrupt"):
        # Pages are pinned at preserve, not copied: a write now still reaches the next kernel.
        where = secrets.randbelow(SIZE)
        old = os.pread(fd, 1, where)
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), where)
        st["corrupted_at"] = where
        st["corrupted_to"] = old[0] ^ 0xFF
        ctx.diag(f"debug corrupt: flipped byte {where} ({old[0]:#04x} -> {old[0] ^ 0xFF:#04x}) after preserve")


def stage_verify(ctx) -> None:
    st = ctx.state[KEY]
    check_new_boot(ctx, st)
    with LiveUpdate.open() as lu:
        session = lu.retrieve_session(SESSION)
        fd = session.retrieve(TOKEN)
    try:
        # Offset first: nothing else may touch it before it is read back.
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        ctx.check(offset == st["offset"], "retrieved memfd keeps its file offset",
                  f"offset {offset}, want {st['offset']}")
        size = memfd.size(fd)
        ctx.check(size == st["size"], "retrieved memfd keeps its size", f"size {size}, want {st['size']}")
        digest = memfd.sha256(fd)
        diag = f"sha256 {digest}, want {st['sha256']}"
        if "corrupted_at" in st:
            diag += f" (debug corrupt flipped byte {st['corrupted_at']} before kexec)"
        ctx.check(digest == st["sha256"], HASH_CHECK, diag)
        if "corrupted_at" in st:
            now = os.pread(fd, 1, st["corrupted_at"])[0]
            ctx.diag(f"debug corrupt: byte {st['corrupted_at']} is {now:#04x} after kexec "
                     f"(flipped value {st['corrupted_to']:#04x}: a write after preserve crosses kexec)")
        session.finish()
    finally:
        session.close()
        os.close(fd)


def stages():
    return [stage_preserve, stage_verify]
