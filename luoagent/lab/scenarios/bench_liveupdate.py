"""Lab scenario bench-liveupdate: the blackout across a real kexec, luoagent's path vs the
full-copy baseline, for the plan of runs the host benchmark passes (benchmarks/bench_liveupdate.py).

Each run starts counter guests with memfd RAM filled with non-zero bytes and a canary, then
kexecs: "luoagent" through `luoagent update` / `luoagent restore`; "baseline" through cpr-reboot
without x-ignore-shared into files on /lab (fsync'd), kexec, load into fresh RAM. The next stage
checks every guest (counter continues, canary identical) and prints one `bench-result` line of
clock readings; the host adds the console's arrival times and does the arithmetic (lab/blackout.py)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

from luoagent.lab.scenarios._common import agent_env, guest_elf

NAME = "bench-liveupdate"
DESCRIPTION = "benchmark: blackout across a real kexec, luoagent vs full-copy baseline (plan from --debug plan=)"
SLOW = True
#: the largest run: a 2 GiB guest's memfd + its 2 GiB stream in the page cache, plus QEMU and the agent
MEMORY = "5G"
TIMEOUT = 1200.0
#: the baseline's stream files: up to 2 GiB of guest RAM at once (or 8 x 64 MiB), plus headroom
RUN_DISK_SPARE_MB = 2600

#: used when the host gives no plan (`luoagent lab run bench-liveupdate`): one run of each path
DEFAULT_PLAN = "luoagent:64:1,baseline:64:1"
RESULT_PREFIX = "bench-result "
COLDSTART_PREFIX = "bench-coldstart "
CLOCK_MARK = "luoagent-bench: boottime_ns="  # lab/blackout.py reads it back
RUN_ROOT = Path("/run/luoagent-bench")  # QMP sockets, serial logs (tmpfs: gone after each kexec)
STREAM_DIR = Path("/lab/bench-streams")  # the baseline's checkpoint files: on disk, survive kexec
OUT_DIR = Path("/lab/bench-out")         # what `luoagent update` printed before its kexec
PRINTK_TIME = "printk.time=1"            # kernel messages carry the boot clock (the host reads them)
FILL_BLOCK = 1 << 20
SAVE_FDSET, LOAD_FDSET = 21, 22
KEY = "bench"
MIB = 1 << 20


def parse_plan(text: str, paths: tuple[str, ...] = ("luoagent", "baseline")) -> list[dict]:
    """"luoagent:64:1,baseline:2048:1" -> [{"path", "ram_mib", "vms"}, ...]; ``paths``: those the
    scenario runs."""
    runs = []
    for part in str(text).split(","):
        path, ram, vms = part.strip().split(":")
        if path not in paths:
            raise ValueError(f"plan entry {part!r}: path must be {' or '.join(paths)}")
        runs.append({"path": path, "ram_mib": int(ram), "vms": int(vms)})
    if not runs:
        raise ValueError("empty plan")
    return runs


def plan_from_params(default: str = DEFAULT_PLAN, paths: tuple[str, ...] = ("luoagent", "baseline")) -> list[dict]:
    # stages() runs before any ctx exists: the plan's length is the number of stages
    try:
        debug = json.loads(Path("/lab/params.json").read_text()).get("debug", {})
    except (OSError, ValueError):
        debug = {}
    return parse_plan(debug.get("plan") or default, paths)


def boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def _dir(name: str) -> Path:
    return RUN_ROOT / name


def _fill(fd: int, size: int) -> None:
    """Non-zero bytes in every page, so a copying checkpoint really writes the whole RAM."""
    block = (secrets.token_bytes(4096) * (FILL_BLOCK // 4096))
    for off in range(0, size, FILL_BLOCK):
        os.pwrite(fd, block[:min(FILL_BLOCK, size - off)], off)


def _guest_argv(name: str, ram: int, fd: int, incoming: bool = False) -> list[str]:
    from luoagent.adapters import qemu_ram

    argv = ["-machine", "pc", "-accel", "tcg", "-m", str(ram // MIB), "-nodefaults", "-display", "none",
            "-kernel", str(guest_elf()), "-serial", f"file:{_dir(name) / 'serial.log'}",
            *qemu_ram.ram_backend_args("ram0", ram, fd=fd)]
    return argv + (["-incoming", "defer"] if incoming else [])


async def _start_guests(names: list[str], ram: int) -> dict:
    """Start the guests (filled memfd RAM), wait until each counts, write its canary."""
    from luoagent import memfd
    from luoagent.adapters import qemu_binary, qmp_client
    from luoagent.lab import guest

    binary = qemu_binary.find_qemu()
    vms, fds = {}, {}
    try:
        for name in names:
            _dir(name).mkdir(parents=True, exist_ok=True)
            fd = memfd.create(f"bench-{name}", ram)
            _fill(fd, ram)
            proc = qemu_binary.launch(binary, _guest_argv(name, ram, fd), pass_fds=[fd],
                                      qmp_socket=_dir(name) / "qmp.sock", log=_dir(name) / "qemu.log", daemon=True)
            fds[name] = fd
            vms[name] = {"pid": proc.pid, "seed": secrets.randbits(48)}
        deadline = time.monotonic() + 180
        for name in names:
            async with await qmp_client.Qmp.connect(_dir(name) / "qmp.sock", timeout=120):
                pass
            while not (guest.read_state(fds[name]).magic_ok and guest.read_state(fds[name]).ticks >= 1):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"guest {name} did not start counting: "
                                       f"{(_dir(name) / 'qemu.log').read_text(errors='replace')[-500:]}")
                await asyncio.sleep(0.1)
            memfd.write_pattern(fds[name], guest.CANARY_OFFSET, guest.CANARY_SIZE, vms[name]["seed"])
    finally:
        for fd in fds.values():
            os.close(fd)  # QEMU holds the RAM
    return vms


def _cmdline() -> str:
    cmdline = Path("/proc/cmdline").read_text().strip()
    return cmdline if PRINTK_TIME in cmdline.split() else f"{cmdline} {PRINTK_TIME}"


def _printk_time_now() -> None:
    # this kernel's messages (the reboot mark, "Starting new kernel") carry its clock too
    try:
        Path("/sys/module/printk/parameters/time").write_text("Y")
    except OSError:
        pass


# --- starting a run (old kernel) ----------------------------------------------------------
def start_luoagent(ctx, run: dict, st: dict) -> None:
    names = [f"r{st['index']}v{i}" for i in range(run["vms"])]
    st["vms"] = asyncio.run(_start_guests(names, run["ram_mib"] * MIB))
    st["names"] = names
    _counters_at(st, names)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    st["clock_pair"] = [time.time_ns(), boot_ns()]  # realtime - boottime: update's stop stamps are realtime
    ctx.state[KEY] = st
    vm_args = [a for n in names for a in ("--vm", f"{n}={_dir(n) / 'qmp.sock'}")]
    with open(OUT_DIR / "update.json", "w") as out, open(OUT_DIR / "update.err", "w") as err:
        r = subprocess.run([sys.executable, "-m", "luoagent", "update", "--kernel", str(ctx.next_kernel),
                            "--append", _cmdline(), *vm_args, "--json"], stdout=out, stderr=err,
                           env=agent_env(), timeout=900)
    raise RuntimeError(f"luoagent update returned {r.returncode} without kexec: "
                       + (OUT_DIR / "update.err").read_text(errors="replace")[-2000:])


def _counters_at(st: dict, names: list[str]) -> None:
    from luoagent.lab import guest
    from luoagent.lab.scenarios.vm_update import ram_fd_of

    for n in names:
        _pid, fd = ram_fd_of(_dir(n) / "qmp.sock")
        try:
            st["vms"][n]["counter_before"] = guest.read_state(fd).counter
        finally:
            os.close(fd)


async def _baseline_save(names: list[str], st: dict) -> None:
    """Stop every guest and checkpoint it (cpr-reboot, x-ignore-shared off) into a file, in parallel."""
    from luoagent.adapters import qmp_client
    from luoagent.lab import guest
    from luoagent.lab.scenarios.vm_update import _ram_fd_of

    async def one(n: str) -> None:
        path = STREAM_DIR / f"{n}.cpr"
        wfd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        async with await qmp_client.Qmp.connect(_dir(n) / "qmp.sock", timeout=30) as q:
            try:
                await q.add_fd(wfd, SAVE_FDSET)
            finally:
                os.close(wfd)
            await q.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
            await q.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
            st["vms"][n]["stop_boot_ns"] = boot_ns()
            await q.stop()
            await q.execute("migrate", {"uri": f"file:/dev/fdset/{SAVE_FDSET}"})
            while True:
                info = await q.execute("query-migrate")
                if info.get("status") == "completed":
                    break
                if info.get("status") in ("failed", "cancelled"):
                    raise RuntimeError(f"baseline save of {n} {info.get('status')}: {info.get('error-desc')}")
                await asyncio.sleep(0.005)
            st["vms"][n]["saved_boot_ns"] = boot_ns()
            st["vms"][n]["stream_bytes"] = path.stat().st_size

    await asyncio.gather(*(one(n) for n in names))
    for n in names:  # stopped until the kexec: read after every save, so no save waits for it
        _pid, fd = await _ram_fd_of(_dir(n) / "qmp.sock")
        try:
            st["vms"][n]["counter_at_stop"] = guest.read_state(fd).counter
        finally:
            os.close(fd)


def start_baseline(ctx, run: dict, st: dict) -> None:
    from luoagent.adapters import kexec

    names = [f"r{st['index']}v{i}" for i in range(run["vms"])]
    st["vms"] = asyncio.run(_start_guests(names, run["ram_mib"] * MIB))
    st["names"] = names
    _counters_at(st, names)
    shutil.rmtree(STREAM_DIR, ignore_errors=True)
    STREAM_DIR.mkdir(parents=True)
    kexec.load(Path(ctx.next_kernel), None, _cmdline())  # as luoagent does: before any guest stops
    asyncio.run(_baseline_save(names, st))
    for n in names:  # the files must be on disk before the kexec, or the page cache dies with it
        fd = os.open(STREAM_DIR / f"{n}.cpr", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.sync()
    st["synced_boot_ns"] = boot_ns()
    ctx.state[KEY] = st
    ctx.save()
    kexec.reboot_kexec(sync=True)  # writes the reboot mark to the kernel log first
    raise RuntimeError("reboot(LINUX_REBOOT_CMD_KEXEC) returned")


# --- finishing a run (new kernel) ---------------------------------------------------------
def finish_luoagent(ctx, st: dict) -> dict:
    from luoagent.lab.scenarios.vm_update import ram_fd_of

    result: dict = {"update": _slim_update(_read_json(OUT_DIR / "update.json"))}
    spawn = boot_ns()
    r = subprocess.run([sys.executable, "-m", "luoagent", "restore", "--json"], capture_output=True, text=True,
                       env=agent_env(), timeout=600)
    result["restore_exec_boot_ns"] = spawn
    result["restore_exit_boot_ns"] = boot_ns()
    result["restore_rc"] = r.returncode
    try:
        result["restore"] = _slim_restore(json.loads(r.stdout))
    except ValueError:
        result["restore"] = {"ok": False}
    if r.returncode != 0:
        ctx.diag("restore stderr: " + r.stderr[-1500:])
    result["vms"] = {}
    for n in st["names"]:
        try:
            _pid, fd = ram_fd_of(_dir(n) / "qmp.sock")
        except Exception as exc:  # noqa: BLE001 - reported as "not restored"
            result["vms"][n] = {"restored": False, "why": f"cannot reach the restored QEMU: {exc}"}
            continue
        try:
            result["vms"][n] = _check_guest(n, fd, st["vms"][n]["counter_before"], st["vms"][n]["seed"])
        finally:
            os.close(fd)
    return result


async def _baseline_load(names: list[str], ram: int, st: dict, out: dict) -> dict:
    """Start each QEMU on fresh RAM with -incoming defer, load its file, cont (in parallel)."""
    from luoagent import memfd
    from luoagent.adapters import qemu_binary, qmp_client

    binary = qemu_binary.find_qemu()
    ram_fds: dict[str, int] = {}

    async def one(n: str) -> None:
        t: dict = {}
        fd = ram_fds[n] = memfd.create(f"bench-{n}-new", ram)
        out["vms"][n] = {"timings": t, "restored": False, "why": "not loaded"}
        try:
            _dir(n).mkdir(parents=True, exist_ok=True)
            t["qemu_launch_boot_ns"] = boot_ns()
            proc = qemu_binary.launch(binary, _guest_argv(n, ram, fd, incoming=True), pass_fds=[fd],
                                      qmp_socket=_dir(n) / "qmp.sock", log=_dir(n) / "qemu.log", daemon=True)
            async with await qmp_client.Qmp.connect(_dir(n) / "qmp.sock", timeout=120, process=proc) as q:
                t["qemu_up_boot_ns"] = boot_ns()
                rfd = os.open(STREAM_DIR / f"{n}.cpr", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    await q.add_fd(rfd, LOAD_FDSET)
                finally:
                    os.close(rfd)
                await q.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
                await q.execute("migrate-set-capabilities",
                                {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
                await q.execute("migrate-incoming", {"uri": f"file:/dev/fdset/{LOAD_FDSET}"})
                while True:
                    info = await q.execute("query-migrate")
                    if info.get("status") == "completed":
                        break
                    if info.get("status") in ("failed", "cancelled"):
                        raise RuntimeError(f"baseline load of {n} {info.get('status')}: {info.get('error-desc')}")
                    await asyncio.sleep(0.005)
                t["incoming_done_boot_ns"] = boot_ns()
                await q.cont()
                t["running_boot_ns"] = boot_ns()
            out["vms"][n]["why"] = ""
        except Exception as exc:  # noqa: BLE001 - a row that did not restore
            out["vms"][n]["why"] = f"{type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(one(n) for n in names))
        for n in names:  # checked once every guest runs: no load waits for another guest's check
            if not out["vms"][n]["why"]:
                out["vms"][n].update(_check_guest(n, ram_fds[n], st["vms"][n]["counter_at_stop"], st["vms"][n]["seed"]))
    finally:
        for fd in ram_fds.values():
            os.close(fd)
    return out


def finish_baseline(ctx, st: dict, run: dict) -> dict:
    out: dict = {"vms": {}, "load_started_boot_ns": boot_ns()}
    asyncio.run(_baseline_load(st["names"], run["ram_mib"] * MIB, st, out))
    shutil.rmtree(STREAM_DIR, ignore_errors=True)
    return out


def _check_guest(name: str, fd: int, counter_before: int, seed: int) -> dict:
    """Was this guest really carried over? Counter continues (and rises), no guest reboot, canary intact."""
    from luoagent import memfd
    from luoagent.lab import guest

    c1 = guest.read_state(fd).counter
    time.sleep(0.3)
    c2 = guest.read_state(fd).counter
    serial = (_dir(name) / "serial.log").read_text(errors="replace") if (_dir(name) / "serial.log").exists() else ""
    canary = memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, seed)
    continues = (c1 >= counter_before) and guest.SERIAL_START not in serial
    why = []
    if not continues:
        why.append(f"counter {c1} after restore, {counter_before} before (or the guest rebooted)")
    if not c2 > c1:
        why.append(f"counter not rising: {c1} -> {c2}")
    if not canary:
        why.append("canary differs")
    return {"restored": not why, "why": "; ".join(why), "counter_before": counter_before, "counter_after": c1}


async def _quit_all(names: list[str]) -> None:
    from luoagent.adapters import qmp_client

    for n in names:
        try:
            async with await qmp_client.Qmp.connect(_dir(n) / "qmp.sock", timeout=10) as q:
                await q.quit()
        except Exception:  # noqa: BLE001 - already gone
            pass


def _slim_update(doc: dict) -> dict:
    """What the time line needs of `luoagent update --json` (one console line must stay short)."""
    keep = ("name", "ram_bytes", "vmstate_bytes", "stopped_at_ns", "quiesce_seconds", "ram_sample_ms_per_gib",
            "guest_ram_bytes_copied_at_most", "qemu_stream_bytes")
    return {"ok": doc.get("ok"), "phases": doc.get("phases", []),
            "vms": [{k: v.get(k) for k in keep} for v in doc.get("vms", [])]}


def _slim_restore(doc: dict) -> dict:
    keep = ("name", "ok", "error", "ram_bytes", "vmstate_bytes", "timings")
    return {"ok": doc.get("ok"), "boot_clock_ns": doc.get("boot_clock_ns", {}),
            "vms": [{k: v.get(k) for k in keep} for v in doc.get("vms", [])]}


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
        return json.loads(text[text.index("{"):]) if "{" in text else {}
    except (OSError, ValueError):
        return {}


def _clock_mark() -> None:
    """One kernel log line with CLOCK_BOOTTIME in it: its printk time tells the host how far the
    boot clock (the agent's stamps) is from the printk clock in this boot (tens of ms under TCG)."""
    fd = os.open("/dev/kmsg", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, f"{CLOCK_MARK}{boot_ns()}\n".encode())
    finally:
        os.close(fd)


#: what the CLI imported before it loaded only the command being run: every workflow and the lab
_EVERY_COMMAND = ("import importlib, sys; from luoagent import cli; "
                  "[importlib.import_module(m) for m, _h in cli.SUBCOMMANDS.values()]; "
                  "import importlib.metadata, luoagent.lab.cli; sys.argv[0] = 'luoagent'; sys.exit(cli.main())")


def _cold_start(ctx, repeat: int = 3) -> None:
    """exec -> first LUO call of `luoagent restore` in this VM (no manifest here: it stops right
    after that call), as it is and with the imports the CLI made before it became lazy."""
    root = Path("/run/luoagent-bench/coldstart-root")
    root.mkdir(parents=True, exist_ok=True)
    args = ["restore", "--vm-root", str(root)]
    variants = {"now": [sys.executable, "-m", "luoagent", *args],
                "every_command_imported": [sys.executable, "-c", _EVERY_COMMAND, *args]}
    seconds: dict = {k: [] for k in variants}
    for _ in range(repeat):
        for name, argv in variants.items():
            t0 = boot_ns()
            r = subprocess.run(argv, capture_output=True, text=True, env=agent_env(), timeout=300)
            seconds[name].append((boot_ns() - t0) / 1e9)
            if "nothing to restore" not in r.stderr:
                ctx.not_ok(f"cold start ({name}) stops at the first LUO call", r.stderr[-800:])
                return
    ctx.ok("cold start of `luoagent restore` measured (exec -> first LUO call, no manifest)")
    ctx.diag(COLDSTART_PREFIX + json.dumps(seconds, separators=(",", ":")))


def _compile_agent(ctx) -> None:
    """Byte-compile the agent once, as installing the package does: the run disk holds bare
    sources, and compiling them at the first import would be charged to the agent's cold start."""
    import luoagent

    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(luoagent.__file__).parent)],
                       capture_output=True, text=True, timeout=600)
    ctx.diag(f"agent byte-compiled in {time.monotonic() - t0:.1f} s (rc {r.returncode})")


