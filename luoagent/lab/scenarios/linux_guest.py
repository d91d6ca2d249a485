"""Lab scenario linux-guest: a Linux guest with a virtio-blk disk and a virtio-net NIC on a tap on
a bridge, carried through `luoagent update` (real kexec) and `luoagent restore`.

The guest (the lab's own kernel + a static C init, luoagent/lab/linux_guest.py) keeps rewriting a
2 MiB memory region with a running checksum it re-verifies every 2 s, appends fsync'd,
sequence-numbered, checksummed records to its disk, and answers on 10.0.2.15:7000 with its boot
id, uptime, last acknowledged record and memory verdicts. Its kernel would need over ten minutes
to boot under nested TCG, so it boots on the host at lab build time and is saved there
(linux_guest.snapshot); stage 1 creates bridge br0 (10.0.2.1) with tap0 in the lab VM, resumes
that running guest in the lab VM's QEMU (`-incoming`, RAM in a memfd), sees its disk writer
advance there, talks to it and updates. Stage 2 recreates br0/tap0
(as the host's network setup would after a reboot), restores, and checks: same boot id, uptime
continued, every acknowledged record on disk exactly once and in order, memory checksum good,
the same address answering."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import socket
import struct
import time
from pathlib import Path

from luoagent.lab import linux_guest as lg
from luoagent.lab.scenarios import kernel_change as kc

NAME = "linux-guest"
DESCRIPTION = ("a Linux guest (booted on the host, resumed in the lab VM) with virtio-blk + virtio-net on a "
               "tap/bridge across update/restore")
MEMORY = "1G"
SLOW = True
TIMEOUT = 600.0

VM = "lg"
RUN_ROOT = Path("/run/luoagent-lab")
DISK = Path("/var/lib/luoagent-lab/lg-disk.img")  # rootfs (ext4): survives the kexec
KEY = "linux-guest"
OUT_DIR = Path("/lab/linux-guest-run")

GUEST_UP = ("Linux guest running in the lab VM: TCP service on 10.0.2.15:7000 answers over tap0/br0, "
            "records acknowledged there")
CROSSED = "luoagent update kexec'd with the Linux guest (boot id of the lab VM changed)"
NETWORK_RECREATED = "after the kexec br0/tap0 were gone; recreated before restore"
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


def wait_guest(deadline_s: float, want_ack: int = 0, want_mem_ok: int = 0, log=None) -> dict:
    """The guest's first answer with more records acknowledged than ``want_ack`` and more
    memory verifications than ``want_mem_ok`` (RuntimeError after ``deadline_s``); ``log``
    receives each new kind of failed attempt with its time, to tell slow from unreachable."""
    started = time.monotonic()
    deadline = started + deadline_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            st = ask_guest()
            if st["last_ack"] > want_ack and st["mem_ok"] > want_mem_ok:
                return st
        except (OSError, ValueError, KeyError) as exc:
            if log is not None and repr(exc) != repr(last):
                log(f"{time.monotonic() - started:.0f} s: {exc!r}")
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


SAVED = Path("/lab/linux-guest")  # linux_guest.snapshot(): the guest booted on the host and saved


def _argv(ram_fd: int) -> list[str]:
    from luoagent.adapters import qemu_ram

    return ["-incoming", "defer", *lg.qemu_args(
        kernel="/lab/bzImage", initrd=str(SAVED / "initramfs.cpio"), disk=str(DISK),
        serial=str(RUN_ROOT / VM / "serial.log"),
        netdev="tap,id=n0,ifname=tap0,script=no,downscript=no,vnet_hdr=off",
        ram=qemu_ram.ram_backend_args("ram0", lg.RAM_BYTES, fd=ram_fd))]


def _sock() -> Path:
    return RUN_ROOT / VM / "qmp.sock"


def stage_start_and_update(ctx) -> None:
    from luoagent import memfd
    from luoagent.adapters import qemu_binary, qmp_client

    st = ctx.state.setdefault(KEY, {})
    network_setup()
    ctx.diag("lab VM: br0 10.0.2.1/24 with tap0")
    saved = json.loads((SAVED / "snapshot.json").read_text())
    ctx.diag(f"Linux guest booted on the host in {saved['boot_s']} s and saved ({saved['state_bytes']} bytes)")
    DISK.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAVED / "disk.img", DISK)
    (RUN_ROOT / VM).mkdir(parents=True, exist_ok=True)
    fd = memfd.create(f"luoagent-lab-{VM}", lg.RAM_BYTES)
    proc = qemu_binary.launch(qemu_binary.find_qemu(), _argv(fd), pass_fds=[fd], qmp_socket=_sock(),
                              log=RUN_ROOT / VM / "qemu.log", daemon=True)
    os.close(fd)
    t0 = time.monotonic()

    async def resume() -> dict:
        async with await qmp_client.Qmp.connect(_sock(), timeout=60, process=proc) as q:
            await q.execute("migrate-incoming", {"uri": f"file:{SAVED / 'state.mig'}"})
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                info = await q.execute("query-migrate")
                if info.get("status") in ("completed", "failed"):
                    break
                await asyncio.sleep(0.5)
            if info.get("status") == "completed":
                await q.execute("cont")
            return info

    def qemu_dead(why: str) -> None:
        serial = (RUN_ROOT / VM / "serial.log").read_text(errors="replace")[-2500:]
        qlog = (RUN_ROOT / VM / "qemu.log").read_text(errors="replace")[-1000:]
        alive = os.path.exists(f"/proc/{proc.pid}")
        ctx.not_ok(GUEST_UP, f"{why}; QEMU alive: {alive}; qemu.log: {qlog}; serial: {serial}")

    info = asyncio.run(resume())
    if info.get("status") != "completed":
        qemu_dead(f"loading the saved guest failed: {info}")
        raise RuntimeError("the Linux guest could not be resumed")
    ctx.diag(f"saved Linux guest loaded in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    try:
        first = wait_guest(300, log=lambda m: ctx.diag(f"asking the guest: {m}"))
        ctx.diag(f"first answer {time.monotonic() - t0:.0f} s after the load: {first}")
        # the disk writer must be running here, in the lab VM, not only on the host
        before = wait_guest(300, want_ack=first["last_ack"])
    except RuntimeError as exc:
        qemu_dead(str(exc))
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
    gone = [n for n in ("br0", "tap0") if os.path.exists(f"/sys/class/net/{n}")]
    network_setup()  # the host's network setup after its reboot: bridge + tap again
    ctx.check(not gone and all(os.path.exists(f"/sys/class/net/{n}") for n in ("br0", "tap0")),
              NETWORK_RECREATED, f"present before the set-up: {gone}")
    out = OUT_DIR / "restore"
    r = kc.agent("restore", "--json", out=out)
    for line in kc._file(out, ".err").read_text(errors="replace").splitlines():
        ctx.diag("restore: " + line)
    try:
        doc = json.loads(kc._file(out, ".json").read_text())
    except ValueError:
        doc = {}
    ctx.check(r.returncode == 0 and doc.get("ok"), RESTORED, json.dumps(doc)[-1500:])
    # what the guest had acknowledged when the update began is the floor; the update itself
    # stopped it later, so the disk may hold more
    t0 = time.monotonic()
    try:
        after = wait_guest(300, want_ack=before["last_ack"], log=lambda m: ctx.diag(f"asking the guest: {m}"))
    except RuntimeError as exc:
        ctx.not_ok(SAME_ADDRESS, str(exc))
        return
    ctx.ok(SAME_ADDRESS)
    ctx.diag(f"Linux guest answered {time.monotonic() - t0:.0f} s after restore returned")
    ctx.diag(f"Linux guest before update: {before}")
    ctx.diag(f"Linux guest after restore: {after}")
    ctx.check(after["boot_id"] == before["boot_id"] and after["uptime_ns"] > before["uptime_ns"], NO_REBOOT,
              f"before {before}, after {after}")
    later = wait_guest(180, want_ack=after["last_ack"], want_mem_ok=after["mem_ok"])
    ctx.check(later["mem_bad"] == 0 and later["mem_ok"] > after["mem_ok"] >= before["mem_ok"], MEMORY_OK,
              f"after {after}, later {later}")
    ctx.check(later["last_ack"] > after["last_ack"], RECORDS_CONTINUE, f"after {after}, later {later}")
    # stopped before reading, so no record is half-written while the disk is read
    kc.agent("vm", "stop", VM, "--force")
    seqs, problems = read_records(DISK)
    top = max(seqs) if seqs else 0
    ctx.check(not problems and seqs == list(range(1, top + 1)) and top >= later["last_ack"] >= before["last_ack"],
              RECORDS, f"{len(seqs)} records, top {top}, acknowledged {later['last_ack']}; {problems[:5]}")
    ctx.diag(f"disk: {len(seqs)} records 1..{top}, all valid; acknowledged before update {before['last_ack']}, "
             f"then {later['last_ack']}")


def stages():
    return [stage_start_and_update, stage_restore]
