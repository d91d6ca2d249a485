"""Lab scenario vm-update: the main job end to end — two running guests, `luoagent update`
(real kexec), `luoagent restore`; then rollbacks and manifest errors with real LUO.

Stage 1 starts two counter guests with memfd RAM, writes a 32 MiB canary into each and runs
`luoagent update`, which kexecs by itself. Stage 2 runs `luoagent restore` and checks counters,
canaries, vmstate size, RAM bytes copied and the blackout; then an injected fault after quiesce
and a refused reboot syscall must both leave the VMs running with no session behind. Stage 3
meets a manifest of an unknown schema; stage 4 a boot with no manifest at all."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from luoagent import manifest as mf
from luoagent import testmode
from luoagent.lab.scenarios._common import agent_env, guest_elf

NAME = "vm-update"
DESCRIPTION = "two VMs across a real kexec with luoagent update/restore; rollback; manifest errors"
MEMORY = "1G"
SLOW = True
TIMEOUT = 400.0

VMS = ("a", "b")
#: a is started with `luoagent vm start`; b by "another tool" (plain QEMU) and adopted by its
#: QMP socket, so both ways in are exercised
STARTED_BY_LUOAGENT = "a"
#: a runs unprivileged (`vm start --user`); b, adopted, runs as root: restore must keep both
UNPRIVILEGED_USER, UNPRIVILEGED_IDS = "nobody", [65534, 65534]
VM_RAM = 64 * 1024 * 1024
VM_ROOT = Path("/run/luoagent/vms")  # `luoagent vm`'s state root
RUN_ROOT = Path("/run/luoagent-lab")  # the adopted guest's socket + serial log (tmpfs)
OUT_DIR = Path("/lab/vm-update")  # the run disk: what the update printed survives its kexec
KEY = "vm-update"

#: KTAP descriptions the host-side tests and the demo look up
UPDATE_KEXECED = "luoagent update kexec'd into the new kernel (boot id changed)"
RESTORE_OK = "luoagent restore brought every VM back"
COUNTER_CONTINUES = "guest {vm}: counter continues from where it stopped (no guest reboot)"
COUNTER_RISING = "guest {vm}: counter rising after restore"
CANARY_OK = "guest {vm}: 32 MiB canary in guest RAM byte-identical across kexec"
VMSTATE_SMALL = "guest {vm}: vmstate < 1 % of guest RAM"
RAM_NOT_COPIED = ("guest {vm}: no guest RAM block in the cpr-reboot stream (QEMU's migrated RAM blocks "
                  "total less than the guest's), at most 1 % of guest RAM in RAM pages QEMU wrote")
LISTED = "restored VMs are registered in the vm state dir"
DRY_RUN = "update --dry-run with real LUO: every step but the kexec, then rolled back"
ROLLBACK_FAULT = "fault after quiesce: update fails naming the step, VMs keep running"
ROLLBACK_REBOOT = "reboot syscall refused: update fails naming the step, VMs keep running"
RESCUE_WRITTEN = "restore that fails for VM b writes it as a rescue image, restores a, exits non-zero"
RESCUE_RESTORED = "restore --from-rescue brings VM b back from its rescue image"
RESCUE_NOT_PRESERVABLE = "update refuses a VM whose RAM is a rescue file, naming it; nothing stopped"
NO_SESSION_LEFT = "after rollback ({case}): sessions luoagent/vm/a, luoagent/vm/b, luoagent can be created again"
VERSION_ERROR = "restore with a manifest of unknown major version fails naming both versions"
MISSING_ERROR = "restore in a boot with no manifest says there is nothing to restore"
SAME_IDENTITY = "guest {vm}: restored QEMU runs as the uid/gid the old one had (a: nobody, b: root)"


def luoagent(*args: str, fault: str = "", stdout=None, stderr=None, timeout: float = 240):
    """Run the agent's CLI like a user would."""
    env = agent_env()
    mode: list[str] = []
    if fault:
        env[testmode.FAULT_ENV] = fault
        mode = [testmode.FLAG]
    kw = {"stdout": stdout, "stderr": stderr} if stdout is not None else {"capture_output": True}
    return subprocess.run([sys.executable, "-m", "luoagent", *mode, *args], text=True, env=env, timeout=timeout, **kw)


