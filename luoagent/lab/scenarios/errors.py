"""Lab scenario errors: every refusal of the LUO API on a real kernel, before and after one kexec.

Each expectation checks the kernel's errno, luoagent's exception type and a key phrase of the
message; name validation is shown to happen before any ioctl (no errno, no fd, no session)."""

from __future__ import annotations

import errno as E
import os
import subprocess
import sys
import tempfile

from luoagent import errors, memfd
from luoagent.luo import LiveUpdate
from luoagent.lab.scenarios._common import check_new_boot

NAME = "errors"
DESCRIPTION = "EBUSY open, duplicate name/token/file, unpreservable fds, bad names, unknown session/token"
MEMORY = "1G"
SLOW = False

KEY = "errors"
KEPT = "lab/errors/kept"       # crosses kexec: one memfd under TOKEN
DUP = "lab/errors/dup"
OTHER = "lab/errors/other"
TOKEN = 1
UNKNOWN_TOKEN = 0xDEAD
TOO_LONG = "x" * 64             # 64 bytes: no room for the NUL the kernel needs
PREFIX_63 = TOO_LONG[:63]       # what a truncating implementation would have created
LONGEST_OK = "y" * 63
HUGEPAGES = "/proc/sys/vm/nr_hugepages"
HUGE_PAGE = 2 * 1024 * 1024

# Child that opens /dev/liveupdate, says so, and holds it until killed.
_HOLDER = ("import os, sys, time\n"
           "fd = os.open('/dev/liveupdate', os.O_RDWR)\n"
           "sys.stdout.write('holding\\n'); sys.stdout.flush()\n"
           "time.sleep(600)\n")


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _busy(ctx) -> None:
    child = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline().strip()
        if line != "holding":
            ctx.not_ok("second open of /dev/liveupdate refused with LuoBusy naming the holder",
                       f"holder child {child.pid} did not open /dev/liveupdate (said {line!r}, "
                       f"exit {child.poll()})")
            return
        ctx.expect_raises(errors.LuoBusy, LiveUpdate.open,
                          "second open of /dev/liveupdate refused with LuoBusy naming the holder",
                          errno=E.EBUSY, match=rf"pid {child.pid} \(")
    finally:
        child.kill()
        child.wait()


def _disk_file():
    """An open regular file on a disk filesystem (ext4), not /tmp: an *unlinked* tmpfs file is
    a shmem file, which LUO would accept like a memfd."""
    last = None
    for where in ("/var/tmp", "/lab", "/root"):
        try:
            return tempfile.NamedTemporaryFile(dir=where, prefix="luoagent-lab-")
        except OSError as exc:
            last = exc
    raise errors.LabError(f"no writable disk directory for a regular file: {last}")


def _hugetlb_memfd(ctx) -> int:
    """A 2 MiB MFD_HUGETLB memfd; if the kernel cannot make one, reserve huge pages and retry."""
    try:
        return memfd.create("lab-errors-hugetlb", HUGE_PAGE, hugetlb=True)
    except errors.MemfdError as exc:
        ctx.diag(f"hugetlb memfd: {exc}; setting vm.nr_hugepages=2 and retrying")
    try:
        with open(HUGEPAGES, "w") as f:
            f.write("2")
    except OSError as exc:
        ctx.diag(f"cannot set {HUGEPAGES}: {exc}")
    return memfd.create("lab-errors-hugetlb", HUGE_PAGE, hugetlb=True)


