"""EXPERIMENTAL, NOT YET PASSING: under nested TCG on this 2-core machine (load ~9) the guest
kernel had not reached its init after 480 s (it was in ACPI/PCI set-up), so no lab test runs
this scenario yet; the bridge/tap set-up and QEMU's attach to tap0 did work in the lab VM, and
the init's workload works under one level of TCG. Next: a far smaller guest kernel.

Lab scenario linux-guest: a Linux guest with a virtio-blk disk and a virtio-net NIC on a tap on
a bridge, carried through `luoagent update` (real kexec) and `luoagent restore`.

The guest (the lab's own kernel + a static C init, luoagent/lab/linux_guest.py) keeps rewriting a
16 MiB memory region with a running checksum it re-verifies every second, appends fsync'd,
sequence-numbered, checksummed records to its disk, and answers on 10.0.2.15:7000 with its boot
id, uptime, last acknowledged record and memory verdicts. Stage 1 creates bridge br0 (10.0.2.1)
with tap0 in the lab VM, starts the guest, talks to it and updates. Stage 2 recreates br0/tap0
(as the host's network setup would after a reboot), restores, and checks: same boot id, uptime
continued, every acknowledged record on disk exactly once and in order, memory checksum good,
the same address answering."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import time
from pathlib import Path

from luoagent.lab import linux_guest as lg
from luoagent.lab.scenarios import kernel_change as kc

NAME = "linux-guest"
DESCRIPTION = ("EXPERIMENTAL (guest boot too slow under nested TCG): Linux guest with virtio-blk + virtio-net "
               "on a tap/bridge across update/restore")
MEMORY = "1G"
SLOW = True
TIMEOUT = 700.0

VM = "lg"
VM_RAM = 128 * 1024 * 1024
RUN_ROOT = Path("/run/luoagent-lab")
DISK = Path("/var/lib/luoagent-lab/lg-disk.img")  # rootfs (ext4): survives the kexec
DISK_BYTES = 64 * 1024 * 1024
KEY = "linux-guest"
OUT_DIR = Path("/lab/linux-guest-run")

GUEST_UP = "Linux guest booted: TCP service on 10.0.2.15:7000 answers over tap0/br0, records acknowledged"
CROSSED = "luoagent update kexec'd with the Linux guest (boot id of the lab VM changed)"
RESTORED = "luoagent restore brought the Linux guest back"
NO_REBOOT = "Linux guest: same boot id and uptime continued (no guest reboot)"
SAME_ADDRESS = "Linux guest: the same address 10.0.2.15:7000 answers after restore over the recreated tap/bridge"
RECORDS = "Linux guest: every acknowledged record is on disk exactly once, in order, checksums valid"
RECORDS_CONTINUE = "Linux guest: the disk writer continues after restore"
MEMORY_OK = "Linux guest: memory checksum verified after restore (no mismatch), verifier still running"

# linux/sockios.h, linux/if_tun.h, linux/if.h
SIOCBRADDBR, SIOCBRADDIF, SIOCGIFINDEX = 0x89A0, 0x89A2, 0x8933
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
TUNSETIFF, TUNSETPERSIST, IFF_TAP, IFF_NO_PI, IFF_UP = 0x400454CA, 0x400454CB, 0x0002, 0x1000, 0x1


def _ifreq(name: str, payload: bytes = b"") -> bytes:
    return struct.pack("16s", name.encode()) + payload.ljust(24, b"\0")


def _up(s: socket.socket, name: str) -> None:
    flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, _ifreq(name))[:18])[1]
    fcntl.ioctl(s, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))


def network_setup() -> None:
    """br0 = 10.0.2.1/24 with a persistent tap0 in it: what a host's network setup creates."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            fcntl.ioctl(s, SIOCBRADDBR, struct.pack("16s", b"br0"))
        except FileExistsError:
            pass
        tun = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(tun, TUNSETIFF, _ifreq("tap0", struct.pack("H", IFF_TAP | IFF_NO_PI)))
            fcntl.ioctl(tun, TUNSETPERSIST, 1)
        finally:
            os.close(tun)
        index = struct.unpack("16si", fcntl.ioctl(s, SIOCGIFINDEX, _ifreq("tap0"))[:20])[1]
        try:
            fcntl.ioctl(s, SIOCBRADDIF, _ifreq("br0", struct.pack("i", index)))
        except OSError:
            pass  # already a port of br0
        addr = struct.pack("HH4s", socket.AF_INET, 0, socket.inet_aton(lg.HOST_IP))
        fcntl.ioctl(s, SIOCSIFADDR, _ifreq("br0", addr))
        mask = struct.pack("HH4s", socket.AF_INET, 0, socket.inet_aton("255.255.255.0"))
        fcntl.ioctl(s, SIOCSIFNETMASK, _ifreq("br0", mask))
        for name in ("lo", "tap0", "br0"):
            _up(s, name)
    finally:
        s.close()