def _dir(vm: str) -> Path:
    return (VM_ROOT if vm == STARTED_BY_LUOAGENT else RUN_ROOT) / vm


def _sock(vm: str) -> Path:
    return _dir(vm) / "qmp.sock"


def _serial(vm: str) -> Path:
    return _dir(vm) / "serial.log"


def start_guest(vm: str, seed: int) -> dict:
    """Start one counter guest whose RAM is a memfd (memory-backend-file, share=on)."""
    from luoagent import memfd
    from luoagent.adapters import qemu_binary, qemu_ram, qmp_client
    from luoagent.lab import guest

    if vm == STARTED_BY_LUOAGENT:
        r = luoagent("vm", "start", vm, "--memory", f"{VM_RAM >> 20}M", "--user", UNPRIVILEGED_USER, "--json", "--",
                     "-machine", "pc", "-nodefaults", "-kernel", str(guest_elf()), timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"luoagent vm start {vm} failed: {r.stderr[-1500:]}")
        pid = json.loads(r.stdout)["pid"]
    else:
        _dir(vm).mkdir(parents=True, exist_ok=True)
        fd = memfd.create(f"luoagent-lab-{vm}", VM_RAM)
        argv = ["-machine", "pc", "-accel", "tcg", "-m", str(VM_RAM >> 20), "-nodefaults", "-display", "none",
                "-kernel", str(guest_elf()), "-serial", f"file:{_serial(vm)}",
                *qemu_ram.ram_backend_args("ram0", VM_RAM, fd=fd)]
        proc = qemu_binary.launch(qemu_binary.find_qemu(), argv, pass_fds=[fd], qmp_socket=_sock(vm),
                           log=_dir(vm) / "qemu.log", daemon=True)
        os.close(fd)  # QEMU holds the RAM; the update takes it from QEMU with pidfd_getfd
        pid = proc.pid

        async def qmp_up():
            async with await qmp_client.Qmp.connect(_sock(vm), timeout=60, process=proc):
                pass

        asyncio.run(qmp_up())
    _pid, fd = ram_fd_of(_sock(vm))
    try:
        deadline = time.monotonic() + 90
        while not (guest.read_state(fd).magic_ok and guest.read_state(fd).ticks >= 1):
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {vm} did not start counting: "
                                   f"{(_dir(vm) / 'qemu.log').read_text(errors='replace')[-500:]}")
            time.sleep(0.1)
        memfd.write_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, seed)
        st = guest.read_state(fd)
    finally:
        os.close(fd)
    from luoagent.adapters import procfs

    return {"pid": pid, "seed": seed, "counter_started": st.counter, "identity": list(procfs.identity(pid))}


async def _ram_fd_of(sock: Path) -> tuple[int, int]:
    """(pid, our fd on its RAM memfd) of the QEMU behind a QMP socket."""
    from luoagent.adapters import procfs, qemu_ram, qmp_client
    pid = procfs.peer_pid(sock)
    async with await qmp_client.Qmp.connect(sock, timeout=30) as q:
        [backend] = await qemu_ram.inspect_ram(pid, q)
        if backend.qemu_fd is None:  # RAM in a named file (a VM restored from a rescue image)
            return pid, os.open(backend.mem_path, os.O_RDONLY | os.O_CLOEXEC)
        return pid, procfs.steal_fd(pid, backend.qemu_fd)


def ram_fd_of(sock: Path) -> tuple[int, int]:
    return asyncio.run(_ram_fd_of(sock))


async def _status(sock: Path) -> str:
    from luoagent.adapters import qmp_client

    async with await qmp_client.Qmp.connect(sock, timeout=30) as q:
        return await q.status()


def counters_rising(ctx, case: str) -> bool:
    from luoagent.lab import guest

    good = True
    for vm in VMS:
        status = asyncio.run(_status(_sock(vm)))
        _pid, fd = ram_fd_of(_sock(vm))
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            c2 = guest.read_state(fd).counter
        finally:
            os.close(fd)
        good &= ctx.check(status == "running" and c2 > c1, f"{case}: guest {vm} running, counter rising",
                          f"status {status}, counter {c1} -> {c2}")
    return good


