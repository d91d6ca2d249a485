"""Lab scenario multihop: one memfd carried across three consecutive kexecs (four stages).

Each hop retrieves it, checks size/offset/SHA-256, writes a new 4 KiB pattern (so every hop's
data is new), finishes the incoming session and re-preserves the same file in a new session."""

from __future__ import annotations

import os
import secrets

from luoagent import memfd
from luoagent.luo import LiveUpdate

NAME = "multihop"
DESCRIPTION = "the same 8 MiB memfd re-preserved across 3 kexecs; content checked at every hop"
MEMORY = "1G"
SLOW = False

KEY = "multihop"
HOPS = 3
SIZE = 8 * 1024 * 1024
TOKEN = 42
STAMP = 4096  # bytes each hop writes at its own offset


def _session(hop: int) -> str:
    # One name per hop: the session a hop retrieves and the one it creates must not be confused.
    return f"lab/multihop/hop{hop}"


def _stamp(ctx, fd: int, st: dict, hop: int) -> None:
    """Write this hop's pattern, set the offset, record the expected state, preserve for the next hop."""
    offset = hop * 1024 * 1024 + 123
    memfd.write_pattern(fd, offset, STAMP, st["seed"] + hop)
    st["stamps"].append([offset, st["seed"] + hop])
    st["sha256"] = memfd.sha256(fd)
    st["offset"] = 1000 + hop
    os.lseek(fd, st["offset"], os.SEEK_SET)
    st["boot_id"] = ctx.boot_id
    with LiveUpdate.open() as lu:
        session = lu.create_session(_session(hop))
        session.preserve(fd, TOKEN)
        ctx.keep.extend([session, fd])
    ctx.diag(f"hop {hop}: stamped at {offset}, sha256 {st['sha256']}")
    ctx.ok(f"hop {hop}: memfd preserved in a new session")


def _make_stage(hop: int):
    def stage(ctx) -> None:
        if hop == 0:
            st = ctx.state.setdefault(KEY, {"seed": secrets.randbits(48), "stamps": []})
            fd = memfd.create("lab-multihop", SIZE)
            memfd.fill_random(fd, SIZE, st["seed"])
            _stamp(ctx, fd, st, hop)
            return
        st = ctx.state[KEY]
        ctx.check(ctx.boot_id != st["boot_id"], f"hop {hop}: a new kernel booted since preserve",
                  f"boot id still {ctx.boot_id}")
        with LiveUpdate.open() as lu:
            session = lu.retrieve_session(_session(hop - 1))
        try:
            fd = session.retrieve(TOKEN)
            offset = os.lseek(fd, 0, os.SEEK_CUR)
            ctx.check(offset == st["offset"], f"hop {hop}: file offset kept", f"offset {offset}, want {st['offset']}")
            size = memfd.size(fd)
            ctx.check(size == SIZE, f"hop {hop}: size kept", f"size {size}, want {SIZE}")
            digest = memfd.sha256(fd)
            ctx.check(digest == st["sha256"], f"hop {hop}: SHA-256 kept", f"sha256 {digest}, want {st['sha256']}")
            stamps = all(memfd.verify_pattern(fd, off, STAMP, seed) for off, seed in st["stamps"])
            ctx.check(stamps, f"hop {hop}: every earlier hop's stamp is there", f"stamps {st['stamps']}")
            # Finish first: until then the kernel still counts the file as preserved (EBUSY).
            session.finish()
        finally:
            session.close()
        if hop < HOPS:
            _stamp(ctx, fd, st, hop)
        else:
            os.close(fd)
    stage.__name__ = f"hop{hop}"
    stage.__qualname__ = stage.__name__
    return stage


def stages():
    return [_make_stage(hop) for hop in range(HOPS + 1)]