def stage_preserve(ctx) -> None:
    st = ctx.state.setdefault(KEY, {"boot_id": ctx.boot_id})
    _busy(ctx)

    cleanup = []
    with LiveUpdate.open() as lu:
        # --- names are validated before any ioctl --------------------------------------
        fds_before = _open_fds()
        empty = ctx.expect_raises(errors.InvalidName, lambda: lu.create_session(""),
                                  "empty session name refused as InvalidName", match="is empty")
        long_ = ctx.expect_raises(errors.InvalidName, lambda: lu.create_session(TOO_LONG),
                                  "64-byte session name refused as InvalidName", match="at most 63")
        ctx.check(all(e is not None and getattr(e, "errno", None) is None for e in (empty, long_))
                  and fds_before == _open_fds(),
                  "bad names never reached the kernel (no errno, no new fd)",
                  f"errno {getattr(empty, 'errno', None)}/{getattr(long_, 'errno', None)}, "
                  f"new fds {_open_fds() - fds_before}")
        with lu.create_session(LONGEST_OK) as s:
            ctx.check(s.name == LONGEST_OK, "63-byte session name accepted (longest legal)", f"got {s.name!r}")

        # --- duplicates ----------------------------------------------------------------
        dup = lu.create_session(DUP)
        cleanup.append(dup)
        ctx.expect_raises(errors.SessionExists, lambda: lu.create_session(DUP),
                          "duplicate session name refused as SessionExists",
                          errno=E.EEXIST, match="already exists")

        kept = lu.create_session(KEPT)
        ctx.keep.append(kept)
        a = memfd.create("lab-errors-a", 64 * 1024)
        memfd.fill_random(a, 64 * 1024, 1)
        b = memfd.create("lab-errors-b", 4096)
        ctx.keep.extend([a, b])
        kept.preserve(a, TOKEN)
        st["sha256"] = memfd.sha256(a)
        ctx.expect_raises(errors.TokenExists, lambda: kept.preserve(b, TOKEN),
                          "second file under a used token refused as TokenExists",
                          errno=E.EEXIST, match="token is already used")
        ctx.expect_raises(errors.FileAlreadyPreserved, lambda: kept.preserve(a, TOKEN + 1),
                          "same memfd preserved twice in one session refused as FileAlreadyPreserved",
                          errno=E.EBUSY, match="already preserved")
        other = lu.create_session(OTHER)
        cleanup.append(other)
        dup_fd = os.dup(a)  # another fd, same open file
        cleanup.append(dup_fd)
        ctx.expect_raises(errors.FileAlreadyPreserved, lambda: other.preserve(dup_fd, 7),
                          "same memfd (another fd) preserved in another session refused as FileAlreadyPreserved",
                          errno=E.EBUSY, match="already preserved")

        # --- files LUO cannot preserve ---------------------------------------------------
        r, w = os.pipe()
        cleanup.extend([r, w])
        ctx.expect_raises(errors.NotPreservable, lambda: other.preserve(r, 20),
                          "pipe refused as NotPreservable", errno=E.ENOENT, match="cannot preserve")
        regular = _disk_file()
        cleanup.append(regular)
        regular.write(b"not a memfd")
        regular.flush()
        ctx.expect_raises(errors.NotPreservable, lambda: other.preserve(regular.fileno(), 21),
                          "regular file refused as NotPreservable", errno=E.ENOENT, match="cannot preserve")
        null = os.open("/dev/null", os.O_RDWR)
        cleanup.append(null)
        ctx.expect_raises(errors.NotPreservable, lambda: other.preserve(null, 22),
                          "/dev/null refused as NotPreservable", errno=E.ENOENT, match="cannot preserve")
        hugetlb_desc = "MFD_HUGETLB memfd refused as NotPreservable"
        try:
            huge = _hugetlb_memfd(ctx)
        except errors.MemfdError as exc:
            ctx.not_ok(hugetlb_desc, f"could not create the hugetlb memfd to try: {exc}")
        else:
            cleanup.append(huge)
            ctx.expect_raises(errors.NotPreservable, lambda: other.preserve(huge, 23),
                              hugetlb_desc, errno=E.ENOENT, match="cannot preserve")

    for thing in cleanup:
        if isinstance(thing, int):
            os.close(thing)
        else:
            thing.close()


def stage_retrieve(ctx) -> None:
    st = ctx.state[KEY]
    check_new_boot(ctx, st)
    with LiveUpdate.open() as lu:
        # Also proves the refused 64-byte name was never truncated into a real session.
        ctx.expect_raises(errors.SessionNotFound, lambda: lu.retrieve_session(PREFIX_63),
                          "unknown session after kexec refused as SessionNotFound",
                          errno=E.ENOENT, match="no session of that name")
        ctx.expect_raises(errors.InvalidName, lambda: lu.retrieve_session(TOO_LONG),
                          "retrieving a 64-byte name refused as InvalidName", match="at most 63")
        kept = lu.retrieve_session(KEPT)
        try:
            ctx.expect_raises(errors.SessionAlreadyRetrieved, lambda: lu.retrieve_session(KEPT),
                              "retrieving a session twice refused as SessionAlreadyRetrieved",
                              errno=E.EINVAL, match="already retrieved")
            ctx.expect_raises(errors.TokenNotFound, lambda: kept.retrieve(UNKNOWN_TOKEN),
                              "unknown token after kexec refused as TokenNotFound",
                              errno=E.ENOENT, match="no file with this token")
            fd = kept.retrieve(TOKEN)
            digest = memfd.sha256(fd)
            os.close(fd)
            ctx.check(digest == st["sha256"], "the kept memfd came through intact despite the refusals",
                      f"sha256 {digest}, want {st['sha256']}")
            kept.finish()
        finally:
            kept.close()


def stages():
    return [stage_preserve, stage_retrieve]
