"""Host tier: cpr-reboot of a running luoguest into a memfd and back, QEMU 11.1 from the lab.

No kexec: the checkpoint and the RAM stay in memfds of this process while a new QEMU resumes."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from luoagent import memfd
from luoagent.adapters import cpr, procfs, qemu_binary, qemu_ram, qmp_client
from luoagent.lab import guest

pytestmark = [pytest.mark.host, pytest.mark.timeout(300)]

RAM_SIZE = 128 * 1024 * 1024
CANARY_SEED = 0x10A6E17


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    return guest.build_guest(tmp_path_factory.mktemp("guest"))


def guest_argv(elf: Path, ram_fd: int, serial: Path) -> list[str]:
    return [
        "-machine", "pc", "-accel", "tcg", "-m", str(RAM_SIZE // (1024 * 1024)),
        "-nodefaults", "-display", "none", "-kernel", str(elf), "-serial", f"file:{serial}",
        *qemu_ram.ram_backend_args("ram0", RAM_SIZE, fd=ram_fd),
    ]


async def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_cpr_reboot_roundtrip_keeps_ram_in_place(lab_qemu, guest_elf, tmp_path):
    ram = memfd.create("luoagent-test-ram", RAM_SIZE)
    vmstate = memfd.create("luoagent-test-vmstate")
    procs: list = []
    try:
        asyncio.run(_roundtrip(lab_qemu, guest_elf, tmp_path, ram, vmstate, procs))
    finally:
        for proc in procs:
            qemu_binary.kill_process(proc)
        os.close(ram)
        os.close(vmstate)


async def _roundtrip(binary, elf, tmp, ram, vmstate, procs):
    serial1, serial2 = tmp / "serial1.log", tmp / "serial2.log"

    # --- source QEMU runs the guest -----------------------------------------------------
    t0 = time.monotonic()
    src = qemu_binary.launch(binary, guest_argv(elf, ram, serial1), pass_fds=[ram],
                      qmp_socket=tmp / "src.sock", log=tmp / "src.log")
    procs.append(src)
    async with await qmp_client.Qmp.connect(tmp / "src.sock", timeout=20, process=src) as q:
        t_qmp = time.monotonic() - t0
        assert await q.status() == "running"
        await wait_for(lambda: guest.read_state(ram).magic_ok and guest.read_state(ram).ticks >= 1,
                       30, "the guest to start counting in RAM")
        # the canary goes in while the guest runs; the guest never touches 16..48 MiB
        memfd.write_pattern(ram, guest.CANARY_OFFSET, guest.CANARY_SIZE, CANARY_SEED)

        backends = await qemu_ram.ram_backends(src.pid, q)
        assert [(b.id, b.size, b.share, b.qemu_fd) for b in backends] == [("ram0", RAM_SIZE, True, ram)]
        assert backends[0].target.startswith("/memfd:luoagent-test-ram")
        stolen = procfs.steal_fd(src.pid, backends[0].qemu_fd)
        try:
            assert os.fstat(stolen).st_ino == os.fstat(ram).st_ino
        finally:
            os.close(stolen)

        t_stop = time.monotonic()
        await q.stop()
        at_stop = guest.read_state(ram)
        writer = memfd.reopen(vmstate, os.O_WRONLY)
        try:
            added = await q.add_fd(writer, 5)
        finally:
            os.close(writer)  # QEMU holds its own copy now
        assert added["fdset-id"] == 5
        saved = await cpr.save(q, "file:/dev/fdset/5", timeout=60)
        t_saved = time.monotonic()
        assert saved["status"] == "completed"
        assert await q.status() == "postmigrate"
        await q.quit()
    src.wait(10)
    vmstate_size = memfd.size(vmstate)
    assert guest.read_state(ram) == at_stop, "guest RAM changed after the source stopped"

    # --- a new QEMU resumes from the same RAM memfd + the vmstate memfd ------------------
    t1 = time.monotonic()
    dst = qemu_binary.launch(binary, [*guest_argv(elf, ram, serial2), "-incoming", "defer"],
                      pass_fds=[ram], qmp_socket=tmp / "dst.sock", log=tmp / "dst.log")
    procs.append(dst)
    async with await qmp_client.Qmp.connect(tmp / "dst.sock", timeout=20, process=dst) as q:
        t_qmp2 = time.monotonic() - t1
        assert await q.status() == "inmigrate"
        reader = memfd.reopen(vmstate, os.O_RDONLY)
        try:
            await q.add_fd(reader, 6)
        finally:
            os.close(reader)
        loaded = await cpr.load(q, "file:/dev/fdset/6", timeout=60)
        assert loaded["status"] == "completed"
        assert await q.status() == "paused"  # the source was stopped before its save
        resumed = guest.read_state(ram)
        await q.cont()
        t_cont = time.monotonic()
        assert await q.status() == "running"

        assert resumed.magic_ok and resumed.counter >= at_stop.counter and resumed.ticks >= at_stop.ticks
        await wait_for(lambda: guest.read_state(ram).counter > resumed.counter, 30,
                       "the guest counter to rise after resume")
        lines = await wait_for(lambda: guest.serial_counters(serial2.read_text()), 30,
                               "a status line from the resumed guest")
        assert lines[0][0] >= at_stop.counter and lines[0][1] > at_stop.ticks, (lines[0], at_stop)
        assert guest.SERIAL_START not in serial2.read_text(), "the guest rebooted instead of resuming"
        assert memfd.verify_pattern(ram, guest.CANARY_OFFSET, guest.CANARY_SIZE, CANARY_SEED), \
            "the 32 MiB canary in guest RAM changed across the checkpoint"
        await q.quit()
    dst.wait(10)

    assert 0 < vmstate_size < RAM_SIZE // 100, f"vmstate {vmstate_size} B is not < 1 % of RAM"
    print(
        f"\ncpr-reboot host roundtrip: RAM {RAM_SIZE >> 20} MiB, vmstate {vmstate_size} B "
        f"({100 * vmstate_size / RAM_SIZE:.3f} % of RAM); QMP up {t_qmp:.2f} s / {t_qmp2:.2f} s; "
        f"stop+save {t_saved - t_stop:.3f} s (save {saved['luoagent-elapsed-s']:.3f} s); "
        f"load {loaded['luoagent-elapsed-s']:.3f} s; QEMU start to running {t_cont - t1:.2f} s; "
        f"blackout (stop to cont, incl. new QEMU start) {t_cont - t_stop:.2f} s; "
        f"guest counter at stop {at_stop.counter}, tick {at_stop.ticks}; first line after "
        f"resume {lines[0]}"
    )
