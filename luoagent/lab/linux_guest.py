"""The lab's Linux guest: a static C init (vm-images/linux-guest/init.c) in an initramfs, booted
with the lab's own kernel; its memory, disk and TCP workload is read by the linux-guest scenario.

Built on the host with gcc -static into an newc cpio archive (written here, no cpio tool)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from luoagent.errors import LabBuildError
from luoagent.lab import resources

SOURCE = resources.VM_IMAGES / "linux-guest" / "init.c"
#: what the guest's TCP service answers with (one line per connection)
PORT = 7000
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.1"
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
