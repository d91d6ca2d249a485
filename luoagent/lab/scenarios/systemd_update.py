"""Lab scenario systemd-update: the normal path on a systemd host. Two counter VMs started as
units (`luoagent vm start`: each QEMU in luoagent-vm-NAME.scope), `luoagent update` through the
shipped luoagent.service, `systemctl kexec`, and in the new boot the service restores them with
no command typed; a bystander unit's fd-store memfd crosses the same kexec.

Stage 1: units installed, bystander started, VMs a (as nobody) and b started, 32 MiB canaries
written, `luoagent update --kernel /lab/bzImage --reuse-cmdline` (the daemon loads the image
with kexec_file_load and calls `systemctl kexec`). Stage 2: `luoagent status --json` is polled
until the daemon's restore at boot finished; counters continue, canaries identical, one QEMU per
VM, nothing left in the fd store, bystander memfd intact; the blackout with its orderly-shutdown
share is printed from the daemon's own log."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from luoagent.lab import bystander, host_units
from luoagent.lab.scenarios import systemd_host as sh
from luoagent.lab.scenarios import vm_update as vu
from luoagent.lab.scenarios._common import guest_elf

NAME = "systemd-update"
DESCRIPTION = "systemd host: VMs as units, luoagent update, systemctl kexec, restored at boot by the service"
MEMORY = "1G"
FLAVOUR = "systemd"
SLOW = True
TIMEOUT = 600.0
KEY = "systemd-update"
VMS = ("a", "b")
UNPRIVILEGED = "a"                         # started with --user nobody
VM_ROOT = Path("/run/luoagent/vms")
OUT_DIR = Path("/lab/systemd-update")      # the run disk: survives the kexec
RESTORE_WAIT = 600.0

IN_SCOPE = "guest {vm}: QEMU runs in its own unit luoagent-vm-{vm}.scope"
UPDATE_ACCEPTED = "the client printed the update's result (announced by luoagent.service before the kexec)"
KEXECED = "the update ended in systemctl kexec into the new kernel (boot id changed)"
RESTORED_AT_BOOT = "luoagent.service restored every VM at boot, no command typed (status: restore done)"
COUNTER_CONTINUES = "guest {vm}: counter continues from where it stopped and rises (no guest reboot)"
CANARY_OK = "guest {vm}: 32 MiB canary in guest RAM byte-identical across systemctl kexec"
RUNS_ONCE = "guest {vm}: exactly one QEMU runs it, in luoagent-vm-{vm}.scope"
UPGRADED = "vm upgrade through luoagent.service: guest {vm}'s new QEMU runs in luoagent-vm-{vm}.scope, the old one is gone"
UPGRADED_VM = "b"
NOTHING_HELD = "after restore: no session held, none left in the fd store"
BLACKOUT = "blackout printed per VM with the orderly shutdown's share"


def sock(vm: str) -> Path:
    return VM_ROOT / vm / "qmp.sock"


def start_vm(vm: str, seed: int, ram_mib: int | None = None) -> dict:
    """`luoagent vm start` a counter guest (memfd RAM, ``ram_mib`` or VM_RAM), wait for it to
    count, write its canary."""
    from luoagent import memfd
    from luoagent.adapters import procfs
    from luoagent.lab import guest

    user = ["--user", vu.UNPRIVILEGED_USER] if vm == UNPRIVILEGED else []
    r = vu.luoagent("vm", "start", vm, "--memory", f"{ram_mib or vu.VM_RAM >> 20}M", *user, "--json", "--",
                    "-machine", "pc", "-nodefaults", "-kernel", str(guest_elf()), timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"luoagent vm start {vm} failed: {r.stderr[-1500:]}")
    pid = json.loads(r.stdout)["pid"]
    _pid, fd = vu.ram_fd_of(sock(vm))
    try:
        deadline = time.monotonic() + 120
        while not (guest.read_state(fd).magic_ok and guest.read_state(fd).ticks >= 1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {vm} did not start counting")
            time.sleep(0.1)
        memfd.write_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, seed)
        counter = guest.read_state(fd).counter
    finally:
        os.close(fd)
    return {"pid": pid, "seed": seed, "counter_before_update": counter, "identity": list(procfs.identity(pid))}


def cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip()


def qemu_pids() -> dict[int, str]:
    """Every QEMU process in this boot: pid -> its cgroup."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.path.basename(os.readlink(entry / "exe")).startswith("qemu-system"):
                found[int(entry.name)] = cgroup_of(int(entry.name))
        except OSError:
            continue
    return found


