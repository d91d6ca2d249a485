"""Lab scenario cross-version: a memfd preserved under the 7.2 lab kernel, retrieved under 7.3.

Needs the runner to kexec into another kernel between stages (``KERNELS`` names the kernel
series each stage must run on); it checks the release it runs on instead of trusting that."""

from __future__ import annotations

import os
import secrets

from luoagent import memfd
from luoagent.luo import LiveUpdate

NAME = "cross-version"
DESCRIPTION = "memfd preserved on the 7.2 lab kernel, retrieved intact on the 7.3 lab kernel"
MEMORY = "1G"
SLOW = True
#: kernel series per stage: stage i must run on KERNELS[i] (the runner kexecs into it)
KERNELS = ("7.2", "7.3")

KEY = "cross-version"
SESSION = "lab/cross-version"
TOKEN = 73
SIZE = 4 * 1024 * 1024
OFFSET = 4321


def _on_series(ctx, series: str) -> bool:
    release = os.uname().release
    return ctx.check(release == series or release.startswith(series + "."),
                     f"stage {ctx.stage} runs on a {series} kernel", f"running {release}")


def stage_preserve(ctx) -> None:
    _on_series(ctx, KERNELS[0])
    st = ctx.state.setdefault(KEY, {"seed": secrets.randbits(48), "release": os.uname().release})
    fd = memfd.create("lab-cross-version", SIZE)
    memfd.fill_random(fd, SIZE, st["seed"])
    st["sha256"] = memfd.sha256(fd)
    os.lseek(fd, OFFSET, os.SEEK_SET)
    with LiveUpdate.open() as lu:
        session = lu.create_session(SESSION)
        session.preserve(fd, TOKEN)
        ctx.keep.extend([session, fd])
    ctx.diag(f"preserved on {st['release']}, sha256 {st['sha256']}")
    ctx.ok(f"memfd preserved on the {KERNELS[0]} kernel")


def stage_retrieve(ctx) -> None:
    st = ctx.state[KEY]
    _on_series(ctx, KERNELS[1])
    with LiveUpdate.open() as lu:
        session = lu.retrieve_session(SESSION)
    try:
        fd = session.retrieve(TOKEN)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        ctx.check(offset == OFFSET, "file offset kept across versions", f"offset {offset}, want {OFFSET}")
        size = memfd.size(fd)
        ctx.check(size == SIZE, "size kept across versions", f"size {size}, want {SIZE}")
        digest = memfd.sha256(fd)
        ctx.check(digest == st["sha256"], "SHA-256 kept across versions",
                  f"sha256 {digest} on {os.uname().release}, want {st['sha256']} from {st['release']}")
        os.close(fd)
        session.finish()
    finally:
        session.close()


def stages():
    return [stage_preserve, stage_retrieve]
