"""Lab scenario daemon-update: `luoagent daemon` holds the LUO sessions of an update; killed
(SIGKILL after the manifest) or stopped (SIGTERM, migration in flight) it leaves nothing behind
once recovered; then a real update through the daemon kexecs and a daemon started in the new
boot restores the VMs by itself.

Stage 1, with real LUO and a real kexec_file_load: (a) a --test-mode daemon paused after the
manifest holds three sessions but not /dev/liveupdate, is SIGKILLed, and the next daemon's
recovery resumes both guests; the session names are free again and no kexec image is loaded;
(b) the same for SIGTERM while b's cpr-reboot migration is in flight; (c) a plain daemon runs
the real update for its client and kexecs. Stage 2 (no systemd: the daemon retrieves the
`luoagent` session from /dev/liveupdate itself): `luoagent daemon` is started and nothing else
is typed; it restores both VMs as its job 1; `luoagent status --json` shows that job done and no
session held; counters continue, canaries intact."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from luoagent import testmode
from luoagent.lab.scenarios import vm_update as vu
from luoagent.lab.scenarios._common import agent_env

NAME = "daemon-update"
DESCRIPTION = "luoagent daemon holds the sessions: SIGKILL/SIGTERM recovered with real LUO, then a real kexec"
MEMORY = "1G"
SLOW = True
TIMEOUT = 900.0  # per stage: 261 s alone for both stages, over 400 s for stage 1 at host load 9
KEY = "daemon-update"
OUT_DIR = Path("/lab/daemon-update")  # the run disk: survives the kexec

HOLDS_SESSIONS = "paused daemon: status lists sessions luoagent/vm/a, luoagent/vm/b, luoagent as held"
DEVICE_NOT_HELD = "paused daemon holds its sessions but not /dev/liveupdate"
RECOVERED = "after {case}: the next daemon undid the journal (VMs resumed, kexec image unloaded)"
SIGTERM_EXIT = "SIGTERM during quiesce: the daemon rolled back and exited 0, its client got the reason"
KEXECED = "update through the daemon kexec'd into the new kernel (boot id changed)"
ANNOUNCED = "the client printed the daemon's result before the kexec"
RESTORED = "a daemon started after the kexec restored every VM by itself (no restore command typed)"
STATUS_AFTER_RESTORE = ("status --json after the boot restore: job 1 op restore done, every VM ok, "
                        "no session held, /dev/liveupdate not held")


def _vm_args() -> list[str]:
    return [a for vm in vu.VMS for a in ("--vm", vm if vm == vu.STARTED_BY_LUOAGENT else f"{vm}={vu._sock(vm)}")]


def _argv(*args: str, test_mode: bool) -> list[str]:
    return [sys.executable, "-m", "luoagent", *([testmode.FLAG] if test_mode else []), *args]


def start_daemon(log: Path, pause: str = "", test_mode: bool = False) -> subprocess.Popen:
    env = agent_env()
    env.pop(testmode.PAUSE_ENV, None)
    if pause:
        env[testmode.PAUSE_ENV] = pause
    out = open(log, "w")
    proc = subprocess.Popen(_argv("daemon", test_mode=test_mode), stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    out.close()
    # generous: under nested TCG on a loaded host a Python start alone has taken over a minute
    started = time.monotonic()
    while "serving" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > started + 240:
            raise RuntimeError(f"luoagent daemon did not start (exit status {proc.poll()}, "
                               f"{time.monotonic() - started:.0f} s): {log.read_text(errors='replace')[-1500:]}")
        time.sleep(0.05)
    return proc


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {text!r} in the daemon log: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def _client(*args: str) -> subprocess.Popen:
    return subprocess.Popen(_argv(*args, test_mode=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=agent_env())


def _status(ctx) -> dict:
    r = subprocess.run(_argv("status", "--json", test_mode=False), capture_output=True, text=True,
                       env=agent_env(), timeout=60)
    try:
        return json.loads(r.stdout)
    except ValueError:
        ctx.diag(f"status: {r.stderr[-500:]}")
        return {}


def _recover_with_new_daemon(ctx, case: str) -> None:
    from luoagent.adapters import kexec

    log = OUT_DIR / f"daemon-recover-{case.split()[0]}.log"
    d = start_daemon(log)  # recovery runs before it serves
    text = log.read_text(errors="replace")
    for line in text.splitlines():
        ctx.diag(f"daemon ({case}): {line}")
    ctx.check("undoing what it records" in text and "NOT UNDONE" not in text and not kexec.loaded(),
              RECOVERED.format(case=case), text[-1500:])
    vu.counters_rising(ctx, case)
    d.send_signal(signal.SIGTERM)
    d.wait(60)
    vu.sessions_free(ctx, case)


# ---------------------------------------------------------------------------------------
def stage_faults_then_update(ctx) -> None:
    from luoagent.adapters import procfs
    from luoagent.lab import guest

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    st = ctx.state.setdefault(KEY, {})
    vms = {vm: vu.start_guest(vm, secrets.randbits(48)) for vm in vu.VMS}
    upd = ["update", "--kernel", "/lab/bzImage", "--reuse-cmdline", *_vm_args()]

    # (a) SIGKILL after the manifest: the daemon holds every session of the update
    log = OUT_DIR / "daemon-kill.log"
    d = start_daemon(log, pause="after-manifest", test_mode=True)
    client = _client(*upd, "--dry-run")
    wait_for(log, f"{testmode.PAUSED_BANNER} after-manifest", d)
    doc = _status(ctx)
    held = sorted(s["name"] for s in doc.get("sessions", []))
    ctx.check(held == ["luoagent", "luoagent/vm/a", "luoagent/vm/b"], HOLDS_SESSIONS, json.dumps(doc)[-1500:])
    holders = procfs.holders("/dev/liveupdate")
    ctx.check(not holders, DEVICE_NOT_HELD, str(holders))
    d.send_signal(signal.SIGKILL)
    d.wait(30)
    client.communicate(timeout=60)
    _recover_with_new_daemon(ctx, "daemon SIGKILLed after the manifest")

    # (b) SIGTERM while b's migration is in flight: full rollback, then the daemon exits
    log = OUT_DIR / "daemon-term.log"
    d = start_daemon(log, pause="quiesce-migrating:b", test_mode=True)
    client = _client(*upd, "--dry-run")
    wait_for(log, f"{testmode.PAUSED_BANNER} quiesce-migrating:b", d)
    d.send_signal(signal.SIGTERM)
    rc = d.wait(120)
    _out, err = client.communicate(timeout=60)
    for line in log.read_text(errors="replace").splitlines():
        ctx.diag(f"daemon (SIGTERM): {line}")
    ctx.check(rc == 0 and "interrupted by SIGTERM" in err and "rolled back" in err, SIGTERM_EXIT,
              f"daemon exit {rc}; client: {err[-1500:]}")
    from luoagent.adapters import kexec

    ctx.check(not kexec.loaded(), RECOVERED.format(case="SIGTERM during quiesce"), "kexec image still loaded")
    vu.counters_rising(ctx, "SIGTERM during quiesce")
    vu.sessions_free(ctx, "SIGTERM during quiesce")

    # (c) the real update, run by a plain daemon for its client
    for vm in vu.VMS:
        _pid, fd = vu.ram_fd_of(vu._sock(vm))
        try:
            vms[vm]["counter_before_update"] = guest.read_state(fd).counter
        finally:
            os.close(fd)
    st.update(boot_id=ctx.boot_id, vms=vms)
    ctx.save()
    start_daemon(OUT_DIR / "daemon-update.log")
    with open(OUT_DIR / "update.json", "w") as out, open(OUT_DIR / "update.err", "w") as err:
        r = subprocess.run(_argv(*upd, "--json", test_mode=False), stdout=out, stderr=err, text=True,
                           env=agent_env(), timeout=300)
    ctx.not_ok(KEXECED, f"the client returned {r.returncode}:\n"
               + (OUT_DIR / "update.err").read_text(errors="replace")[-2000:]
               + (OUT_DIR / "daemon-update.log").read_text(errors="replace")[-2000:])
    raise RuntimeError("the update through the daemon did not kexec")


def stage_restore(ctx) -> None:
    from luoagent import memfd
    from luoagent.lab import guest

    st = ctx.state[KEY]
    ctx.check(ctx.boot_id != st["boot_id"], KEXECED, f"boot id still {ctx.boot_id}")
    for name in ("update.err", "daemon-update.log"):
        for line in (OUT_DIR / name).read_text(errors="replace").splitlines():
            ctx.diag(f"{name}: {line}")
    try:
        announced = json.loads((OUT_DIR / "update.json").read_text())
    except ValueError:
        announced = {}
    ctx.check(announced.get("status") == "rebooting into the new kernel", ANNOUNCED, str(announced)[:500])
    from luoagent.adapters import procfs

    log = OUT_DIR / "daemon-boot-restore.log"
    t0 = time.monotonic()
    d = start_daemon(log)  # nothing else: the daemon finds the incoming sessions itself
    r = subprocess.run(_argv("status", "--follow", "--json", test_mode=False), capture_output=True, text=True,
                       env=agent_env(), timeout=300)
    ctx.diag(f"daemon start to restore end: {time.monotonic() - t0:.1f} s")
    for line in log.read_text(errors="replace").splitlines():
        ctx.diag("daemon: " + line)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = {}
    ctx.check(r.returncode == 0 and doc.get("ok") and len(doc.get("vms", [])) == len(vu.VMS)
              and all(v.get("ok") for v in doc["vms"]), RESTORED, r.stdout[-1500:] + r.stderr[-1500:])
    status = _status(ctx)
    job = status.get("job") or {}
    ctx.check(job.get("id") == 1 and job.get("op") == "restore" and job.get("state") == "done"
              and status.get("sessions") == [] and status.get("phase") == "idle"
              and not procfs.holders("/dev/liveupdate"), STATUS_AFTER_RESTORE, json.dumps(status)[-1500:])
    for vm in vu.VMS:
        before = st["vms"][vm]["counter_before_update"]
        _pid, fd = vu.ram_fd_of(vu._sock(vm))
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            c2 = guest.read_state(fd).counter
            ctx.check(c1 >= before and c2 > c1, vu.COUNTER_CONTINUES.format(vm=vm), f"{before} -> {c1} -> {c2}")
            ctx.check(memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, st["vms"][vm]["seed"]),
                      vu.CANARY_OK.format(vm=vm), "canary differs")
        finally:
            os.close(fd)
    d.send_signal(signal.SIGTERM)
    d.wait(60)


def stages():
    return [stage_faults_then_update, stage_restore]
