"""The lab's Linux guest: a static C init (vm-images/linux-guest/init.c) in an initramfs, booted
with the lab's own kernel; its memory, disk and TCP workload is read by the linux-guest scenario.

Built on the host with gcc -static into an newc cpio archive (written here, no cpio tool). The
guest then boots once on the host (one level of TCG: seconds) and is saved with QEMU's
migration to ``state.mig`` + ``disk.img``: under nested TCG its kernel needs over ten minutes
to boot (docs/lab.md), so the lab VM resumes this running guest instead (`-incoming`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from luoagent.errors import LabBuildError
from luoagent.lab import resources

SOURCE = resources.VM_IMAGES / "linux-guest" / "init.c"
#: what the guest's TCP service answers with (one line per connection)
PORT = 7000
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
MAC = "52:54:00:4c:55:4f"
RAM_BYTES = 128 * 1024 * 1024
DISK_BYTES = 64 * 1024 * 1024
#: quiet: every kernel message is slow serial I/O under TCG
CMDLINE = "console=ttyS0 panic=-1 quiet"
#: what the guest's init prints once its TCP service listens
SERVING = "linux-guest: serving on"
RECORD_SIZE = 512
RECORD_MAGIC = 0x4C55524543
#: the guest's record checksum (init.c record_sum): keeps the two definitions side by side
_M1, _M2, _MASK = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, (1 << 64) - 1


def record_sum(magic: int, seq: int, t_ns: int) -> int:
    return ((magic * _M1) & _MASK) ^ ((seq * _M2) & _MASK) ^ t_ns


def _newc(entries: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A cpio "newc" archive: (name, mode, data, rdevmajor, rdevminor) per entry."""
    out = bytearray()

    def pad(n: int) -> None:
        out.extend(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data, major, minor) in enumerate(entries + [("TRAILER!!!", 0, b"", 0, 0)], 1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(name) + 1, 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        out.extend(header + name.encode() + b"\0")
        pad(len(header) + len(name) + 1)
        out.extend(data)
        pad(len(data))
    return bytes(out)


def build(out_dir: Path) -> Path:
    """Compile the init statically and write ``out_dir/initramfs.cpio``; returns its path."""
    if shutil.which("gcc") is None:
        raise LabBuildError("gcc not found: the lab's Linux guest needs gcc and libc6-dev (static glibc)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    init = out_dir / "init"
    proc = subprocess.run(["gcc", "-static", "-O2", "-pthread", "-Wall", "-o", str(init), str(SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabBuildError(f"building the Linux guest's init failed: {proc.stderr[-1500:]}; "
                            "it needs gcc and libc6-dev (libc.a)")
    archive = out_dir / "initramfs.cpio"
    archive.write_bytes(_newc([
        ("dev", 0o040755, b"", 0, 0),
        ("dev/console", 0o020600, b"", 5, 1),  # stdio of init before devtmpfs is mounted
        ("init", 0o100755, init.read_bytes(), 0, 0),
    ]))
    return archive


def qemu_args(*, kernel: str, initrd: str, disk: str, serial: str, netdev: str, ram: list[str]) -> list[str]:
    """The guest's QEMU argv (no binary). The host boot and the lab VM's resume must agree on
    every device; only the backends (``netdev``, ``ram``, the files) may differ. The NIC runs
    without a virtio-net header (tap ``vnet_hdr=off``) so its features do not depend on the
    backend: a hubport on the host, a tap in the lab VM."""
    return ["-machine", "pc", "-accel", "tcg", "-m", str(RAM_BYTES >> 20), "-nodefaults", "-display", "none",
            "-kernel", kernel, "-initrd", initrd, "-append", CMDLINE,
            "-drive", f"file={disk},if=virtio,format=raw",
            "-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
            "-serial", f"file:{serial}", *ram]


def snapshot(qemu: Path, kernel: Path, out_dir: Path, timeout: float = 300.0) -> dict:
    """Boot the guest on this host until its service listens and it has written records, then
    stop it and save it (QEMU migration to a file): ``out_dir/state.mig`` + ``disk.img``."""
    from luoagent.adapters import qmp_client

    out_dir = Path(out_dir)
    disk, serial, sock, ram = (out_dir / n for n in ("disk.img", "serial.log", "qmp.sock", "ram"))
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    argv = [str(qemu), *qemu_args(
        kernel=str(kernel), initrd=str(out_dir / "initramfs.cpio"), disk=str(disk), serial=str(serial),
        netdev="hubport,id=n0,hubid=0",
        ram=["-object", f"memory-backend-file,id=ram0,size={RAM_BYTES},mem-path={ram},share=on",
             "-machine", "memory-backend=ram0"]),
        "-qmp", f"unix:{sock},server=on,wait=off"]
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def fail(why: str) -> LabBuildError:
        out = serial.read_text(errors="replace")[-1500:] if serial.exists() else ""
        return LabBuildError(f"the Linux guest's host boot {why}; serial: {out!r}; argv: {' '.join(argv)}")

    try:
        while SERVING not in (serial.read_text(errors="replace") if serial.exists() else ""):
            if proc.poll() is not None:
                raise fail(f"ended (QEMU status {proc.returncode}: {proc.stdout.read().decode(errors='replace')[-800:]})")
            if time.monotonic() - started > timeout:
                raise fail(f"did not reach its TCP service in {timeout:.0f} s")
            time.sleep(0.2)
        booted = time.monotonic() - started
        time.sleep(2)  # a few fsync'd records on the disk before the save

        async def save() -> dict:
            async with await qmp_client.Qmp.connect(sock, timeout=30, process=proc) as q:
                await q.execute("stop")
                await q.execute("migrate", {"uri": f"file:{out_dir / 'state.mig'}"})
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    info = await q.execute("query-migrate")
                    if info.get("status") in ("completed", "failed"):
                        break
                    await asyncio.sleep(0.2)
                await q.execute("quit")
                return info

        info = asyncio.run(save())
        if info.get("status") != "completed":
            raise fail(f"could not be saved: {info}")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for leftover in (ram, sock):
            leftover.unlink(missing_ok=True)
    return {"boot_s": round(booted, 1), "total_s": round(time.monotonic() - started, 1),
            "state_bytes": os.path.getsize(out_dir / "state.mig")}