def upgrade_in_scope(ctx, vm: str, old_pid: int) -> int:
    """`luoagent vm upgrade VM` (a client of the service): the new QEMU must end in the VM's
    scope, not in luoagent.service's cgroup, and the guest must keep counting. Its new pid."""
    from luoagent.lab import guest

    r = vu.luoagent("vm", "upgrade", vm, "--json", timeout=300)
    out = (json.loads(r.stdout)["vms"][0] if r.returncode == 0 and r.stdout.strip() else {})
    new_pid = int(out.get("new_pid") or 0)
    _pid, fd = vu.ram_fd_of(sock(vm))
    try:
        c1 = guest.read_state(fd).counter
        time.sleep(1)
        rising = guest.read_state(fd).counter > c1
    finally:
        os.close(fd)
    qemus = qemu_pids()
    ctx.check(r.returncode == 0 and "runs in the luoagent daemon" in r.stderr and new_pid in qemus
              and f"luoagent-vm-{vm}.scope" in qemus[new_pid] and old_pid not in qemus and rising,
              UPGRADED.format(vm=vm), f"exit {r.returncode}, new pid {new_pid}, QEMUs {qemus}, counter rising "
              f"{rising}; stderr: {r.stderr[-1500:]}")
    return new_pid or old_pid


def stage_update(ctx) -> None:
    sh.check_systemd(ctx, sh.BEFORE)
    st = ctx.state.setdefault(KEY, {})
    st["boot_id"] = ctx.boot_id
    if not host_units.install_and_start(ctx):
        raise RuntimeError("luoagent.service is not serving; nothing to update through")
    bystander.start_and_check_pushed(ctx)
    vms = {}
    for vm in VMS:
        vms[vm] = start_vm(vm, secrets.randbits(48))
        unit = f"luoagent-vm-{vm}.scope"
        ctx.check(unit in cgroup_of(vms[vm]["pid"]), IN_SCOPE.format(vm=vm), cgroup_of(vms[vm]["pid"]))
        ctx.diag(f"guest {vm}: pid {vms[vm]['pid']}, counter {vms[vm]['counter_before_update']} before update")
    vms[UPGRADED_VM]["pid"] = upgrade_in_scope(ctx, UPGRADED_VM, vms[UPGRADED_VM]["pid"])
    st["vms"] = vms
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    ctx.save()
    vm_args = [a for vm in VMS for a in ("--vm", vm)]
    with open(OUT_DIR / "update.json", "w") as out, open(OUT_DIR / "update.err", "w") as err:
        r = vu.luoagent("update", "--kernel", "/lab/bzImage", "--reuse-cmdline", *vm_args, "--json",
                        stdout=out, stderr=err, timeout=900)
    if r.returncode != 0:
        ctx.not_ok(UPDATE_ACCEPTED, f"exit {r.returncode}:\n"
                   f"{(OUT_DIR / 'update.err').read_text(errors='replace')[-3000:]}")
        raise RuntimeError("luoagent update failed")
    # checked in the next boot from update.json: systemd's shutdown may stop this unit first
    time.sleep(600)  # systemd's shutdown stops this unit on the way to the kexec
    raise RuntimeError("luoagent update returned but no systemctl kexec followed in 600 s")


def wait_for_restore() -> dict:
    deadline = time.monotonic() + RESTORE_WAIT
    status: dict = {}
    while time.monotonic() < deadline:
        doc, _err = host_units.status_json()
        status = doc or status
        job = (doc or {}).get("job") or {}
        if job.get("op") == "restore" and job.get("state") in ("done", "failed") and doc.get("phase") == "idle":
            return doc
        time.sleep(1)
    return status


