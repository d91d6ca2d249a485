"""Benchmark cpr-reboot checkpoints with guest RAM kept in place (x-ignore-shared) vs copied.

Prints save/load times, bytes and ratios, no speed asserts: benchmarks/bench_cpr.py --help"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from luoagent import memfd
from luoagent.adapters import qemu_binary, qemu_ram, qmp_client
from luoagent.errors import LuoAgentError, MigrationFailed, QemuError, QmpCommandFailed, UsageError
from luoagent.lab import guest

DEFAULT_SIZES = "128M,512M,1G"
MIB = 1024 * 1024
# fdset numbers QEMU sees for the checkpoint file (any free number works)
SAVE_FDSET = 5
LOAD_FDSET = 6
FILL_SEED = 0xBE7C
# the fill repeats one random block: every page differs from zero (so a copying checkpoint
# really writes it) and filling a GiB costs a fraction of a second
FILL_BLOCK = MIB
# the guest and SeaBIOS never touch this range; it is checked after a copying load
CHECK_OFFSET, CHECK_SIZE = guest.CANARY_OFFSET, guest.CANARY_SIZE


@dataclass
class Trial:
    """One checkpoint + restore of one RAM size in one mode."""

    ram_bytes: int
    ignore_shared: bool
    save_s: float          # `migrate` sent -> query-migrate says completed (guest already stopped)
    load_s: float          # `migrate-incoming` sent -> completed, in a freshly started QEMU
    stream_bytes: int      # size of the checkpoint file (memfd) after the save
    qemu_total_time_ms: int | None  # QEMU's own total-time of the outgoing migration
    dst_start_s: float     # new QEMU launched -> its QMP answered (same in both modes)


def progress(msg: str) -> None:
    print(f"bench_cpr: {msg}", file=sys.stderr, flush=True)


def parse_sizes(text: str) -> list[int]:
    sizes = []
    for part in (p for p in text.split(",") if p.strip()):
        value = qemu_ram.parse_size(part.strip())
        if value % MIB:
            raise UsageError(f"RAM size {part!r} is not a whole number of MiB (QEMU's -m needs MiB)")
        if value < guest.MIN_RAM:
            raise UsageError(f"RAM size {part!r} is below {guest.MIN_RAM // MIB} MiB, the counter "
                             "guest's minimum (SeaBIOS would write into its canary range)")
        sizes.append(value)
    if not sizes:
        raise UsageError(f"--sizes {text!r} names no size; give e.g. {DEFAULT_SIZES}")
    return sizes


def check_memory(sizes: list[int]) -> None:
    """Peak use is RAM memfd + copied stream + the new QEMU's RAM memfd, all of the largest size."""
    need = 3 * max(sizes) + 256 * MIB
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is not None and avail < need:
        raise UsageError(f"the largest size needs about {need // MIB} MiB free, MemAvailable is "
                         f"{avail // MIB} MiB; pass smaller --sizes")


def fill(fd: int, size: int) -> None:
    block = random.Random(FILL_SEED).randbytes(FILL_BLOCK)
    for off in range(0, size, FILL_BLOCK):
        os.pwrite(fd, block[: min(FILL_BLOCK, size - off)], off)


def filled_range_intact(fd: int, offset: int, length: int) -> bool:
    block = random.Random(FILL_SEED).randbytes(FILL_BLOCK)
    for off in range(offset, offset + length, FILL_BLOCK):
        want = block[off % FILL_BLOCK:][: min(FILL_BLOCK, offset + length - off)]
        if os.pread(fd, len(want), off) != want:
            return False
    return True