def ask_guest(timeout: float = 5.0) -> dict:
    with socket.create_connection((lg.GUEST_IP, lg.PORT), timeout=timeout) as c:
        c.settimeout(timeout)
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(512)
            if not chunk:
                break
            data += chunk
    return {k: (v if k == "boot_id" else int(v)) for k, v in (kv.split("=", 1) for kv in data.decode().split())}


def wait_guest(deadline_s: float, want_ack: int = 0) -> dict:
    deadline = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            st = ask_guest()
            if st["last_ack"] > want_ack and st["mem_ok"] > 0:
                return st
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1)
    raise RuntimeError(f"the Linux guest did not answer on {lg.GUEST_IP}:{lg.PORT} in {deadline_s:.0f} s: {last}")


def read_records(path: Path) -> tuple[list[int], list[str]]:
    """(seqs found in slot order, problems): slot N must hold record N with a valid checksum and
    a time after the previous record's."""
    seqs, problems, last_t = [], [], 0
    with open(path, "rb") as f:
        f.seek(lg.RECORD_SIZE)
        slot = 1
        while True:
            raw = f.read(lg.RECORD_SIZE)
            if len(raw) < 32:
                break
            magic, seq, t_ns, sm = struct.unpack("<QQQQ", raw[:32])
            if magic == 0 and seq == 0:
                break
            if magic != lg.RECORD_MAGIC or seq != slot or sm != lg.record_sum(magic, seq, t_ns):
                problems.append(f"slot {slot}: magic {magic:#x} seq {seq} sum ok {sm == lg.record_sum(magic, seq, t_ns)}")
            elif t_ns < last_t:
                problems.append(f"slot {slot}: written before slot {slot - 1} (a rewrite after a guest reboot?)")
            seqs.append(seq)
            last_t = t_ns
            slot += 1
    return seqs, problems


def _argv(ram_fd: int) -> list[str]:
    from luoagent.adapters import qemu_ram

    return ["-machine", "pc", "-accel", "tcg", "-m", str(VM_RAM >> 20), "-nodefaults", "-display", "none",
            "-kernel", "/lab/bzImage", "-initrd", "/lab/linux-guest/initramfs.cpio",
            "-append", "console=ttyS0 panic=-1",
            "-drive", f"file={DISK},if=virtio,format=raw",
            "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:4c:55:4f",
            "-serial", f"file:{RUN_ROOT / VM / 'serial.log'}",
            *qemu_ram.ram_backend_args("ram0", VM_RAM, fd=ram_fd)]


def _sock() -> Path:
    return RUN_ROOT / VM / "qmp.sock"


