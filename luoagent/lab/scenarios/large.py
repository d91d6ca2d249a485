"""Lab scenario large: a 512 MiB random memfd in a 3 GiB lab VM, hash-verified across one kexec.

Prints how long fill, hash, preserve, retrieve and finish took as KTAP diag lines, also in the
machine-readable form ``# metric <name>=<value> <unit>`` (benchmarks parse these; nothing asserts them)."""

from __future__ import annotations

import os
import secrets
import time

from luoagent import memfd
from luoagent.luo import LiveUpdate
from luoagent.lab.scenarios._common import check_new_boot

NAME = "large"
DESCRIPTION = "512 MiB random memfd in a 3 GiB VM: SHA-256 equal after kexec; prints timings"
MEMORY = "3G"
SLOW = False

KEY = "large"
SESSION = "lab/large"
TOKEN = 1
SIZE = 512 * 1024 * 1024
OFFSET = SIZE // 3


def _metric(ctx, name: str, seconds: float, nbytes: int | None = None) -> None:
    ctx.diag(f"metric large.{name}={seconds:.3f} s")
    if nbytes:
        ctx.diag(f"metric large.{name}_rate={nbytes / seconds / 2**20:.1f} MiB/s")


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def stage_preserve(ctx) -> None:
    st = ctx.state.setdefault(KEY, {})
    total = _mem_total()
    # MemTotal excludes what the kernel reserved at boot, so 2 GiB of it needs MEMORY > 2G.
    ctx.check(total >= 2 * 2**30, "the lab VM has at least 2 GiB of RAM", f"MemTotal {total} bytes")
    seed = secrets.randbits(63)
    fd = memfd.create("lab-large", SIZE)
    _, t_fill = _timed(memfd.fill_random, fd, SIZE, seed)
    _metric(ctx, "fill", t_fill, SIZE)
    digest, t_hash = _timed(memfd.sha256, fd)
    _metric(ctx, "hash_before", t_hash, SIZE)
    os.lseek(fd, OFFSET, os.SEEK_SET)
    st.update(sha256=digest, seed=seed, boot_id=ctx.boot_id)
    ctx.diag(f"memfd of {SIZE} bytes, sha256 {digest}")

    with LiveUpdate.open() as lu:
        session = lu.create_session(SESSION)
        ctx.keep.append(session)
        _, t_preserve = _timed(session.preserve, fd, TOKEN)
        ctx.keep.append(fd)
    _metric(ctx, "preserve", t_preserve, SIZE)
    ctx.ok(f"preserved a {SIZE >> 20} MiB memfd")


def stage_verify(ctx) -> None:
    st = ctx.state[KEY]
    check_new_boot(ctx, st)
    with LiveUpdate.open() as lu:
        session, t_session = _timed(lu.retrieve_session, SESSION)
    _metric(ctx, "retrieve_session", t_session)
    try:
        fd, t_retrieve = _timed(session.retrieve, TOKEN)
        _metric(ctx, "retrieve", t_retrieve, SIZE)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        ctx.check(offset == OFFSET, "retrieved memfd keeps its file offset", f"offset {offset}, want {OFFSET}")
        size = memfd.size(fd)
        ctx.check(size == SIZE, "retrieved memfd keeps its size", f"size {size}, want {SIZE}")
        digest, t_hash = _timed(memfd.sha256, fd)
        _metric(ctx, "hash_after", t_hash, SIZE)
        ctx.check(digest == st["sha256"], "retrieved memfd has the SHA-256 it had before kexec",
                  f"sha256 {digest}, want {st['sha256']}")
        os.close(fd)
        _, t_finish = _timed(session.finish)
        _metric(ctx, "finish", t_finish)
    finally:
        session.close()


def stages():
    return [stage_preserve, stage_verify]