def sessions_free(ctx, case: str) -> None:
    """The proof that rollback released every session: the same names can be created again."""
    from luoagent.luo import LiveUpdate

    names = [mf.vm_session_name(vm) for vm in VMS] + [mf.MANIFEST_SESSION]
    made, diag = [], ""
    try:
        with LiveUpdate.open() as lu:
            for n in names:
                made.append(lu.create_session(n))
    except Exception as exc:
        diag = f"{type(exc).__name__}: {exc}"
    finally:
        for s in made:
            s.close()
    ctx.check(len(made) == len(names) and not diag, NO_SESSION_LEFT.format(case=case), diag)
    from luoagent.adapters import kexec

    ctx.check(not kexec.loaded(), f"after rollback ({case}): no kexec image left loaded")


# ---------------------------------------------------------------------------------------
def stage_update(ctx) -> None:
    from luoagent.lab import guest

    st = ctx.state.setdefault(KEY, {})
    st["boot_id"] = ctx.boot_id
    vms = {}
    for vm in VMS:
        vms[vm] = start_guest(vm, secrets.randbits(48))
        ctx.diag(f"guest {vm}: pid {vms[vm]['pid']}, {VM_RAM >> 20} MiB memfd RAM, canary seed {vms[vm]['seed']}")
    st["vms"] = vms
    for vm in VMS:
        _pid, fd = ram_fd_of(_sock(vm))
        try:
            vms[vm]["counter_before_update"] = guest.read_state(fd).counter
        finally:
            os.close(fd)
        ctx.diag(f"guest {vm}: counter {vms[vm]['counter_before_update']} before update")
    st["vms"] = vms
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    st["update_started_ns"] = time.time_ns()
    ctx.save()
    vm_args = [a for vm in VMS for a in ("--vm", vm if vm == STARTED_BY_LUOAGENT else f"{vm}={_sock(vm)}")]
    ctx.diag(f"running: luoagent update --kernel /lab/bzImage --reuse-cmdline {' '.join(vm_args)} --json")
    with open(OUT_DIR / "update.json", "w") as out, open(OUT_DIR / "update.err", "w") as err:
        r = luoagent("update", "--kernel", "/lab/bzImage", "--reuse-cmdline", *vm_args, "--json",
                     stdout=out, stderr=err)
    # only reached if the update did not kexec
    ctx.not_ok(UPDATE_KEXECED, f"luoagent update returned {r.returncode}:\n"
               + (OUT_DIR / "update.err").read_text(errors="replace")[-3000:])
    raise RuntimeError("luoagent update did not kexec")