def _stage(k: int, plan: list[dict]):
    def stage(ctx) -> None:
        _printk_time_now()
        _clock_mark()
        if k == 0:
            _compile_agent(ctx)
        if k > 0:
            _finish(ctx, k - 1, plan[k - 1])
        if k == len(plan):
            _cold_start(ctx)
        if k < len(plan):
            st = {"index": k, "boot_id": ctx.boot_id}
            run = plan[k]
            ctx.diag(f"run {k + 1}/{len(plan)}: {run['path']} {run['vms']} x {run['ram_mib']} MiB")
            (start_luoagent if run["path"] == "luoagent" else start_baseline)(ctx, run, st)
    stage.__name__ = f"bench_step_{k}"
    return stage


def _finish(ctx, index: int, run: dict) -> None:
    st = ctx.state.get(KEY, {})
    label = f"run {index + 1} ({run['path']} {run['vms']} x {run['ram_mib']} MiB)"
    if st.get("index") != index or ctx.boot_id == st.get("boot_id"):
        ctx.not_ok(f"{label}: kexec'd into a new kernel", f"state {st.get('index')}, boot id {ctx.boot_id}")
        return
    doc = finish_luoagent(ctx, st) if run["path"] == "luoagent" else finish_baseline(ctx, st, run)
    restored = all(v.get("restored") for v in doc["vms"].values()) and len(doc["vms"]) == run["vms"]
    ctx.check(restored, f"{label}: every guest restored (counter continues, canary identical)",
              "; ".join(f"{n}: {v.get('why')}" for n, v in doc["vms"].items() if not v.get("restored")))
    record = {"index": index, **run, "old": {k: v for k, v in st.items() if k != "boot_id"}, "new": doc,
              "restored": restored}
    ctx.diag(RESULT_PREFIX + json.dumps(record, separators=(",", ":")))
    asyncio.run(_quit_all(st.get("names", [])))
    for n in st.get("names", []):
        shutil.rmtree(Path("/run/luoagent/vms") / n, ignore_errors=True)


def stages():
    plan = plan_from_params()
    return [_stage(k, plan) for k in range(len(plan) + 1)]
