"""kexec through the kernel's file loader (kexec_file_load, the one KHO/LUO needs) and reboot.

Load, unload, ask whether an image is loaded, read the running command line, reboot into it."""

from __future__ import annotations

import errno as E
import os
import time
from pathlib import Path

from luoagent import errors
from luoagent._luo_shim import lib
from luoagent.log import get_logger

log = get_logger(__name__)

# Why kexec_file_load said no, and what to do about it.
_LOAD_REASONS = {
    E.ENOEXEC: "the kernel image format is not one this kernel can load (need an x86 bzImage), "
    "or it lacks a required signature",
    E.EKEYREJECTED: "the image's signature was rejected (kexec signature enforcement / lockdown)",
    E.EPERM: "not allowed: need CAP_SYS_BOOT (run as root), and kernel.kexec_load_disabled must be 0 "
    "and lockdown must allow kexec",
    E.EBUSY: "another kexec load or a kexec is in progress; retry",
    E.ENOSYS: "this kernel lacks kexec_file_load: build it with CONFIG_KEXEC_FILE=y",
    E.EINVAL: "the kernel rejected the arguments (command line too long, or bad flags)",
    E.ENOMEM: "not enough memory to stage the image",
    E.EADDRNOTAVAIL: "no free memory area for the image: build the new kernel with "
    "CONFIG_RELOCATABLE=y or give it more memory",
    E.EMSGSIZE: "the command line is too long for the new kernel",
}


def current_cmdline() -> str:
    """The running kernel's command line (/proc/cmdline), for --reuse-cmdline behaviour."""
    return Path("/proc/cmdline").read_text().strip()


def loaded() -> bool:
    """True when a kexec image is loaded (/sys/kernel/kexec_loaded)."""
    return loaded_state() is True


def loaded_state() -> bool | None:
    """Whether a kexec image is loaded; None when the kernel does not say (no sysfs file)."""
    try:
        return Path("/sys/kernel/kexec_loaded").read_text().strip() == "1"
    except OSError:
        return None


def dirty_bytes(meminfo: str | None = None) -> int | None:
    """Page cache not yet on disk (Dirty + Writeback in /proc/meminfo), None if unreadable:
    what a sync before the reboot would still have to write."""
    try:
        text = Path("/proc/meminfo").read_text() if meminfo is None else meminfo
    except OSError:
        return None
    kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)
          if k in ("Dirty", "Writeback")}
    return (kb["Dirty"] + kb["Writeback"]) * 1024 if len(kb) == 2 else None