def stage_restore(ctx) -> None:
    from luoagent import memfd
    from luoagent.lab import guest

    st = ctx.state[KEY]
    ctx.check(ctx.boot_id != st["boot_id"], UPDATE_KEXECED, f"boot id still {ctx.boot_id}")
    for line in (OUT_DIR / "update.err").read_text(errors="replace").splitlines():
        ctx.diag("update: " + line)
    t0 = time.monotonic()
    rescue_mode = bool(ctx.debug.get("restore_fault"))
    # debug restore_fault: VM b's restore fails on purpose after its QEMU started (test only)
    r = luoagent("restore", "--json", fault="restore-vm:b" if rescue_mode else "")
    restore_s = time.monotonic() - t0
    for line in r.stderr.splitlines():
        ctx.diag("restore: " + line)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {"ok": False, "vms": []}
    if rescue_mode:
        outcome = {v["name"]: v for v in doc.get("vms", [])}
        b = outcome.get("b", {})
        ctx.check(r.returncode == 1 and outcome.get("a", {}).get("ok") and not b.get("ok") and b.get("rescue")
                  and "--from-rescue" in b.get("retry", ""), RESCUE_WRITTEN, r.stdout[-2000:] + r.stderr[-1000:])
        again = luoagent("restore", "--from-rescue", b.get("rescue", "/nonexistent"), "--json")
        for line in again.stderr.splitlines():
            ctx.diag("rescue: " + line)
        try:
            back = json.loads(again.stdout)["vms"][0]
        except (ValueError, KeyError, IndexError):
            back = {}
        ctx.check(again.returncode == 0 and back.get("status") == "running", RESCUE_RESTORED,
                  again.stdout[-1500:] + again.stderr[-1500:])
        doc = {"ok": True, "vms": [outcome.get("a", {}), {**b, **back, "ram_bytes_copied": b.get("ram_bytes_copied"),
                                                   "no_guest_ram_block_in_stream": b.get("no_guest_ram_block_in_stream")}]}
    else:
        ctx.check(r.returncode == 0 and doc.get("ok"), RESTORE_OK, r.stdout[-2000:] + r.stderr[-2000:])
    st["restore"] = doc
    by_name = {v["name"]: v for v in doc.get("vms", [])}
    for vm in VMS:
        v = by_name.get(vm, {})
        before = st["vms"][vm]["counter_before_update"]
        ctx.diag(f"guest {vm}: blackout {v.get('blackout_ns', 0) / 1e9:.3f} s (stop -> running, across kexec), "
                 f"vmstate {v.get('vmstate_bytes')} B of {v.get('ram_bytes', 0) >> 20} MiB RAM, "
                 f"guest RAM copied at most {v.get('ram_bytes_copied')} B (RAM page bytes QEMU wrote), "
                 f"RAM blocks in stream {v.get('ram_blocks_in_stream_bytes')} B")
        ctx.check(0 < v.get("vmstate_bytes", 0) < VM_RAM // 100, VMSTATE_SMALL.format(vm=vm), str(v))
        ctx.check(v.get("no_guest_ram_block_in_stream") is True and 0 <= v.get("ram_bytes_copied", -1) < VM_RAM // 100,
                  RAM_NOT_COPIED.format(vm=vm), str(v))
        from luoagent.adapters import procfs

        before_ids = st["vms"][vm].get("identity")
        try:
            now_ids = list(procfs.identity(procfs.peer_pid(_sock(vm))))
        except Exception as exc:
            now_ids = [f"{type(exc).__name__}: {exc}"]
        ctx.diag(f"guest {vm}: QEMU uid/gid {before_ids} before update, {now_ids} after restore")
        ctx.check(now_ids == before_ids == (UNPRIVILEGED_IDS if vm == STARTED_BY_LUOAGENT else [0, 0]),
                  SAME_IDENTITY.format(vm=vm), f"before {before_ids}, after {now_ids}")
        try:
            _pid, fd = ram_fd_of(_sock(vm))
        except Exception as exc:
            ctx.not_ok(COUNTER_CONTINUES.format(vm=vm), f"cannot reach restored guest {vm}: {exc}")
            continue
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            c2 = guest.read_state(fd).counter
            serial = _serial(vm).read_text(errors="replace") if _serial(vm).exists() else ""
            ctx.check(c1 >= before and guest.SERIAL_START not in serial, COUNTER_CONTINUES.format(vm=vm),
                      f"counter {c1} after restore, {before} before update; serial: {serial[-300:]!r}")
            ctx.check(c2 > c1, COUNTER_RISING.format(vm=vm), f"counter {c1} -> {c2}")
            ctx.diag(f"guest {vm}: counter {before} before update -> {c1} after restore -> {c2} 0.5 s later")
            ctx.check(memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, st["vms"][vm]["seed"]),
                      CANARY_OK.format(vm=vm), "canary differs")
        finally:
            os.close(fd)
    ctx.diag(f"restore took {restore_s:.2f} s wall")
    listed = luoagent("vm", "list", "--json")
    try:
        rows = {r["name"]: r for r in json.loads(listed.stdout)["vms"]}
    except (ValueError, KeyError):
        rows = {}
    ctx.check(all(rows.get(vm, {}).get("status") == "running" for vm in VMS), LISTED,
              f"vm list rc={listed.returncode}: {listed.stdout[-800:]} {listed.stderr[-500:]}")
    again = luoagent("restore")
    ctx.check(again.returncode != 0 and "nothing to restore" in again.stderr and "Traceback" not in again.stderr,
              "a second restore in the same boot finds nothing to restore (the first one finished it)",
              again.stderr[-800:])
    ctx.check(all(asyncio.run(_status(_sock(vm))) == "running" for vm in VMS),
              "the second restore left the restored VMs alone")

    if rescue_mode:
        # b's RAM is now a regular file on disk: a live update must refuse it before touching anything
        r = luoagent("update", "--kernel", "/lab/bzImage")
        ctx.check(r.returncode != 0 and "VM b" in r.stderr and "Traceback" not in r.stderr,
                  RESCUE_NOT_PRESERVABLE, r.stderr[-1500:])
        counters_rising(ctx, "after the refused update")

    # ---- rollback with real LUO sessions (every VM in the state dir: no --vm) -----------------
    vm_args: list[str] = []
    cases = (("fault after quiesce", "after-quiesce", "after-quiesce", ROLLBACK_FAULT),
             ("reboot refused", "reboot", "reboot", ROLLBACK_REBOOT))
    if not rescue_mode:
        r = luoagent("update", "--kernel", "/lab/bzImage", "--dry-run", "--json")
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            doc = {}
        good = r.returncode == 0 and doc.get("dry_run") and len(doc.get("vms", [])) == len(VMS) and all(
            0 < v["vmstate_bytes"] < VM_RAM // 100 and v["no_guest_ram_block_in_stream"] is True
            and v["guest_ram_bytes_copied_at_most"] < VM_RAM // 100 for v in doc["vms"])
        ctx.check(good, DRY_RUN, r.stdout[-1500:] + r.stderr[-1500:])
        ctx.diag("dry run phases: " + ", ".join(f"{p['phase']} {p['seconds']:.3f}s" for p in doc.get("phases", [])))
        counters_rising(ctx, "dry run")
        sessions_free(ctx, "dry run")
    for case, fault, step, desc in ([] if rescue_mode else cases):
        r = luoagent("update", "--kernel", "/lab/bzImage", *vm_args, fault=fault)
        for line in r.stderr.splitlines()[-8:]:
            ctx.diag(f"{case}: {line}")
        ctx.check(r.returncode == 1 and f"update failed at step {step}" in r.stderr and "resumed" in r.stderr
                  and "Traceback" not in r.stderr, desc, r.stderr[-1500:])
        counters_rising(ctx, case)
        sessions_free(ctx, case)

    # ---- leave a manifest of an unknown major version for the next boot --------------------
    _stop_guests()
    from luoagent.luo import LiveUpdate

    fd = os.memfd_create("luoagent-manifest-future", os.MFD_ALLOW_SEALING)
    os.write(fd, json.dumps({"schema": "99.0", "vms": []}).encode())
    # sealed like every manifest update writes: restore refuses an unsealed one before reading it
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
    with LiveUpdate.open() as lu:
        s = lu.create_session(mf.MANIFEST_SESSION)
        s.preserve(fd, mf.MANIFEST_TOKEN)
    ctx.keep.extend([s, fd])


def _stop_guests() -> None:
    from luoagent.adapters import qmp_client

    async def quit_one(vm):
        try:
            async with await qmp_client.Qmp.connect(_sock(vm), timeout=10) as q:
                await q.quit()
        except Exception:
            pass

    for vm in VMS:
        asyncio.run(quit_one(vm))


def stage_unknown_version(ctx) -> None:

    r = luoagent("restore")
    ours = "{}.{}".format(*mf.SCHEMA_VERSION)  # the version this luoagent writes, named in the error
    ctx.check(r.returncode != 0 and "99.0" in r.stderr and ours in r.stderr and "Traceback" not in r.stderr,
              VERSION_ERROR, r.stderr[-1500:])
    ctx.diag("restore: " + r.stderr.strip()[-400:])


def stage_no_manifest(ctx) -> None:
    r = luoagent("restore")
    ctx.check(r.returncode != 0 and "nothing to restore" in r.stderr and "Traceback" not in r.stderr,
              MISSING_ERROR, r.stderr[-1500:])
    ctx.diag("restore: " + r.stderr.strip()[-400:])


def stages():
    return [stage_update, stage_restore, stage_unknown_version, stage_no_manifest]