def stage_start_and_update(ctx) -> None:
    from luoagent import memfd
    from luoagent.adapters import qemu_binary, qmp_client

    st = ctx.state.setdefault(KEY, {})
    network_setup()
    ctx.diag("lab VM: br0 10.0.2.1/24 with tap0")
    DISK.parent.mkdir(parents=True, exist_ok=True)
    with open(DISK, "wb") as f:
        f.truncate(DISK_BYTES)
    (RUN_ROOT / VM).mkdir(parents=True, exist_ok=True)
    fd = memfd.create(f"luoagent-lab-{VM}", VM_RAM)
    proc = qemu_binary.launch(qemu_binary.find_qemu(), _argv(fd), pass_fds=[fd], qmp_socket=_sock(),
                              log=RUN_ROOT / VM / "qemu.log", daemon=True)
    os.close(fd)

    async def qmp_up():
        async with await qmp_client.Qmp.connect(_sock(), timeout=60, process=proc):
            pass

    asyncio.run(qmp_up())
    t0 = time.monotonic()
    try:
        before = wait_guest(480, want_ack=20)
    except RuntimeError as exc:
        serial = (RUN_ROOT / VM / "serial.log").read_text(errors="replace")[-2500:]
        qlog = (RUN_ROOT / VM / "qemu.log").read_text(errors="replace")[-1000:]
        alive = os.path.exists(f"/proc/{proc.pid}")
        ctx.not_ok(GUEST_UP, f"{exc}; QEMU alive: {alive}; qemu.log: {qlog}; serial: {serial}")
        raise
    ctx.ok(GUEST_UP)
    ctx.diag(f"Linux guest up after {time.monotonic() - t0:.0f} s: {before}")
    st.update(before=before, pid=proc.pid, boot_id=ctx.boot_id)
    ctx.save()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "update"
    r = kc.agent("update", "--kernel", "/lab/bzImage", "--reuse-cmdline", "--vm", f"{VM}={_sock()}", "--json", out=out)
    ctx.not_ok(CROSSED, f"luoagent update returned {r.returncode}:\n"
               + kc._file(out, ".err").read_text(errors="replace")[-3000:])
    raise RuntimeError("luoagent update did not kexec")


def stage_restore(ctx) -> None:
    st = ctx.state[KEY]
    for line in kc._file(OUT_DIR / "update", ".err").read_text(errors="replace").splitlines():
        ctx.diag("update: " + line)
    ctx.check(ctx.boot_id != st["boot_id"], CROSSED, f"boot id still {ctx.boot_id}")
    before = st["before"]
    # what the guest had acknowledged when the update began is the floor; the update itself
    # stopped it later, so the disk may hold more
    network_setup()  # the host's network setup after its reboot: bridge + tap again
    out = OUT_DIR / "restore"
    r = kc.agent("restore", "--json", out=out)
    for line in kc._file(out, ".err").read_text(errors="replace").splitlines():
        ctx.diag("restore: " + line)
    try:
        doc = json.loads(kc._file(out, ".json").read_text())
    except ValueError:
        doc = {}
    ctx.check(r.returncode == 0 and doc.get("ok"), RESTORED, json.dumps(doc)[-1500:])
    try:
        after = wait_guest(120, want_ack=before["last_ack"])
    except RuntimeError as exc:
        ctx.not_ok(SAME_ADDRESS, str(exc))
        return
    ctx.ok(SAME_ADDRESS)
    ctx.diag(f"Linux guest before update: {before}")
    ctx.diag(f"Linux guest after restore: {after}")
    ctx.check(after["boot_id"] == before["boot_id"] and after["uptime_ns"] > before["uptime_ns"], NO_REBOOT,
              f"before {before}, after {after}")
    time.sleep(2)
    later = ask_guest()
    ctx.check(later["mem_bad"] == 0 and later["mem_ok"] > after["mem_ok"] >= before["mem_ok"], MEMORY_OK,
              f"after {after}, 2 s later {later}")
    ctx.check(later["last_ack"] > after["last_ack"], RECORDS_CONTINUE, f"after {after}, 2 s later {later}")
    seqs, problems = read_records(DISK)
    top = max(seqs) if seqs else 0
    ctx.check(not problems and seqs == list(range(1, top + 1)) and top >= later["last_ack"] >= before["last_ack"],
              RECORDS, f"{len(seqs)} records, top {top}, acknowledged {later['last_ack']}; {problems[:5]}")
    ctx.diag(f"disk: {len(seqs)} records 1..{top}, all valid; acknowledged before update {before['last_ack']}, "
             f"now {later['last_ack']}")
    kc.agent("vm", "stop", VM, "--force")


def stages():
    return [stage_start_and_update, stage_restore]
