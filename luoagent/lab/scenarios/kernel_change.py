"""Lab scenario kernel-change: running VMs carried across a real kernel release change, 7.2 -> 7.3
(major upgrade) and back 7.3 -> 7.2 (downgrade), with the landing-side preflight and the RAM sample.

Stage 1 (7.2) starts two counter guests, shows the preflight refusing with real LUO (a command
line without liveupdate=on plus a QEMU not carried; an unknown running ABI), each leaving the VMs
running and every session name free, then `luoagent update` kexecs into the 7.3 lab kernel.
Stage 2 (7.3) restores with a test switch that corrupts one sampled RAM page of VM b: a comes
back, b is refused before QEMU starts and its RAM is kept; then a is updated back to 7.2.
Stage 3 (7.2) restores a again: two release changes, counter continuing, canary intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from luoagent import testmode
from luoagent.lab.scenarios._common import agent_env
from luoagent.lab.scenarios.vm_update import (
    STARTED_BY_LUOAGENT,
    VM_RAM,
    _serial,
    _sock,
    ram_fd_of,
    start_guest,
)

NAME = "kernel-change"
DESCRIPTION = "VMs across real release changes 7.2 -> 7.3 -> 7.2: landing preflight refusals, RAM sample"
MEMORY = "1G"
SLOW = True
TIMEOUT = 500.0
#: the series each stage runs on; the updates themselves kexec into the next one
KERNELS = ("7.2", "7.3", "7.2")
LAB_KERNEL = Path("/lab/bzImage")
NEW_KERNEL = Path("/lab/kernels/7.3/bzImage")
VMS = ("a", "b")
OUT_DIR = Path("/lab/kernel-change")
KEY = "kernel-change"

#: KTAP descriptions the host-side tests look up
ON_SERIES = "stage {stage} runs on a {series} kernel ({release})"
REFUSED_CMDLINE_AND_LOSS = "preflight refuses a command line without liveupdate=on and a QEMU not carried, naming both"
REFUSED_UNKNOWN_ABI = "preflight refuses when the running kernel's LUO ABI cannot be read"
REFUSAL_LEFT_NOTHING = "after the refusal ({case}): every VM running, counter rising, every session name free, no kexec image"
ABI_COMPARED = "preflight compared the LUO ABI of {frm} and {to}: identical"
CROSSED = "update {frm} -> {to}: kexec'd into the other release"
RESTORED = "guest {vm} restored on {to}: counter continues, rising, canary intact (no guest reboot)"
SAMPLE_CORRUPT_REFUSED = "a corrupted sampled RAM page makes restore refuse VM b before QEMU starts; its RAM is kept"
SAMPLE_COST = "RAM sample cost printed (ms/GiB) at update and restore"


def agent(*args: str, fault: str = "", out: Path | None = None, timeout: float = 400):
    env = agent_env()
    mode: list[str] = []
    if fault:
        env[testmode.FAULT_ENV] = fault
        mode = [testmode.FLAG]
    argv = [sys.executable, "-m", "luoagent", *mode, *args]
    if out is None:
        return subprocess.run(argv, text=True, env=env, timeout=timeout, capture_output=True)
    with open(_file(out, ".json"), "w") as o, open(_file(out, ".err"), "w") as e:
        return subprocess.run(argv, text=True, env=env, timeout=timeout, stdout=o, stderr=e)


def _file(out: Path, ext: str) -> Path:
    """``out`` + ``ext`` (names like update-7.2-7.3 have dots that are not suffixes)."""
    return out.parent / (out.name + ext)


def _vm_args(vms) -> list[str]:
    return [a for vm in vms for a in ("--vm", vm if vm == STARTED_BY_LUOAGENT else f"{vm}={_sock(vm)}")]


def _series(ctx, series: str) -> None:
    release = os.uname().release
    ctx.check(release == series or release.startswith(series + "."),
              ON_SERIES.format(stage=ctx.stage, series=series, release=release))


def _counter(vm: str) -> tuple[int, int]:
    from luoagent.lab import guest

    _pid, fd = ram_fd_of(_sock(vm))
    try:
        c1 = guest.read_state(fd).counter
        time.sleep(0.5)
        return c1, guest.read_state(fd).counter
    finally:
        os.close(fd)


def _nothing_left(ctx, case: str, vms) -> None:
    from luoagent import manifest as mf
    from luoagent.adapters import kexec
    from luoagent.luo import LiveUpdate

    diag = []
    for vm in vms:
        c1, c2 = _counter(vm)
        if c2 <= c1:
            diag.append(f"guest {vm} counter {c1} -> {c2}")
    made = []
    try:
        with LiveUpdate.open() as lu:
            for n in [mf.vm_session_name(vm) for vm in vms] + [mf.MANIFEST_SESSION]:
                made.append(lu.create_session(n))
    except Exception as exc:
        diag.append(f"{type(exc).__name__}: {exc}")
    finally:
        for s in made:
            s.close()
    if kexec.loaded():
        diag.append("a kexec image is loaded")
    ctx.check(not diag, REFUSAL_LEFT_NOTHING.format(case=case), "; ".join(diag))


def _update(ctx, vms, kernel: Path, running: Path, frm: str, to: str) -> None:
    st = ctx.state[KEY]
    st["boot_id"] = ctx.boot_id
    for vm in vms:
        st["vms"][vm]["counter_before_update"] = _counter(vm)[1]
    ctx.save()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / f"update-{frm}-{to}"
    ctx.diag(f"running: luoagent update --kernel {kernel} --running-kernel {running} {' '.join(_vm_args(vms))}")
    r = agent("update", "--kernel", str(kernel), "--running-kernel", str(running), "--reuse-cmdline",
              *_vm_args(vms), "--json", out=out)
    ctx.not_ok(CROSSED.format(frm=frm, to=to), f"luoagent update returned {r.returncode}:\n"
               + _file(out, ".err").read_text(errors="replace")[-3000:])
    raise RuntimeError("luoagent update did not kexec")


def _after_update(ctx, frm: str, to: str) -> str:
    st = ctx.state[KEY]
    err = _file(OUT_DIR / f"update-{frm}-{to}", ".err").read_text(errors="replace")
    for line in err.splitlines():
        ctx.diag(f"update {frm}->{to}: {line}")
    ctx.check(ctx.boot_id != st["boot_id"], CROSSED.format(frm=frm, to=to), f"boot id still {ctx.boot_id}")
    ctx.check("LUO ABI identical: luo-v" in err, ABI_COMPARED.format(frm=frm, to=to), err[-1500:])
    return err


def _check_restored(ctx, vm: str, to: str, doc: dict) -> None:
    from luoagent import memfd
    from luoagent.lab import guest

    st = ctx.state[KEY]["vms"][vm]
    v = {x["name"]: x for x in doc.get("vms", [])}.get(vm, {})
    desc = RESTORED.format(vm=vm, to=to)
    if not v.get("ok"):
        ctx.not_ok(desc, json.dumps(v)[-1500:])
        return
    _pid, fd = ram_fd_of(_sock(vm))
    try:
        c1 = guest.read_state(fd).counter
        time.sleep(0.5)
        c2 = guest.read_state(fd).counter
        canary = memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, st["seed"])
    finally:
        os.close(fd)
    serial = _serial(vm).read_text(errors="replace") if _serial(vm).exists() else ""
    before = st["counter_before_update"]
    ctx.check(c1 >= before and c2 > c1 and canary and guest.SERIAL_START not in serial, desc,
              f"counter {before} before update -> {c1} -> {c2}; canary {canary}")
    ctx.diag(f"guest {vm} on {os.uname().release}: counter {before} -> {c1} -> {c2}, "
             f"blackout {v.get('blackout_ns', 0) / 1e9:.3f} s")


# ---------------------------------------------------------------------------------------
def stage_start_and_upgrade(ctx) -> None:
    import secrets

    _series(ctx, KERNELS[0])
    st = ctx.state.setdefault(KEY, {"vms": {}, "releases": [os.uname().release]})
    for vm in VMS:
        st["vms"][vm] = start_guest(vm, secrets.randbits(48))
        ctx.diag(f"guest {vm}: pid {st['vms'][vm]['pid']}, {VM_RAM >> 20} MiB memfd RAM")
    ctx.save()
    # refusals with real LUO: nothing may be stopped or preserved
    cmdline = " ".join(w for w in Path("/proc/cmdline").read_text().split() if not w.startswith("liveupdate"))
    r = agent("update", "--kernel", str(NEW_KERNEL), "--running-kernel", str(LAB_KERNEL), "--append", cmdline,
              *_vm_args(["a"]))
    ctx.check(r.returncode == 1 and "needs liveupdate=on" in r.stderr and f"pid {st['vms']['b']['pid']}" in r.stderr
              and "--allow-loss" in r.stderr and "Traceback" not in r.stderr and "preserve-ram" not in r.stderr,
              REFUSED_CMDLINE_AND_LOSS, r.stderr[-2000:])
    _nothing_left(ctx, "command line and loss", VMS)
    r = agent("update", "--kernel", str(NEW_KERNEL), "--running-kernel", "/nonexistent/bzImage", *_vm_args(VMS))
    ctx.check(r.returncode == 1 and "cannot read the running kernel's LUO ABI strings" in r.stderr
              and "--allow-unverified-kernel" in r.stderr and "Traceback" not in r.stderr,
              REFUSED_UNKNOWN_ABI, r.stderr[-2000:])
    _nothing_left(ctx, "unknown ABI", VMS)
    _update(ctx, VMS, NEW_KERNEL, LAB_KERNEL, "7.2", "7.3")


def stage_restore_and_downgrade(ctx) -> None:
    err = _after_update(ctx, "7.2", "7.3")
    _series(ctx, KERNELS[1])
    st = ctx.state[KEY]
    st["releases"].append(os.uname().release)
    out = OUT_DIR / "restore-7.3"
    r = agent("restore", "--json", fault="corrupt-ram-sample:b", out=out)
    text = _file(out, ".err").read_text(errors="replace")
    for line in text.splitlines():
        ctx.diag("restore on 7.3: " + line)
    try:
        doc = json.loads(_file(out, ".json").read_text())
    except ValueError:
        doc = {"vms": []}
    _check_restored(ctx, "a", "7.3", doc)
    b = {x["name"]: x for x in doc.get("vms", [])}.get("b", {})
    rescue = Path(b.get("rescue") or "/nonexistent")
    ram_kept = (rescue / "ram0.ram").is_file() and (rescue / "ram0.ram").stat().st_size == VM_RAM
    ctx.check(r.returncode == 1 and not b.get("ok") and "do not match" in b.get("error", "")
              and "QEMU was not started" in b.get("error", "") and ram_kept, SAMPLE_CORRUPT_REFUSED,
              json.dumps(b)[-1500:])
    ctx.check("ms/GiB" in err and "RAM sample verified" in text, SAMPLE_COST, text[-800:])
    _update(ctx, ["a"], LAB_KERNEL, NEW_KERNEL, "7.3", "7.2")


def stage_restore_after_downgrade(ctx) -> None:
    _after_update(ctx, "7.3", "7.2")
    _series(ctx, KERNELS[2])
    st = ctx.state[KEY]
    st["releases"].append(os.uname().release)
    out = OUT_DIR / "restore-7.2"
    r = agent("restore", "--json", out=out)
    for line in _file(out, ".err").read_text(errors="replace").splitlines():
        ctx.diag("restore on 7.2: " + line)
    try:
        doc = json.loads(_file(out, ".json").read_text())
    except ValueError:
        doc = {"vms": []}
    if r.returncode != 0:
        ctx.diag(f"restore exited {r.returncode}")
    _check_restored(ctx, "a", "7.2", doc)
    ctx.diag("releases crossed: " + " -> ".join(st["releases"]))
    agent("vm", "stop", "a", "--force")


def stages():
    return [stage_start_and_upgrade, stage_restore_and_downgrade, stage_restore_after_downgrade]