def _open_image(path: Path, what: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.KexecImageError(
            f"cannot open {what} {str(path)!r}: {exc.strerror}; give the path of a readable file"
        ) from None


def _file_load(kernel_fd: int, initrd_fd: int, cmdline: str | None, flags: int) -> int:
    raw = b"" if cmdline is None else cmdline.encode() + b"\0"  # the length counts the NUL
    start = time.perf_counter()
    ret = lib.sys_kexec_file_load(kernel_fd, initrd_fd, len(raw), raw, flags)
    log.debug("kexec.file_load", flags=flags, result=ret if ret >= 0 else E.errorcode.get(-ret, -ret),
              duration_ms=round((time.perf_counter() - start) * 1000, 3))
    return ret


def load(kernel: Path, initrd: Path | None = None, cmdline: str | None = None) -> None:
    """Stage ``kernel`` (+ ``initrd``) for the next kexec with kexec_file_load(2).

    ``cmdline`` defaults to the running kernel's. KexecImageError says why the kernel refused.
    """
    kernel = Path(kernel)
    cmdline = current_cmdline() if cmdline is None else cmdline
    kernel_fd = _open_image(kernel, "kernel image")
    initrd_fd = -1
    try:
        flags = 0
        if initrd is None:
            flags |= lib.KEXEC_FILE_NO_INITRAMFS
        else:
            initrd_fd = _open_image(Path(initrd), "initrd")
        ret = _file_load(kernel_fd, initrd_fd, cmdline, flags)
    finally:
        os.close(kernel_fd)
        if initrd_fd >= 0:
            os.close(initrd_fd)
    if ret < 0:
        reason = _LOAD_REASONS.get(-ret, os.strerror(-ret))
        raise errors.KexecImageError(
            f"kexec_file_load of {str(kernel)!r} failed ({E.errorcode.get(-ret, -ret)}): {reason}"
        )
    log.info("kexec.loaded", kernel=str(kernel), initrd=str(initrd) if initrd else None, cmdline=cmdline)


def unload() -> None:
    """Drop a staged image (no-op when none is loaded)."""
    ret = _file_load(-1, -1, None, lib.KEXEC_FILE_UNLOAD)
    if ret == -E.ENOSYS and not loaded():  # no file loader here, so nothing it could have loaded
        return
    if ret < 0:
        raise errors.KexecError(
            f"unloading the kexec image failed ({E.errorcode.get(-ret, -ret)}): "
            f"{_LOAD_REASONS.get(-ret, os.strerror(-ret))}"
        )


def reboot_kexec(sync: bool = True) -> None:
    """sync (unless the caller synced already and nothing is dirty), then
    reboot(LINUX_REBOOT_CMD_KEXEC) into the loaded image. Returns only by raising.

    With LUO, the kernel freezes every preserved session first; if that fails it refuses the
    reboot and this raises RebootRefused (the system keeps running, sessions intact).
    """
    if sync:
        os.sync()
    log.info("kexec.reboot")
    _kernel_log_reboot_call()
    ret = lib.sys_reboot_kexec()
    err = -ret if ret < 0 else 0
    why = {
        E.EINVAL: "no kexec image is loaded: load one first",
        E.EPERM: "not allowed: need CAP_SYS_BOOT (run as root)",
        E.EBUSY: "a kexec load is in progress; retry",
    }.get(err, "the kernel refused (a live update freeze may have failed: check dmesg for 'luo')")
    raise errors.RebootRefused(f"reboot(LINUX_REBOOT_CMD_KEXEC) returned ({E.errorcode.get(err, err)}): {why}")


#: the kernel log line written right before reboot(LINUX_REBOOT_CMD_KEXEC); boottime_ns is CLOCK_BOOTTIME
REBOOT_CALL_MARK = "luoagent: reboot(LINUX_REBOOT_CMD_KEXEC) now, boottime_ns="


def _kernel_log_reboot_call() -> None:
    """Best effort: say in the kernel log (and so on the console, where the lab's host clock
    sees it) the moment of the reboot call, so the time from it to the new kernel is measurable."""
    try:
        fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, f"{REBOOT_CALL_MARK}{time.clock_gettime_ns(time.CLOCK_BOOTTIME)}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def bzimage_version(kernel: Path) -> str:
    """The kernel_version string an x86 bzImage announces (e.g. "7.2.13 (builder@host) #1 ..."),
    '' if it has none; KexecImageError if ``kernel`` cannot be read or is not a bzImage.

    x86 boot protocol (Documentation/arch/x86/boot.rst): boot flag 0xAA55 at 0x1FE, "HdrS" at
    0x202, and at 0x20E a u16 offset of the version string from 0x200."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(0x210)
            ptr = int.from_bytes(head[0x20E:0x210], "little") if len(head) >= 0x210 else 0
            raw = b""
            if ptr:
                f.seek(0x200 + ptr)
                raw = f.read(256)
    except OSError as exc:
        raise errors.KexecImageError(f"cannot read kernel image {kernel}: {exc.strerror}") from None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS" or head[0x1FE:0x200] != b"\x55\xaa":
        raise errors.KexecImageError(
            f"kernel image {kernel} is not an x86 bzImage (no 'HdrS' boot header): pass the "
            "bzImage from arch/x86/boot/bzImage or /boot/vmlinuz-*, not vmlinux or an archive"
        )
    return raw.split(b"\0", 1)[0].decode(errors="replace").strip()


def check_image(kernel: Path, initrd: Path | None) -> str:
    """KexecImageError unless ``kernel`` is a readable x86 bzImage (and ``initrd`` a readable
    file); returns the image's version string (empty if it has none)."""
    if not kernel.exists():
        raise errors.KexecImageError(f"kernel image {kernel} does not exist; pass --kernel PATH to a bzImage")
    if not kernel.is_file():
        raise errors.KexecImageError(f"kernel image {kernel} is not a regular file")
    version = bzimage_version(kernel)
    if initrd is not None:
        if not initrd.is_file():
            raise errors.KexecImageError(f"initrd {initrd} does not exist or is not a regular file")
        try:
            with open(initrd, "rb"):
                pass
        except OSError as exc:
            raise errors.KexecImageError(f"cannot read initrd {initrd}: {exc.strerror}") from None
    return version
