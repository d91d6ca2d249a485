"""Benchmark `luoagent vm upgrade`: the guest's pause per RAM size for each mechanism (handoff vs
sequential), from QEMU's own STOP/RESUME events. Prints numbers, asserts no speed: --help."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from luoagent import memfd, report
from luoagent.adapters import procfs, qemu_ram, qmp_client
from luoagent.errors import LuoAgentError, QemuError, UsageError
from luoagent.lab import build, guest
from luoagent.workflows import upgrade as up
from luoagent.workflows import vm as vmwf

DEFAULT_SIZES = "64M,256M,1G,4G"
MECHANISMS = ("handoff", "sequential")
MIB = 1024 * 1024
SEED = 0xB1A5


def progress(msg: str) -> None:
    print(f"bench_upgrade: {msg}", file=sys.stderr, flush=True)


def ram_fd(rec: vmwf.VmRecord) -> int:
    async def backends():
        async with await qmp_client.Qmp.connect(rec.qmp_socket, timeout=10) as q:
            return await qemu_ram.ram_backends(rec.pid, q)

    [b] = qmp_client.run_sync(backends())
    return procfs.steal_fd(rec.pid, b.qemu_fd)


def guest_check(rec: vmwf.VmRecord, size: int, since: int, canary: bool) -> int:
    """The guest runs in the QEMU the record names: counter past ``since`` and rising, canary
    intact (sizes >= guest.MIN_RAM). Not a speed check: a benchmark of a broken upgrade is void."""
    fd = ram_fd(rec)
    try:
        c1 = guest.read_state(fd).counter
        time.sleep(0.2)
        c2 = guest.read_state(fd).counter
        if not c2 > c1 > since:
            raise QemuError(f"{size // MIB} MiB: guest counter not rising after the upgrade ({since}, {c1}, {c2})")
        if canary and not memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, SEED):
            raise QemuError(f"{size // MIB} MiB: the 32 MiB canary changed")
        return c2
    finally:
        os.close(fd)


def bench_size(binary: Path, elf: Path, root: Path, size: int, repeat: int) -> list[dict]:
    name = f"b{size // MIB}"
    rec = vmwf.start_vm(name, size, ["-machine", "pc", "-nodefaults", "-kernel", str(elf)],
                        binary=binary, root=root)
    runs = []
    try:
        canary = size >= guest.MIN_RAM
        fd = ram_fd(rec)
        try:
            deadline = time.monotonic() + 60
            while guest.read_state(fd).counter == 0:
                if time.monotonic() > deadline:
                    raise QemuError("the counter guest did not start")
                time.sleep(0.05)
            if canary:
                memfd.write_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, SEED)
        finally:
            os.close(fd)
        counter = 0
        for mechanism in MECHANISMS:
            for n in range(repeat):
                out = up.upgrade(up.Target(name, Path(rec.qmp_socket), vmwf.load_record(name, root)),
                                 mechanism=mechanism, progress=report.Progress("upgrade", quiet=True))
                rec = vmwf.load_record(name, root)
                counter = guest_check(rec, size, counter, canary)
                runs.append({"ram_bytes": size, "mechanism": mechanism, "run": n, "pause_ms": out.pause_ms,
                             "qemu_downtime_ms": out.qemu_downtime_ms, "bytes_moved": out.bytes_moved,
                             "total_s": out.total_s})
                progress(f"{size // MIB} MiB {mechanism} #{n + 1}: pause {out.pause_ms} ms")
    finally:
        vmwf.stop_vm(name, root=root, force=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"guest RAM sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--repeat", type=int, default=3, help="upgrades per size and mechanism (default 3)")
    ap.add_argument("--qemu", help="QEMU binary (default: the lab's host QEMU 11.1)")
    ap.add_argument("--json", action="store_true", help="print every run and the summary as JSON")
    args = ap.parse_args(argv)
    try:
        sizes = [qemu_ram.parse_size(s.strip()) for s in args.sizes.split(",") if s.strip()]
        if not sizes or any(s % MIB or s < 64 * MIB for s in sizes):
            raise UsageError(f"--sizes {args.sizes!r}: give whole MiB sizes >= 64M, e.g. {DEFAULT_SIZES}")
        binary = Path(args.qemu) if args.qemu else build.host_qemu()
        started = time.monotonic()
        runs: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="bup-", dir="/tmp") as tmp:
            elf = guest.build_guest(Path(tmp) / "guest")
            for size in sizes:
                runs += bench_size(binary, elf, Path(tmp) / "vms", size, args.repeat)
        wall = time.monotonic() - started
    except LuoAgentError as exc:
        print(f"bench_upgrade: error: {exc}", file=sys.stderr)
        return 1
    summary = []
    for size in sizes:
        row = {"ram_bytes": size}
        for m in MECHANISMS:
            sel = [r for r in runs if r["ram_bytes"] == size and r["mechanism"] == m]
            row[m] = {"pause_ms_median": statistics.median(r["pause_ms"] for r in sel),
                      "pause_ms_min": min(r["pause_ms"] for r in sel),
                      "pause_ms_max": max(r["pause_ms"] for r in sel),
                      # QEMU reports a downtime only for a live migration (handoff), not for a
                      # cpr-reboot save of a guest that was stopped first
                      "qemu_downtime_ms_median": (statistics.median(r["qemu_downtime_ms"] for r in sel)
                                                  if all(r["qemu_downtime_ms"] is not None for r in sel) else None),
                      "bytes_moved_median": statistics.median(r["bytes_moved"] for r in sel)}
        row["sequential_over_handoff"] = row["sequential"]["pause_ms_median"] / row["handoff"]["pause_ms_median"]
        summary.append(row)
    base = summary[0]["handoff"]["pause_ms_median"]
    if args.json:
        print(json.dumps({"runs": runs, "summary": summary, "wall_s": round(wall, 1)}, indent=1))
        return 0
    print(f"{'RAM':>7} {'mechanism':<11} {'pause ms (min-max)':>26} {'qemu downtime ms':>17} {'bytes moved':>13}")
    print("-" * 78)
    for row in summary:
        for m in MECHANISMS:
            s = row[m]
            rng = f"{s['pause_ms_median']:.2f} ({s['pause_ms_min']:.2f}-{s['pause_ms_max']:.2f})"
            qd = s["qemu_downtime_ms_median"]
            qd = f"{qd:.0f}" if qd is not None else "-"
            print(f"{row['ram_bytes'] // MIB:>5}Mi {m:<11} {rng:>26} {qd:>17} "
                  f"{s['bytes_moved_median']:>13,.0f}")
    print()
    print(f"{'RAM':>7} {'sequential/handoff':>19} {'handoff vs first size':>22}")
    print("-" * 50)
    for row in summary:
        h = row["handoff"]["pause_ms_median"]
        print(f"{row['ram_bytes'] // MIB:>5}Mi {row['sequential_over_handoff']:>18.1f}x {h - base:>+19.2f} ms")
    print(f"\nwall time {wall:.1f} s, {args.repeat} upgrades per size and mechanism")
    return 0


if __name__ == "__main__":
    sys.exit(main())