def restore_result() -> dict:
    """The boot restore's result document, as `luoagent status --follow --json` replays it."""
    out = subprocess.run(["/usr/bin/luoagent", "status", "--follow", "--json"], capture_output=True,
                         text=True, timeout=300)
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        return {"error": f"exit {out.returncode}: {out.stdout[-800:]} {out.stderr[-800:]}"}
    return doc.get("result", doc) if isinstance(doc, dict) else {}


def stage_restored(ctx) -> None:
    from luoagent import memfd
    from luoagent.lab import guest

    st = ctx.state[KEY]
    ctx.check(ctx.boot_id != st["boot_id"], KEXECED, f"boot id still {ctx.boot_id}")
    sh.check_systemd(ctx, sh.AFTER)
    host_units.check_started_at_boot(ctx)
    for line in (OUT_DIR / "update.err").read_text(errors="replace").splitlines()[-15:]:
        ctx.diag("update: " + line)
    try:
        announced = json.loads((OUT_DIR / "update.json").read_text())
    except ValueError:
        announced = {}
    ctx.check(bool(announced) and announced.get("ok", True) is not False, UPDATE_ACCEPTED,
              f"update.json: {(OUT_DIR / 'update.json').read_text(errors='replace')[-1500:]}")
    t0 = time.monotonic()
    status = wait_for_restore()
    job = status.get("job") or {}
    by_name = {v.get("name"): v for v in status.get("vms", [])}
    ctx.check(job.get("op") == "restore" and job.get("state") == "done"
              and all(by_name.get(vm, {}).get("ok") for vm in VMS), RESTORED_AT_BOOT,
              f"after {time.monotonic() - t0:.0f} s: {json.dumps(status)[-3000:]}\n"
              f"{host_units.journal(host_units.SERVICE, 60)}")
    qemus = qemu_pids()
    for vm in VMS:
        before = st["vms"][vm]
        in_scope = [pid for pid, cg in qemus.items() if f"luoagent-vm-{vm}.scope" in cg]
        ctx.check(len(in_scope) == 1 and len(qemus) == len(VMS), RUNS_ONCE.format(vm=vm),
                  f"QEMU processes: {qemus}")
        try:
            _pid, fd = vu.ram_fd_of(sock(vm))
        except Exception as exc:
            ctx.not_ok(COUNTER_CONTINUES.format(vm=vm), f"cannot reach guest {vm}: {exc}")
            ctx.not_ok(CANARY_OK.format(vm=vm), f"cannot reach guest {vm}: {exc}")
            continue
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            c2 = guest.read_state(fd).counter
            ctx.check(c1 >= before["counter_before_update"] and c2 > c1, COUNTER_CONTINUES.format(vm=vm),
                      f"before update {before['counter_before_update']}, now {c1} -> {c2}")
            ctx.check(memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, before["seed"]),
                      CANARY_OK.format(vm=vm))
        finally:
            os.close(fd)
    fd_store = status.get("fd_store") or {}
    ctx.check(not status.get("sessions") and not fd_store.get("stored"), NOTHING_HELD,
              f"sessions {status.get('sessions')}, fd store {fd_store}")
    result = restore_result()
    parts = {v.get("name"): v for v in result.get("vms", [])}
    for vm in VMS:
        v = parts.get(vm, {})
        ctx.diag(f"guest {vm}: blackout {v.get('blackout_ns', 0) / 1e9:.3f} s = "
                 + " + ".join(f"{k} {sec:.3f}" for k, sec in (v.get("blackout_parts") or {}).items()))
    ctx.check(all((parts.get(vm, {}).get("blackout_parts") or {}).get("orderly_shutdown_and_kexec", 0) > 0
                  for vm in VMS), BLACKOUT, f"restore result: {json.dumps(result)[-2000:]}")
    bystander.check_after_kexec(ctx)


def stages():
    return [stage_update, stage_restored]
