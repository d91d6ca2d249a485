"""The lab's test guest "luoguest": build it from vm-images/guest with GNU as/ld, read its state.

The guest counts in RAM at a fixed guest-physical address and prints the count on COM1."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from luoagent.lab import resources
from luoagent.errors import LabBuildError

#: guest.s + guest.ld (package data: luoagent/lab/vm-images/guest)
GUEST_SOURCE_DIR = resources.GUEST_SOURCES

#: guest-physical address of the state block; for machine pc with RAM < 3.5 GiB the
#: guest-physical address equals the byte offset in the RAM backend (memfd)
STATE_ADDR = 0x00200000
#: "LUOG" as a little-endian u32 at STATE_ADDR, published after the counters are zeroed
STATE_MAGIC = 0x474F554C
STATE_VERSION = 1
#: layout at STATE_ADDR: u32 magic, u32 version, u64 counter (+1 per loop iteration),
#: u64 ticks (+1 per RTC second, one serial line each)
STATE_FORMAT = "<IIQQ"
STATE_SIZE = struct.calcsize(STATE_FORMAT)

#: guest RAM the guest never touches: tests may write a canary there through the memfd
CANARY_OFFSET = 16 * 1024 * 1024
CANARY_SIZE = 32 * 1024 * 1024
#: smallest guest RAM for which the canary region stays untouched: the firmware (SeaBIOS)
#: writes just below (top of RAM - 16 MiB), which is inside the region for a 64 MiB guest
MIN_RAM = 128 * 1024 * 1024

#: what the guest prints once a second on COM1 ("luoguest start" once, at boot)
SERIAL_LINE_RE = re.compile(r"luoguest counter=(\d+) tick=(\d+)")
SERIAL_START = "luoguest start"


@dataclass(frozen=True)
class GuestState:
    magic_ok: bool
    version: int
    counter: int
    ticks: int


def build_guest(out_dir: Path) -> Path:
    """Assemble and link luoguest into ``out_dir/guest.elf`` (ELF32 multiboot); return its path."""
    out_dir = Path(out_dir)
    source = GUEST_SOURCE_DIR / "guest.s"
    script = GUEST_SOURCE_DIR / "guest.ld"
    for needed in (source, script):
        if not needed.is_file():
            raise LabBuildError(f"guest source {needed} is missing; is this a full luoagent checkout?")
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise LabBuildError(f"GNU {tool} not found: install binutils (apt-get install binutils)")
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / "guest.o"
    elf = out_dir / "guest.elf"
    tmp = out_dir / "guest.elf.tmp"
    _run(["as", "--32", "-o", str(obj), str(source)], "assemble")
    # -n: no page alignment, so the multiboot header sits near the file start
    _run(["ld", "-m", "elf_i386", "-n", "-T", str(script), "-o", str(tmp), str(obj)], "link")
    os.replace(tmp, elf)
    obj.unlink(missing_ok=True)
    return elf


def _run(argv: list[str], what: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabBuildError(
            f"cannot {what} the lab guest: `{' '.join(argv)}` exited {result.returncode}: "
            f"{result.stderr.strip()[:800]}"
        )


def read_state(ram_fd: int, base: int = 0) -> GuestState:
    """Read the guest's state block from its RAM memfd (``base``: offset of guest address 0)."""
    raw = os.pread(ram_fd, STATE_SIZE, base + STATE_ADDR)
    if len(raw) < STATE_SIZE:
        return GuestState(False, 0, 0, 0)
    magic, version, counter, ticks = struct.unpack(STATE_FORMAT, raw)
    return GuestState(magic == STATE_MAGIC, version, counter, ticks)


def serial_counters(text: str) -> list[tuple[int, int]]:
    """(counter, tick) of every complete status line in a serial log."""
    return [(int(m.group(1)), int(m.group(2))) for m in SERIAL_LINE_RE.finditer(text)]
