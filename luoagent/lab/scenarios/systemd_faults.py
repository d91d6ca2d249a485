"""Lab scenario systemd-faults: fault cases 1-12 of issue 9 on a systemd host, two VMs as units,
twelve cases on one `systemctl kexec` (tests/lab/test_systemd_faults_lab.py).

Stage 1, cases 1-7: a `luoagent update --dry-run` through the service (real LUO sessions, a
real kexec_file_load) interrupted at a pause point: the daemon SIGKILLed (1-5; systemd restarts
it and it undoes its journal and fd store), the client SIGKILLed (6; the daemon finishes the
job), SIGTERM to the daemon (7; it rolls back, exits, systemd restarts it); each time both VMs
run in place with counters rising, no kexec image, no session, no journal. Case 8: `systemctl stop luoagent` while an update waits after quiesce (test-mode
pause) must roll back: VMs running in place, counters rising, no kexec image, no session and
nothing in the fd store; then the retried update succeeds and kexecs. Stage 2, cases 9-12: the
daemon restoring at boot is SIGKILLed (`systemctl kill -s KILL`) at (9) the manifest read,
(10) b's memfds retrieved, (11) b's QEMU started before its vmstate load, (12) b's `cont`
answered before finish; each time systemd restarts it (the next pause point set by a drop-in),
and in the end every VM runs exactly once, counters continue, canaries identical."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

from luoagent.lab import host_units
from luoagent.lab.scenarios import systemd_update as su
from luoagent.lab.scenarios import vm_update as vu

NAME = "systemd-faults"
DESCRIPTION = ("systemd host: stop during update rolls back; daemon SIGKILLed at 4 restore points, "
               "restarted by systemd")
MEMORY = "1G"
FLAVOUR = "systemd"
SLOW = True
TIMEOUT = 1800.0
KEY = "systemd-faults"
VMS = su.VMS
TEST_DROP_IN = Path("/etc/systemd/system/luoagent.service.d/luoagent-lab-test-mode.conf")
CONSOLE_DROP_IN = Path("/etc/systemd/system/luoagent.service.d/luoagent-lab-console.conf")
PAUSE_WAIT = 400.0
OUT = Path("/lab/systemd-faults")    # the run disk: survives the kexec

#: case number -> (pause point, how the update is interrupted there, what that is)
UPDATE_CASES = {
    1: ("after-preflight", "kill", "the daemon SIGKILLed after preflight"),
    2: ("preserve-ram:a", "kill", "the daemon SIGKILLed during preserve-ram"),
    3: ("quiesce-migrating:b", "kill", "the daemon SIGKILLed during quiesce, b's migration in flight"),
    4: ("after-quiesce", "kill", "the daemon SIGKILLed after quiesce"),
    5: ("after-manifest", "kill", "the daemon SIGKILLed after the manifest"),
    6: ("after-quiesce", "client", "the client SIGKILLed mid-update"),
    7: ("quiesce-migrating:b", "term", "SIGTERM to the daemon during quiesce"),
}
#: case 6: how long the daemon waits at the pause before it goes on without its client
CLIENT_CASE_PAUSE_S = 5
INTERRUPTED = "({n}) {what}: {outcome}"
OUTCOMES = {"kill": "systemd restarted the daemon, which undid the update",
            "client": "the daemon finished the job without its client",
            "term": "the daemon rolled back and exited, the client got the rollback, systemd restarted it"}
UNDONE = "({n}) {what}: guest {vm} running in place, counter rising"
CLEAN = "({n}) {what}: no kexec image loaded, no session left (fd store empty), no journal"
CASE8 = "(8) systemctl stop luoagent during an update (paused after quiesce)"
CASE8_STOPPED = CASE8 + ": the daemon stopped, the client got the rollback"
CASE8_RUNNING = CASE8 + ": guest {vm} running in place, counter rising"
CASE8_NO_IMAGE = CASE8 + ": no kexec image loaded"
CASE8_NO_SESSION = CASE8 + ": no session left (names free again, fd store empty)"
RETRY_OK = "(8) the retried update succeeds: announced, then systemctl kexec (boot id changed)"
#: case number -> (pause point the daemon is SIGKILLed at, what it means)
RESTORE_CASES = {
    9: ("restore-after-manifest", "after the manifest was read"),
    # 10-12 all on b: VMs restore concurrently, so a pause on a would let b finish meanwhile and
    # leave no b step to kill at (a run on an idle machine did exactly that)
    10: ("restore-after-retrieve:b", "after b's memfds were retrieved"),
    11: ("restore-after-qemu-start:b", "after b's QEMU started, before its vmstate load"),
    12: ("restore-after-cont:b", "after b's cont, before finish"),
}
KILLED = "({n}) daemon SIGKILLed {what}: systemd restarted it"
FINAL_RESTORED = "(9-12) the last restarted daemon finished the restore"
RUNS_ONCE = "(9-12) guest {vm}: exactly one QEMU runs it"
COUNTER = "(9-12) guest {vm}: counter continues and rises"
CANARY = "(9-12) guest {vm}: 32 MiB canary byte-identical"
NOTHING_HELD = "(9-12) after restore: no session held, none in the fd store"


def test_mode(pause: str | None, seconds: float = 0) -> None:
    """Run luoagent.service in test mode paused at ``pause`` (None: back to the shipped unit),
    for ``seconds`` (0: until killed). Only written: a daemon-reload (or the next boot) makes
    systemd read it."""
    if pause is None:
        TEST_DROP_IN.unlink(missing_ok=True)
        return
    TEST_DROP_IN.write_text("# luoagent lab fault cases: test mode, paused where the scenario kills it\n"
                            "[Service]\nExecStart=\nExecStart=/usr/bin/luoagent --test-mode daemon\n"
                            f"Environment=LUOAGENT_PAUSE={pause}\n"
                            + (f"Environment=LUOAGENT_PAUSE_SECONDS={seconds:g}\n" if seconds else ""))


def service_pid_and_restarts() -> tuple[str, str]:
    return host_units.prop(host_units.SERVICE, "MainPID"), host_units.prop(host_units.SERVICE, "NRestarts")


def wait_restarted(before: tuple[str, str], timeout: float = 120, serve: bool = True) -> tuple[bool, str]:
    """Did systemd start the daemon again (a new MainPID, NRestarts one up) and, with ``serve``,
    is it idle and serving (its recovery done)?"""
    pid_before, restarts_before = before
    deadline = time.monotonic() + timeout
    pid_after, restarts_after = before
    while time.monotonic() < deadline:
        pid_after, restarts_after = service_pid_and_restarts()
        if pid_after not in ("0", pid_before) and restarts_after != restarts_before:
            break
        time.sleep(0.5)
    serving = not serve
    while time.monotonic() < deadline and not serving:
        doc, _err = host_units.status_json()
        serving = (doc or {}).get("phase") == "idle"
        if not serving:
            time.sleep(0.5)
    ok = (pid_after not in ("0", pid_before) and restarts_after.isdigit() and restarts_before.isdigit()
          and int(restarts_after) == int(restarts_before) + 1 and serving)
    return ok, f"MainPID {pid_before} -> {pid_after}, NRestarts {restarts_before} -> {restarts_after}, serving {serving}"


def restart_service() -> None:
    host_units.systemctl("daemon-reload")
    host_units.systemctl("restart", host_units.SERVICE)


def wait_paused(point: str, timeout: float = PAUSE_WAIT) -> tuple[bool, dict]:
    """Poll the status until the daemon reports ``paused_at == point`` (False if a restore ended first)."""
    deadline = time.monotonic() + timeout
    doc: dict = {}
    while time.monotonic() < deadline:
        got, _err = host_units.status_json()
        doc = got or doc
        paused = (got or {}).get("paused_at") or ""
        if paused == point:
            return True, doc
        job = (got or {}).get("job") or {}
        if job.get("state") in ("done", "failed") and job.get("op") == "restore":
            return False, doc
        time.sleep(0.5)
    return False, doc


def counter_rising(vm: str) -> tuple[bool, str]:
    from luoagent.lab import guest

    status = vu.asyncio.run(vu._status(su.sock(vm)))
    _pid, fd = vu.ram_fd_of(su.sock(vm))
    try:
        c1 = guest.read_state(fd).counter
        time.sleep(0.5)
        c2 = guest.read_state(fd).counter
    finally:
        os.close(fd)
    return status == "running" and c2 > c1, f"status {status}, counter {c1} -> {c2}"


def sessions_free() -> tuple[bool, str]:
    from luoagent import manifest as mf
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
    stored = host_units.prop(host_units.SERVICE, "NFileDescriptorStore")
    return len(made) == len(names) and not diag and stored == "0", f"{diag}; NFileDescriptorStore={stored!r}"


def update_client(*extra: str) -> subprocess.Popen:
    return subprocess.Popen(["/usr/bin/luoagent", "update", "--kernel", "/lab/bzImage", "--reuse-cmdline",
                             *[a for vm in VMS for a in ("--vm", vm)], "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupted_update(ctx, n: int) -> None:
    """Case ``n`` of 1-7: a dry-run update (sessions, kexec image: everything but the kexec)
    through the service, interrupted at its pause point; then everything must be as before."""
    from luoagent.adapters import kexec

    point, how, what = UPDATE_CASES[n]
    test_mode(point, CLIENT_CASE_PAUSE_S if how == "client" else 0)
    restart_service()
    client = update_client("--dry-run")
    paused, doc = wait_paused(point)
    before = service_pid_and_restarts()
    if how == "client":
        client.kill()
        client.wait(60)
        deadline = time.monotonic() + PAUSE_WAIT
        while time.monotonic() < deadline:
            doc = host_units.status_json()[0] or doc
            if (doc.get("job") or {}).get("state") in ("done", "failed") and doc.get("phase") == "idle":
                break
            time.sleep(0.5)
        job = doc.get("job") or {}
        good = paused and job.get("state") == "done" and job.get("dry_run") is True
        diag = f"job {job}"
    else:
        sig = "KILL" if how == "kill" else "TERM"
        # the daemon's own process: a SIGTERM to its helpers (systemctl, kexec) is no test
        kill = host_units.systemctl("kill", "--kill-whom=main", "-s", sig, host_units.SERVICE)
        _out, err = client.communicate(timeout=300)
        restarted, diag = wait_restarted(before)
        good = paused and kill.returncode == 0 and restarted and client.returncode != 0
        if how == "term":
            good = good and "rolled back" in err
        diag = f"{diag}; kill exit {kill.returncode}; client exit {client.returncode}: {err[-800:]}"
    ctx.check(good, INTERRUPTED.format(n=n, what=what, outcome=OUTCOMES[how]),
              f"paused at {point}: {paused} (status paused_at {doc.get('paused_at')}); {diag}\n"
              f"{host_units.journal(host_units.SERVICE, 30)}")
    for vm in VMS:
        running, diag = counter_rising(vm)
        ctx.check(running, UNDONE.format(n=n, what=what, vm=vm), diag)
    free, diag = sessions_free()
    doc = host_units.status_json()[0] or {}
    ctx.check(free and not kexec.loaded() and doc.get("journal") is None, CLEAN.format(n=n, what=what),
              f"{diag}; kexec image loaded {kexec.loaded()}; journal {doc.get('journal')}")
    if client.poll() is None:
        client.kill()
        client.wait(30)


def stage_stop_then_update(ctx) -> None:
    from luoagent.adapters import kexec

    st = ctx.state.setdefault(KEY, {})
    st["boot_id"] = ctx.boot_id
    # the daemon's log on the console too: what precedes a failure is then in the run's console.log
    CONSOLE_DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    CONSOLE_DROP_IN.write_text("[Service]\nStandardError=journal+console\n")
    if not host_units.install_and_start(ctx):
        raise RuntimeError("luoagent.service is not serving")
    vms = {vm: su.start_vm(vm, secrets.randbits(48)) for vm in VMS}
    st["vms"] = vms
    ctx.save()
    for n in sorted(UPDATE_CASES):
        interrupted_update(ctx, n)
    # case 8: an update paused after quiesce, then `systemctl stop luoagent`
    test_mode("after-quiesce")
    restart_service()
    client = update_client()
    paused, doc = wait_paused("after-quiesce")
    stop = host_units.systemctl("stop", host_units.SERVICE)
    out, err = client.communicate(timeout=300)
    ctx.check(paused and stop.returncode == 0 and client.returncode != 0, CASE8_STOPPED,
              f"paused {paused} ({doc.get('paused_at')}); stop exit {stop.returncode}; client exit "
              f"{client.returncode}: {err[-1500:]}\n{host_units.journal(host_units.SERVICE, 30)}")
    for vm in VMS:
        good, diag = counter_rising(vm)
        ctx.check(good, CASE8_RUNNING.format(vm=vm), diag)
    ctx.check(not kexec.loaded(), CASE8_NO_IMAGE)
    good, diag = sessions_free()
    ctx.check(good, CASE8_NO_SESSION, diag)
    # the retry, by the shipped (non-test-mode) daemon: a real update kexecs
    test_mode(None)
    restart_service()
    for vm in VMS:  # counters as the update starts, for "continues" after the kexec
        from luoagent.lab import guest

        _pid, fd = vu.ram_fd_of(su.sock(vm))
        try:
            vms[vm]["counter_before_update"] = guest.read_state(fd).counter
        finally:
            os.close(fd)
    st["vms"] = vms
    # what the next boot's daemon runs with: paused where case 9 kills it (read at that boot)
    test_mode(RESTORE_CASES[9][0])
    ctx.save()
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "retry.json", "w") as out, open(OUT / "retry.err", "w") as err:
        r = subprocess.run(["/usr/bin/luoagent", "update", "--kernel", "/lab/bzImage", "--reuse-cmdline",
                            *[a for vm in VMS for a in ("--vm", vm)], "--json"], stdout=out, stderr=err,
                           text=True, timeout=900)
    if r.returncode != 0:  # (a kexec stops this unit before it gets here)
        ctx.not_ok(RETRY_OK, f"exit {r.returncode}: {(OUT / 'retry.err').read_text()[-2000:]}")
        test_mode(None)
        raise RuntimeError("the retried update failed")
    time.sleep(600)  # systemd's shutdown stops this unit on the way to the kexec
    raise RuntimeError("the retried update returned but no systemctl kexec followed in 600 s")


def stage_kill_during_restore(ctx) -> None:
    from luoagent import memfd
    from luoagent.lab import guest

    st = ctx.state[KEY]
    try:
        announced = json.loads((OUT / "retry.json").read_text())
    except (OSError, ValueError):
        announced = {}
    ctx.check(ctx.boot_id != st["boot_id"] and bool(announced) and announced.get("ok", True) is not False,
              RETRY_OK, f"boot id {ctx.boot_id} (before {st['boot_id']}); client's result "
              f"{json.dumps(announced)[-1000:]}")
    numbers = sorted(RESTORE_CASES)
    for i, n in enumerate(numbers):
        point, what = RESTORE_CASES[n]
        paused, doc = wait_paused(point)
        before = service_pid_and_restarts()
        # the daemon systemd starts next pauses at the next case's point (the last one: none)
        test_mode(RESTORE_CASES[numbers[i + 1]][0] if i + 1 < len(numbers) else None)
        host_units.systemctl("daemon-reload")
        kill = host_units.systemctl("kill", "-s", "KILL", host_units.SERVICE)
        restarted, diag = wait_restarted(before, serve=False)
        ctx.check(paused and kill.returncode == 0 and restarted, KILLED.format(n=n, what=what),
                  f"paused at {point}: {paused} (status paused_at {doc.get('paused_at')}, phase "
                  f"{doc.get('phase')}); {diag}; kill exit {kill.returncode}")
    status = su.wait_for_restore()
    job = status.get("job") or {}
    ctx.check(job.get("op") == "restore" and job.get("state") == "done", FINAL_RESTORED,
              f"{json.dumps(status)[-2500:]}\n{host_units.journal(host_units.SERVICE, 60)}")
    qemus = su.qemu_pids()
    for vm in VMS:
        in_scope = [pid for pid, cg in qemus.items() if f"luoagent-vm-{vm}.scope" in cg]
        ctx.check(len(in_scope) == 1 and len(qemus) == len(VMS), RUNS_ONCE.format(vm=vm), f"QEMUs {qemus}")
        before = st["vms"][vm]
        try:
            _pid, fd = vu.ram_fd_of(su.sock(vm))
        except Exception as exc:
            ctx.not_ok(COUNTER.format(vm=vm), f"cannot reach guest {vm}: {exc}")
            ctx.not_ok(CANARY.format(vm=vm), f"cannot reach guest {vm}: {exc}")
            continue
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            c2 = guest.read_state(fd).counter
            ctx.check(c1 >= before["counter_before_update"] and c2 > c1, COUNTER.format(vm=vm),
                      f"before update {before['counter_before_update']}, now {c1} -> {c2}")
            ctx.check(memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, before["seed"]),
                      CANARY.format(vm=vm))
        finally:
            os.close(fd)
    fd_store = status.get("fd_store") or {}
    ctx.check(not status.get("sessions") and not fd_store.get("stored"), NOTHING_HELD,
              f"sessions {status.get('sessions')}, fd store {fd_store}")


def stages():
    return [stage_stop_then_update, stage_kill_during_restore]