def guest_argv(elf: Path, size: int, ram_fd: int, serial: Path) -> list[str]:
    return [
        "-machine", "pc", "-accel", "tcg", "-m", str(size // MIB),
        "-nodefaults", "-display", "none", "-kernel", str(elf), "-serial", f"file:{serial}",
        *qemu_ram.ram_backend_args("ram0", size, fd=ram_fd),
    ]


async def migrate(q: qmp_client.Qmp, cmd: str, uri: str, ignore_shared: bool, timeout: float) -> tuple[float, dict]:
    """cpr-reboot mode, x-ignore-shared on or off, then ``cmd`` (migrate / migrate-incoming);
    returns (seconds from sending ``cmd`` to completed, final query-migrate).

    The adapter's cpr_reboot_save/load always switch x-ignore-shared on, so both modes go
    through this one helper to be timed the same way."""
    await q.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
    await q.execute("migrate-set-capabilities",
                    {"capabilities": [{"capability": "x-ignore-shared", "state": ignore_shared}]})
    started = time.monotonic()
    try:
        await q.execute(cmd, {"uri": uri}, timeout=timeout)
    except QmpCommandFailed as exc:
        raise MigrationFailed(f"{cmd} {uri} refused: {exc.desc}") from exc
    while True:
        info = await q.execute("query-migrate")
        state = info.get("status")
        if state == "completed":
            return time.monotonic() - started, dict(info)
        if state in ("failed", "cancelled"):
            raise MigrationFailed(f"{cmd} {uri} {state}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() - started > timeout:
            raise MigrationFailed(f"{cmd} {uri} not completed after {timeout:g} s (status {state!r})")
        await asyncio.sleep(0.002)


async def wait_guest_counting(ram: int, proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise QemuError(f"source QEMU exited with status {proc.returncode} before the guest ran")
        state = guest.read_state(ram)
        if state.magic_ok and state.counter > 0:
            return
        await asyncio.sleep(0.02)
    raise QemuError(f"the counter guest did not start counting within {timeout:g} s")


async def trial(binary: Path, elf: Path, tmp: Path, size: int, ram: int, ignore_shared: bool,
                procs: list, fds: list) -> Trial:
    mode = "a" if ignore_shared else "b"
    stream = memfd.create(f"bench-cpr-stream-{mode}")
    fds.append(stream)
    timeout = 120.0

    # --- source: guest runs over the pre-filled RAM memfd, is stopped, checkpointed ------
    src = qemu_binary.launch(binary, guest_argv(elf, size, ram, tmp / f"serial-src-{mode}.log"),
                      pass_fds=[ram], qmp_socket=tmp / "src.sock", log=tmp / f"src-{mode}.log")
    procs.append(src)
    async with await qmp_client.Qmp.connect(tmp / "src.sock", timeout=30, process=src) as q:
        await wait_guest_counting(ram, src)
        await q.stop()
        at_stop = guest.read_state(ram)
        writer = memfd.reopen(stream, os.O_WRONLY)
        try:
            await q.add_fd(writer, SAVE_FDSET)
        finally:
            os.close(writer)
        save_s, saved = await migrate(q, "migrate", f"file:/dev/fdset/{SAVE_FDSET}", ignore_shared, timeout)
        await q.quit()
    src.wait(10)
    stream_bytes = memfd.size(stream)

    # --- destination: (a) the same RAM memfd, (b) an empty one the stream must fill ------
    if ignore_shared:
        dst_ram = ram
    else:
        dst_ram = memfd.create("bench-cpr-ram-dst", size)
        fds.append(dst_ram)
    launched = time.monotonic()
    dst = qemu_binary.launch(binary, [*guest_argv(elf, size, dst_ram, tmp / f"serial-dst-{mode}.log"),
                               "-incoming", "defer"],
                      pass_fds=[dst_ram], qmp_socket=tmp / "dst.sock", log=tmp / f"dst-{mode}.log")
    procs.append(dst)
    async with await qmp_client.Qmp.connect(tmp / "dst.sock", timeout=30, process=dst) as q:
        dst_start_s = time.monotonic() - launched
        reader = memfd.reopen(stream, os.O_RDONLY)
        try:
            await q.add_fd(reader, LOAD_FDSET)
        finally:
            os.close(reader)
        load_s, _ = await migrate(q, "migrate-incoming", f"file:/dev/fdset/{LOAD_FDSET}",
                                  ignore_shared, timeout)
        status = await q.status()
        await q.quit()
    dst.wait(10)

    # not speed checks: a benchmark of a restore that did not restore would be meaningless
    if status != "paused":
        raise MigrationFailed(f"mode ({mode}) {size // MIB} MiB: restored QEMU is {status!r}, not paused")
    if guest.read_state(dst_ram) != at_stop:
        raise MigrationFailed(f"mode ({mode}) {size // MIB} MiB: guest state in the restored RAM "
                              f"{guest.read_state(dst_ram)} differs from the state at stop {at_stop}")
    if not filled_range_intact(dst_ram, CHECK_OFFSET, CHECK_SIZE):
        raise MigrationFailed(f"mode ({mode}) {size // MIB} MiB: the filled RAM range did not come back")

    if dst_ram != ram:
        fds.remove(dst_ram)
        os.close(dst_ram)
    fds.remove(stream)
    os.close(stream)
    return Trial(size, ignore_shared, save_s, load_s, stream_bytes,
                 saved.get("total-time"), dst_start_s)


async def bench_size(binary: Path, elf: Path, tmp: Path, size: int, repeat: int,
                     procs: list, fds: list) -> list[Trial]:
    ram = memfd.create("bench-cpr-ram", size)
    fds.append(ram)
    t0 = time.monotonic()
    fill(ram, size)
    progress(f"{size // MIB} MiB: RAM memfd filled in {time.monotonic() - t0:.2f} s")
    trials = []
    try:
        for i in range(repeat):
            for ignore_shared in (True, False):
                t = await trial(binary, elf, tmp, size, ram, ignore_shared, procs, fds)
                progress(f"{size // MIB} MiB run {i + 1}/{repeat} "
                         f"{'(a) x-ignore-shared' if ignore_shared else '(b) RAM copied     '}: "
                         f"save {t.save_s:.3f} s, load {t.load_s:.3f} s, {t.stream_bytes} B")
                trials.append(t)
    finally:
        fds.remove(ram)
        os.close(ram)
    return trials


def summarize(size: int, trials: list[Trial]) -> dict:
    """Median over repeats of each mode; ratios are (b) copied / (a) in place."""
    out: dict = {"ram_bytes": size, "runs": len(trials) // 2}
    for key, ignore in (("in_place", True), ("copied", False)):
        ts = [t for t in trials if t.ignore_shared == ignore]
        out[key] = {
            "save_s": statistics.median(t.save_s for t in ts),
            "load_s": statistics.median(t.load_s for t in ts),
            "stream_bytes": statistics.median(t.stream_bytes for t in ts),
            "qemu_total_time_ms": statistics.median(t.qemu_total_time_ms or 0 for t in ts),
            "dst_start_s": statistics.median(t.dst_start_s for t in ts),
        }
    a, b = out["in_place"], out["copied"]
    out["vmstate_pct_of_ram"] = 100.0 * a["stream_bytes"] / size
    out["copied_stream_pct_of_ram"] = 100.0 * b["stream_bytes"] / size
    out["ratio_bytes"] = b["stream_bytes"] / a["stream_bytes"]
    out["ratio_save"] = b["save_s"] / a["save_s"]
    out["ratio_load"] = b["load_s"] / a["load_s"]
    out["trials"] = [asdict(t) for t in trials]
    return out


def print_table(results: list[dict], version: str) -> None:
    print(f"cpr-reboot checkpoint into a memfd (file:/dev/fdset/N), QEMU {version}, -accel tcg, "
          "counter guest stopped before save; median of runs")
    print("(a) x-ignore-shared: RAM stays in its memfd, only vmstate is written")
    print("(b) without it: every RAM page goes through the stream")
    print("save s / load s: wall time from `migrate` / `migrate-incoming` to completed "
          "(polled every 2 ms); qemu ms: QEMU's own total-time of the save\n")
    head = (f"{'RAM':>6} {'mode':<4} {'save s':>8} {'(qemu ms)':>9} {'load s':>8} "
            f"{'stream bytes':>14} {'% of RAM':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        for key, label in (("in_place", "(a)"), ("copied", "(b)")):
            m = r[key]
            print(f"{r['ram_bytes'] // MIB:>4}Mi {label:<4} {m['save_s']:8.3f} "
                  f"{m['qemu_total_time_ms']:9.0f} {m['load_s']:8.3f} "
                  f"{int(m['stream_bytes']):>14,} {100 * m['stream_bytes'] / r['ram_bytes']:8.3f}%")
    print()
    head = f"{'RAM':>6} {'bytes b/a':>10} {'save b/a':>9} {'load b/a':>9} {'vmstate % RAM':>14}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['ram_bytes'] // MIB:>4}Mi {r['ratio_bytes']:9.0f}x {r['ratio_save']:8.1f}x "
              f"{r['ratio_load']:8.1f}x {r['vmstate_pct_of_ram']:13.3f}%")


async def run(binary: Path, sizes: list[int], repeat: int) -> list[dict]:
    procs: list = []
    fds: list[int] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cpr-") as tmpdir:
            tmp = Path(tmpdir)
            elf = guest.build_guest(tmp / "guest")
            results = []
            for size in sizes:
                results.append(summarize(size, await bench_size(binary, elf, tmp, size, repeat, procs, fds)))
            return results
    finally:
        for proc in procs:
            qemu_binary.kill_process(proc)
        for fd in fds:
            os.close(fd)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help=f"guest RAM sizes, comma-separated, K/M/G suffixes (default {DEFAULT_SIZES})")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per size and mode; the median is reported (default 3)")
    parser.add_argument("--qemu", help="qemu-system-x86_64 to use (default: the lab's QEMU 11.1 "
                                       "from luoagent.lab.build.host_qemu())")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    # SIGTERM takes the same path as Ctrl-C, so every QEMU and memfd is still cleaned up
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.repeat < 1:
            raise UsageError(f"--repeat {args.repeat}: give at least 1")
        sizes = parse_sizes(args.sizes)
        check_memory(sizes)
        if args.qemu:
            binary = qemu_binary.find_qemu(args.qemu)
        else:
            from luoagent.lab.build import host_qemu
            progress("locating the lab's QEMU (builds the rootfs tree on first use, ~1-2 min)")
            binary = host_qemu()
        version = qemu_binary.qemu_version(binary)
        started = time.monotonic()
        results = asyncio.run(run(binary, sizes, args.repeat))
        wall = time.monotonic() - started
    except LuoAgentError as exc:
        print(f"bench_cpr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_cpr: interrupted; every QEMU started was killed", file=sys.stderr)
        return 130
    if args.json:
        json.dump({"qemu": str(binary), "qemu_version": version, "accel": "tcg",
                   "wall_s": wall, "results": results}, sys.stdout, indent=2)
        print()
    else:
        print_table(results, version)
        print(f"\nwall time {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
