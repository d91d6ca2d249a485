"""Tests of the lab guest: its build (ELF32 multiboot layout) and, on QEMU 11.1, its behaviour.

The host-tier test boots it from a memfd and checks the RAM contract documented in guest.py."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest

from luoagent import memfd
from luoagent.adapters import qemu_binary, qemu_ram
from luoagent.errors import LabBuildError
from luoagent.lab import guest

MULTIBOOT_MAGIC = 0x1BADB002


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    return guest.build_guest(tmp_path_factory.mktemp("guest"))


def load_segments(elf: bytes) -> list[tuple[int, int, int, int]]:
    """(file offset, paddr, filesz, memsz) of each PT_LOAD of an ELF32 little-endian file."""
    phoff, = struct.unpack_from("<I", elf, 28)
    phentsize, phnum = struct.unpack_from("<HH", elf, 42)
    out = []
    for i in range(phnum):
        p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", elf, phoff + i * phentsize)
        if p_type == 1:
            out.append((p_offset, p_paddr, p_filesz, p_memsz))
    return out


def test_build_produces_elf32_multiboot_image(guest_elf):
    data = guest_elf.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1 and data[5] == 1, "not ELF32 little-endian"
    assert struct.unpack_from("<H", data, 18)[0] == 3, "machine is not i386"
    entry = struct.unpack_from("<I", data, 24)[0]
    assert 0x100000 <= entry < guest.STATE_ADDR
    # QEMU's multiboot loader looks for a 4-byte aligned header in the first 8 KiB
    for off in range(0, min(len(data), 8192) - 12, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_MAGIC:
            assert (magic + flags + checksum) & 0xFFFFFFFF == 0
            assert not flags & 0x10000, "guest relies on ELF headers, not the a.out kludge"
            break
    else:
        pytest.fail("no multiboot header in the first 8 KiB")
    segments = load_segments(data)
    assert segments
    for _off, paddr, _filesz, memsz in segments:
        assert paddr >= 0x100000 and paddr + memsz <= guest.STATE_ADDR, "image overlaps the state block"


def test_build_reports_missing_source(tmp_path, monkeypatch):
    monkeypatch.setattr(guest, "GUEST_SOURCE_DIR", tmp_path / "nothing")
    with pytest.raises(LabBuildError, match="guest source .* is missing"):
        guest.build_guest(tmp_path / "out")


def test_build_reports_assembler_errors(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "guest.s").write_text("this is not an instruction\n")
    (src / "guest.ld").write_text("")
    monkeypatch.setattr(guest, "GUEST_SOURCE_DIR", src)
    with pytest.raises(LabBuildError, match="cannot assemble the lab guest"):
        guest.build_guest(tmp_path / "out")


def test_read_state_and_serial_parsing():
    fd = memfd.create("luoagent-guest-state", guest.MIN_RAM)
    try:
        assert guest.read_state(fd) == guest.GuestState(False, 0, 0, 0)
        os.pwrite(fd, struct.pack(guest.STATE_FORMAT, guest.STATE_MAGIC, 1, 12345678901, 7), guest.STATE_ADDR)
        assert guest.read_state(fd) == guest.GuestState(True, 1, 12345678901, 7)
    finally:
        os.close(fd)
    log = "luoguest start\nluoguest counter=5 tick=1\nluoguest counter=99 tick=2\nluoguest count"
    assert guest.serial_counters(log) == [(5, 1), (99, 2)]


@pytest.mark.host
@pytest.mark.timeout(120)
def test_guest_counts_in_ram_and_leaves_the_canary_alone(lab_qemu, guest_elf, tmp_path):
    size = guest.MIN_RAM
    ram = memfd.create("luoagent-guest-ram", size)
    serial = tmp_path / "serial.log"
    memfd.write_pattern(ram, guest.CANARY_OFFSET, guest.CANARY_SIZE, 4242)
    argv = ["-machine", "pc", "-accel", "tcg", "-m", f"{size}B", "-nodefaults", "-display", "none",
            "-kernel", str(guest_elf), "-serial", f"file:{serial}",
            *qemu_ram.ram_backend_args("ram0", size, fd=ram)]
    proc = qemu_binary.launch(lab_qemu, argv, pass_fds=[ram], log=tmp_path / "qemu.log")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(guest.serial_counters(serial.read_text() if serial.exists() else "")) < 3:
            assert proc.poll() is None, (tmp_path / "qemu.log").read_text()
            time.sleep(0.1)
        state = guest.read_state(ram)
    finally:
        qemu_binary.kill_process(proc)
    text = serial.read_text()
    lines = guest.serial_counters(text)
    assert len(lines) >= 3, text
    assert text.count(guest.SERIAL_START) == 1
    assert [t for _c, t in lines] == list(range(1, len(lines) + 1))
    assert all(a[0] < b[0] for a, b in zip(lines, lines[1:])), "counter did not rise"
    assert state.magic_ok and state.version == guest.STATE_VERSION
    assert state.counter >= lines[-1][0] and state.ticks >= lines[-1][1]
    assert memfd.verify_pattern(ram, guest.CANARY_OFFSET, guest.CANARY_SIZE, 4242), "guest wrote into the canary"
    os.close(ram)
    print(f"\nluoguest: {len(lines)} lines, counter {state.counter} after {state.ticks} ticks")
