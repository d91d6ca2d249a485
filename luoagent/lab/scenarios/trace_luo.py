"""Lab scenario trace: `luoagent trace` run inside the lab VM against real LUO, across a real kexec.

Stage 1 traces a session create/preserve/close (readable output), attaches with --pid to a running
LUO program and detaches, attaches to `luoagent update --dry-run` driving a counter guest, and
finally traces a program that preserves a memfd and kexecs by itself (the trace survives on the
run disk). Stage 2 checks that trace and traces the retrieve/finish in the new kernel.

Run as a program (``python3 -m luoagent.lab.scenarios.trace_luo MODE``) it is the
traced LUO program: modes ``drop``, ``hold``, ``preserve`` and ``retrieve`` (see _PROGRAMS)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from luoagent.lab.scenarios._common import agent_env, guest_elf

NAME = "trace"
DESCRIPTION = "luoagent trace on real LUO: create/preserve, --pid attach + detach, update --dry-run, retrieve after kexec"
MEMORY = "1G"
SLOW = False
TIMEOUT = 400.0

MODULE = "luoagent.lab.scenarios.trace_luo"
OUT = Path("/lab/trace")  # the run disk: what stage 1 traced survives its kexec
KEY = "trace"

SESSION = "lab/trace"
MEMFD_NAME = "lab-trace"
TOKEN = 0x5452414345  # "TRACE": distinctive in the trace output
SIZE = 1024 * 1024
SEED = 0x7AC3
DROP_SESSION = "lab/trace/drop"
DROP_MEMFD = "lab-trace-drop"
DROP_TOKEN = 0xD409
HOLD_SESSION = "lab/trace/hold"
HOLD_MEMFD = "lab-trace-hold"
HOLD_TOKEN = 0x40D
VM = "tr"
VM_RAM_MB = 64

#: the kernel names a session file "[luo_session] NAME" (kernel/liveupdate/luo_session.c)
SESSION_LINK = "anon_inode:[luo_session] {}"
#: a memfd's /proc/PID/fd link (memfd_create(2) prefixes the name with "memfd:")
MEMFD_LINK = "/memfd:{} (deleted)"
#: a retrieved memfd's link on 7.2: mm/memfd_luo.c re-creates the file with an empty name and no
#: "memfd:" prefix, so its name does not cross the kexec
RETRIEVED_MEMFD_LINK = "/ (deleted)"

#: KTAP descriptions the host-side test looks up
PTRACE_IN_VM = "python-ptrace imports in the lab VM's python3 (from the rootfs)"
SUMMARY_DROP = "readable trace: summary line counts 1 created, 1 preserved, 1 outgoing closed, EEXIST 1, exit 0"
DETACH_OK = "--pid: Ctrl-C detaches, tracer exits 0, the program keeps running (not stopped, no tracer)"
DETACHED_EXIT = "--pid: the detached program ends normally (exit 0) and kept working after detach"
UPDATE_EXIT = "--pid on update --dry-run: update exits 0 under the tracer, tracer exits 0"
PRESERVE_CHECK = "kexec trace: PRESERVE_FD token {token:#x} of memfd fd {fd} into session fd {sfd} = 0"
RETRIEVE_SUMMARY = "retrieve trace: summary retrieved 1, fds retrieved 1, finished 1, LUO calls 4, ENOENT 1, exit 0"


# ------------------------------------------------------------------------------------------------
# the traced programs (run in their own process, under the tracer)
def _prog_drop(args) -> int:
    """Create a session, preserve a memfd, fail a duplicate token (EEXIST), close the session."""
    from luoagent import memfd
    from luoagent.errors import TokenExists
    from luoagent.luo import LiveUpdate

    info = {"pid": os.getpid()}
    with LiveUpdate.open() as lu:
        info["device_fd"] = lu.fileno()
        fd = memfd.create(DROP_MEMFD, 64 * 1024)
        other = memfd.create(DROP_MEMFD + "-2", 4096)
        session = lu.create_session(DROP_SESSION)
        info.update(memfd_fd=fd, other_fd=other, session_fd=session.fileno())
        session.preserve(fd, DROP_TOKEN)
        try:
            session.preserve(other, DROP_TOKEN)
        except TokenExists as exc:
            info["duplicate_token"] = exc.errno if hasattr(exc, "errno") else True
        session.close()  # outgoing: the kernel unpreserves the memfd
    print(json.dumps(info), flush=True)
    return 0


def _prog_hold(args) -> int:
    """Hold a session and ask its name (GET_NAME) every 0.1 s until ``args.stop`` exists."""
    from luoagent import memfd
    from luoagent.luo import LiveUpdate

    with LiveUpdate.open() as lu:
        session = lu.create_session(HOLD_SESSION)
    fd = memfd.create(HOLD_MEMFD, 4096)
    session.preserve(fd, HOLD_TOKEN)
    print(json.dumps({"pid": os.getpid(), "session_fd": session.fileno(), "memfd_fd": fd}), flush=True)
    calls = 0
    deadline = time.monotonic() + 120
    while not os.path.exists(args.stop):
        if session.name != HOLD_SESSION:
            return 3
        calls += 1
        if time.monotonic() > deadline:
            return 4
        time.sleep(0.1)
    session.close()
    print(json.dumps({"get_name_calls": calls}), flush=True)
    return 0


def _prog_preserve(args) -> int:
    """Preserve a patterned memfd in a session and kexec with the session still open."""
    from luoagent import memfd
    from luoagent.adapters import kexec
    from luoagent.luo import LiveUpdate

    fd = memfd.create(MEMFD_NAME, SIZE)
    memfd.write_pattern(fd, 0, SIZE, SEED)
    with LiveUpdate.open() as lu:
        device_fd = lu.fileno()
        session = lu.create_session(SESSION)
    session.preserve(fd, TOKEN)
    name = session.name
    info = {"pid": os.getpid(), "device_fd": device_fd, "session_fd": session.fileno(), "memfd_fd": fd,
            "name": name, "sha256": memfd.sha256(fd),
            "session_link": os.readlink(f"/proc/self/fd/{session.fileno()}"),
            "memfd_link": os.readlink(f"/proc/self/fd/{fd}")}
    _write_synced(Path(args.out), json.dumps(info))
    kexec.load(Path(args.kernel), None, args.cmdline)
    kexec.reboot_kexec()  # does not return on success; the session fd is open right up to it
    return 5


def _prog_retrieve(args) -> int:
    """Retrieve the session, fail an unknown token (ENOENT), retrieve the memfd, finish."""
    from luoagent import memfd
    from luoagent.errors import TokenNotFound
    from luoagent.luo import LiveUpdate

    with LiveUpdate.open() as lu:
        session = lu.retrieve_session(SESSION)
    info = {"pid": os.getpid(), "session_fd": session.fileno(),
            "session_link": os.readlink(f"/proc/self/fd/{session.fileno()}")}
    try:
        session.retrieve(TOKEN + 1)
    except TokenNotFound:
        info["unknown_token_refused"] = True
    fd = session.retrieve(TOKEN)
    info.update(memfd_fd=fd, memfd_link=os.readlink(f"/proc/self/fd/{fd}"), sha256=memfd.sha256(fd),
                pattern_ok=memfd.verify_pattern(fd, 0, SIZE, SEED))
    session.finish()
    session.close()
    os.close(fd)
    print(json.dumps(info), flush=True)
    return 0


_PROGRAMS = {"drop": _prog_drop, "hold": _prog_hold, "preserve": _prog_preserve, "retrieve": _prog_retrieve}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python3 -m {MODULE}", description="LUO programs the trace scenario traces")
    parser.add_argument("mode", choices=sorted(_PROGRAMS))
    parser.add_argument("--stop", default="/tmp/trace-hold.stop", help="hold: stop when this file exists")
    parser.add_argument("--out", default=str(OUT / "preserve-prog.json"), help="preserve: where to write fds")
    parser.add_argument("--kernel", default="/lab/bzImage", help="preserve: kernel to kexec")
    parser.add_argument("--cmdline", default=None, help="preserve: its command line (default: this one)")
    args = parser.parse_args(argv)
    return _PROGRAMS[args.mode](args)


# ------------------------------------------------------------------------------------------------
# helpers for the stages
def _agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "luoagent", *args]


def _prog(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", MODULE, mode, *args]


def _run(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, text=True, capture_output=True, env=agent_env(), timeout=timeout)


def _jsonl(path: Path) -> list[dict]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "unparsable", "text": line})
    return events


def _luo(events: list[dict], command: str) -> list[dict]:
    return [e for e in events if e.get("event") == "syscall" and (e.get("luo") or {}).get("command") == command]


def _syscalls(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e.get("event") == "syscall" and e.get("syscall") == name]


def _summary(events: list[dict]) -> dict:
    found = [e for e in events if e.get("event") == "summary"]
    return found[-1] if found else {}


def _show(ctx, title: str, events: list[dict], limit: int = 40) -> None:
    """The trace as `luoagent trace` prints it (same formatter), as KTAP diagnostics."""
    from luoagent.workflows.trace import TraceEvent, format_line

    ctx.diag(f"{title}:")
    shown = [e for e in events if e.get("event") in ("syscall", "summary")
             or e.get("what") in ("attached", "detached", "exited", "started")]
    for e in shown[:limit]:
        ev = TraceEvent(e["event"], {k: v for k, v in e.items() if k != "event"})
        ctx.diag("  " + format_line(ev))
    if len(shown) > limit:
        ctx.diag(f"  ... {len(shown) - limit} more")


def _proc_status(pid: int) -> dict:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
    except OSError:
        pass
    return out


def _wait_for(cond, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _line(lines: list[str], pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((line for line in lines if rx.search(line)), None)


# ------------------------------------------------------------------------------------------------
# stage 1, part A: a readable trace of create/preserve/duplicate token/close
def _part_drop(ctx) -> None:
    out = OUT / "drop.txt"
    r = _run(_agent("trace", "-o", str(out), "--", *_prog("drop")))
    lines = out.read_text(errors="replace").splitlines() if out.exists() else []
    ctx.diag("readable trace of the drop program (luoagent trace -o FILE -- python3 -m ... drop):")
    for line in lines:
        ctx.diag("  " + line)
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = {}
    ctx.check(r.returncode == 0 and info.get("duplicate_token"), "trace -- drop program: exit 0 passed through",
              f"rc {r.returncode}; stdout {r.stdout[-500:]}; stderr {r.stderr[-1500:]}")
    if not info:
        return
    pid, dev, mfd, sfd = info["pid"], info["device_fd"], info["memfd_fd"], info["session_fd"]
    session = re.escape(SESSION_LINK.format(DROP_SESSION))
    memfd_link = re.escape(MEMFD_LINK.format(DROP_MEMFD))
    ctx.check(_line(lines, rf"^\[{pid}\] openat\(path=\"/dev/liveupdate\", .*\) = {dev} -> /dev/liveupdate "),
              "readable: openat of /dev/liveupdate with the returned fd", f"device fd {dev}")
    ctx.check(_line(lines, rf"^\[{pid}\] memfd_create\(name=\"{DROP_MEMFD}\", .*\) = {mfd} -> {memfd_link} "),
              "readable: memfd_create shows the real memfd fd and its /memfd: link", f"memfd fd {mfd}")
    ctx.check(_line(lines, rf"^\[{pid}\] ioctl\({dev}</dev/liveupdate>, LUO_CREATE_SESSION, 0x[0-9a-f]+ "
                           rf"\{{size=72, fd=-?\d+, name=\"{re.escape(DROP_SESSION)}\"\}}\) = 0 "
                           rf"-> \{{fd={sfd}<{session}>\}}"),
              "readable: CREATE_SESSION decoded with the returned session fd and its [luo_session] link",
              f"session fd {sfd}")
    ctx.check(_line(lines, rf"^\[{pid}\] ioctl\({sfd}<{session}>, LUO_PRESERVE_FD, 0x[0-9a-f]+ "
                           rf"\{{size=16, fd={mfd}<{memfd_link}>, token={DROP_TOKEN:#x}\}}\) = 0 "),
              "readable: PRESERVE_FD shows session fd, memfd fd + link, token, result 0")
    ctx.check(_line(lines, rf"^\[{pid}\] ioctl\({sfd}<{session}>, LUO_PRESERVE_FD, .*fd={info['other_fd']}<.*"
                           rf"token={DROP_TOKEN:#x}\}}\) = -1 EEXIST \(File exists\)"),
              "readable: duplicate token shows = -1 EEXIST")
    ctx.check(_line(lines, rf"^\[{pid}\] close\({sfd}<{session}>\) = 0 .*!! outgoing session "
                           rf"'{re.escape(DROP_SESSION)}' closed: its 1 preserved file\(s\) are unpreserved"),
              "readable: closing the outgoing session is flagged (its 1 preserved file unpreserved)")
    ctx.check(_line(lines, r"^--- summary: sessions created 1, retrieved 0, finished 0; fds preserved 1, "
                           r"retrieved 0; LUO calls 3; outgoing sessions closed 1; errors: EEXIST 1; exit code 0$"),
              SUMMARY_DROP, lines[-1] if lines else "(no output)")


# stage 1, part B: --pid on a running LUO program, then Ctrl-C detaches it
def _part_hold(ctx) -> None:
    stop = Path("/tmp/trace-hold.stop")
    stop.unlink(missing_ok=True)
    out = OUT / "hold.jsonl"
    prog = subprocess.Popen(_prog("hold", "--stop", str(stop)), stdout=subprocess.PIPE, text=True, env=agent_env())
    tracer = None
    try:
        ready = json.loads(prog.stdout.readline() or "{}")
        ctx.diag(f"hold program: {ready}")
        time.sleep(0.3)  # it is running its GET_NAME loop: attach mid-run
        tracer = subprocess.Popen(_agent("trace", "--pid", str(prog.pid), "--json", "-o", str(out)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env())

        def traced_names() -> int:
            return len(_luo(_jsonl(out), "GET_NAME")) if out.exists() else 0

        seen = _wait_for(lambda: traced_names() >= 3, 90)
        ctx.check(seen, "--pid: GET_NAME calls of a running program are traced", f"{traced_names()} seen")
        tracer.send_signal(signal.SIGINT)
        t_out, t_err = tracer.communicate(timeout=60)
        status = _proc_status(prog.pid)
        ctx.check(tracer.returncode == 0 and f"detached from pid {prog.pid}; it keeps running" in t_err
                  and status.get("State", "?")[:1] in ("R", "S") and status.get("TracerPid") == "0",
                  DETACH_OK, f"tracer rc {tracer.returncode}, stderr {t_err[-800:]!r}; program {status.get('State')}, "
                  f"TracerPid {status.get('TracerPid')}")
        traced = traced_names()
        time.sleep(0.5)  # untraced, it must go on calling GET_NAME
        stop.touch()
        p_out, _ = prog.communicate(timeout=60)
        try:
            calls = json.loads(p_out.strip().splitlines()[-1])["get_name_calls"]
        except (ValueError, IndexError, KeyError):
            calls = -1
        ctx.check(prog.returncode == 0 and calls > traced, DETACHED_EXIT,
                  f"program rc {prog.returncode}, {calls} GET_NAME calls in all, {traced} traced")
        events = _jsonl(out)
        _show(ctx, "--pid trace of the hold program (first lines)", events, limit=6)
        sfd = ready.get("session_fd")
        names = _luo(events, "GET_NAME")
        # the detach may catch the program inside a GET_NAME: that one is reported "unfinished"
        done = [e for e in names if e["phase"] == "complete"]
        ctx.check(len(done) >= 3 and all(e["phase"] == "unfinished" for e in names if e not in done)
                  and all(e["fd"] == sfd and e["fd_target"] == SESSION_LINK.format(HOLD_SESSION)
                          and e["session"] == {"name": HOLD_SESSION, "direction": "unknown"}
                          and e["luo"]["exit"]["name"] == HOLD_SESSION and e["result"] == 0 for e in done),
                  "--pid: GET_NAME on session fd {sfd} named from its link, exit name decoded".format(sfd=sfd),
                  json.dumps(names[:1])[:1500])
        what = [e.get("what") for e in events if e.get("event") == "process"]
        summary = _summary(events)
        ctx.check(what[:1] == ["attached"] and "detached" in what and summary.get("interrupted") is True
                  and summary.get("luo_calls") == len(names) and summary.get("errors") == {}
                  and summary.get("outgoing_sessions_closed") == 0,
                  "--pid: attached/detached events; summary interrupted, LUO calls = GET_NAMEs traced, no errors",
                  f"events {what}; summary {summary}")
    finally:
        stop.touch()
        for p in (tracer, prog):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


# stage 1, part C: --pid on `luoagent update --dry-run` with a counter guest started by `luoagent vm start`
def _part_update(ctx) -> None:
    r = _run(_agent("vm", "start", VM, "--memory", f"{VM_RAM_MB}M", "--json", "--",
                    "-machine", "pc", "-nodefaults", "-kernel", str(guest_elf())))
    if not ctx.check(r.returncode == 0, f"luoagent vm start {VM} (counter guest, memfd RAM)", r.stderr[-1500:]):
        return
    out = OUT / "update.jsonl"
    upd_out = open(OUT / "update.out", "w")
    upd_err = open(OUT / "update.err", "w")
    # The update is held by a SIGSTOP before it execs, so the attach wins the race against its
    # first LUO call; the pid traced is the update's own (sh execs it).
    update = subprocess.Popen(["sh", "-c", 'kill -STOP $$; exec "$0" "$@"',
                               *_agent("update", "--kernel", "/lab/bzImage", "--dry-run", "--json")],
                              stdout=upd_out, stderr=upd_err, env=agent_env())
    tracer = None
    try:
        _wait_for(lambda: _proc_status(update.pid).get("State", "")[:1] == "T", 30)
        tracer = subprocess.Popen(_agent("trace", "--pid", str(update.pid), "-f", "--json", "-o", str(out)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=agent_env())
        attached = _wait_for(lambda: _proc_status(update.pid).get("TracerPid") == str(tracer.pid), 60)
        os.kill(update.pid, signal.SIGCONT)
        rc = update.wait(timeout=240)
        t_out, t_err = tracer.communicate(timeout=60)
        upd_out.close()
        upd_err.close()
        ctx.check(attached and rc == 0 and tracer.returncode == 0, UPDATE_EXIT,
                  f"attached {attached}; update rc {rc}: {(OUT / 'update.err').read_text(errors='replace')[-1500:]}; "
                  f"tracer rc {tracer.returncode}: {t_err[-800:]}")
        events = _jsonl(out)
        _show(ctx, "--pid -f trace of luoagent update --dry-run", events)
        creates = [e for e in _luo(events, "CREATE_SESSION") if e["result"] == 0]
        by_name = {e["luo"]["entry"]["name"]: e for e in creates}
        vm_session = f"luoagent/vm/{VM}"
        c = by_name.get(vm_session, {})
        ctx.check(c and c["luo"]["returned_fd_target"] == SESSION_LINK.format(vm_session)
                  and c["fd_target"] == "/dev/liveupdate",
                  f"update: CREATE_SESSION {vm_session} returns a session fd linked '{SESSION_LINK.format(vm_session)}'",
                  json.dumps(c)[:1500])
        sfd = (c.get("luo") or {}).get("returned_fd")
        pres = [e for e in _luo(events, "PRESERVE_FD") if e["fd"] == sfd and e["tgid"] == c.get("tgid")]
        ctx.check(pres and all(e["result"] == 0 and (e["luo"].get("preserved_fd_target") or "").startswith("/memfd:")
                               and e["session"] == {"name": vm_session, "direction": "outgoing"} for e in pres),
                  f"update: PRESERVE_FD of memfds (guest RAM, vmstate) into {vm_session}, result ok",
                  json.dumps(pres)[:1500])
        closes = [e for e in _syscalls(events, "close") if "outgoing-session-closed" in e["flags"]]
        summary = _summary(events)
        exited = [e for e in events if e.get("event") == "process" and e.get("what") == "exited"
                  and e.get("pid") == update.pid]
        ctx.check(summary.get("sessions_created") == len(creates) >= 2
                  and summary.get("fds_preserved") == len([e for e in _luo(events, "PRESERVE_FD") if e["result"] == 0])
                  and summary.get("outgoing_sessions_closed") == len(closes) >= 2
                  and summary.get("exit_code") == 0 and summary.get("interrupted") is False
                  and exited and exited[-1].get("exit_code") == 0,
                  "update: summary counts match the traced calls; the rollback's session closes are flagged; "
                  "the update exited 0 under the tracer",
                  f"summary {summary}; {len(creates)} creates, {len(closes)} flagged closes, exited {exited}")
    finally:
        for p in (tracer, update):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        upd_out.close()
        upd_err.close()
        _run(_agent("vm", "stop", VM, "--force"), timeout=60)


# stage 1, part D: trace a program that preserves a memfd and kexecs
def stage_preserve(ctx) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    ctx.state[KEY] = {"boot_id": ctx.boot_id}
    try:
        import ptrace

        ctx.ok(PTRACE_IN_VM)
        ctx.diag(f"python-ptrace {getattr(ptrace, '__version__', '?')} from {Path(ptrace.__file__).parent}")
    except ImportError as exc:
        ctx.not_ok(PTRACE_IN_VM, f"{exc}: vm-images/rootfs-apt.txt must list python3-ptrace")
        raise
    _part_drop(ctx)
    _part_hold(ctx)
    _part_update(ctx)
    cmdline = Path("/proc/cmdline").read_text().strip()
    ctx.state[KEY] = {"boot_id": ctx.boot_id, "cmdline": cmdline, "kernel": str(ctx.next_kernel)}
    ctx.diag("tracing a program that preserves a memfd and kexecs itself (trace: /lab/trace/preserve.jsonl)")
    r = _run(_agent("trace", "--json", "-o", str(OUT / "preserve.jsonl"), "--",
                    *_prog("preserve", "--kernel", str(ctx.next_kernel), "--cmdline", cmdline)), timeout=240)
    ctx.not_ok("the traced preserve program kexecs", f"it returned {r.returncode}: {r.stderr[-2000:]}")
    raise RuntimeError("the traced program did not kexec")


# ------------------------------------------------------------------------------------------------
def _check_preserve_trace(ctx) -> None:
    st = ctx.state[KEY]
    try:
        info = json.loads((OUT / "preserve-prog.json").read_text())
    except (OSError, ValueError) as exc:
        ctx.not_ok("the preserve program wrote its fds before kexec", str(exc))
        return
    events = _jsonl(OUT / "preserve.jsonl")
    _show(ctx, "trace of the preserve program (written before its kexec)", events)
    pid, dev, mfd, sfd = info["pid"], info["device_fd"], info["memfd_fd"], info["session_fd"]
    ctx.diag(f"the program saw: session fd {sfd} -> {info['session_link']!r}, memfd fd {mfd} -> {info['memfd_link']!r}")
    ctx.check(info["session_link"] == SESSION_LINK.format(SESSION),
              f"the 7.2 kernel links a session fd as '{SESSION_LINK.format(SESSION)}'", info["session_link"])
    started = [e for e in events if e.get("what") == "started"]
    ctx.check(started and started[0]["pid"] == pid, "kexec trace: the traced pid is the program's",
              f"started {started}, program pid {pid}")
    mc = [e for e in _syscalls(events, "memfd_create") if e["args"]["name"] == MEMFD_NAME]
    ctx.check(mc and mc[0]["returned_fd"] == mfd and mc[0]["returned_fd_target"] == MEMFD_LINK.format(MEMFD_NAME)
              == info["memfd_link"], f"kexec trace: memfd_create {MEMFD_NAME!r} = {mfd} -> {MEMFD_LINK.format(MEMFD_NAME)}",
              json.dumps(mc)[:1000])
    op = [e for e in _syscalls(events, "openat") if e["args"].get("path") == "/dev/liveupdate"]
    ctx.check(op and op[0]["returned_fd"] == dev and op[0]["returned_fd_target"] == "/dev/liveupdate",
              f"kexec trace: openat /dev/liveupdate = {dev}", json.dumps(op)[:1000])
    cs = _luo(events, "CREATE_SESSION")
    c = cs[0] if len(cs) == 1 else {}
    ctx.check(c and c["fd"] == dev and c["fd_target"] == "/dev/liveupdate" and c["result"] == 0
              and c["luo"]["entry"]["name"] == SESSION and c["luo"]["entry"]["size"] == 72
              and c["luo"]["exit"]["fd"] == sfd and c["luo"]["returned_fd"] == sfd
              and c["luo"]["returned_fd_target"] == info["session_link"] and c["errno"] is None,
              f"kexec trace: CREATE_SESSION {SESSION!r} = 0, returned session fd {sfd} -> {info['session_link']}",
              json.dumps(cs)[:1500])
    ps = _luo(events, "PRESERVE_FD")
    p = ps[0] if len(ps) == 1 else {}
    ctx.check(p and p["fd"] == sfd and p["fd_target"] == info["session_link"]
              and p["session"] == {"name": SESSION, "direction": "outgoing"}
              and p["luo"]["entry"]["token"] == TOKEN and p["luo"]["entry"]["fd"] == mfd
              and p["luo"]["preserved_fd_target"] == info["memfd_link"] and p["result"] == 0 and p["errno"] is None,
              PRESERVE_CHECK.format(token=TOKEN, fd=mfd, sfd=sfd), json.dumps(ps)[:1500])
    gn = _luo(events, "GET_NAME")
    ctx.check(gn and gn[0]["result"] == 0 and gn[0]["luo"]["exit"]["name"] == SESSION == info["name"],
              "kexec trace: GET_NAME exit struct carries the session name", json.dumps(gn)[:800])
    kl = _syscalls(events, "kexec_file_load")
    k = kl[0] if len(kl) == 1 else {}
    ctx.check(k and k["result"] == 0 and k["args"]["kernel"] == st["kernel"] and k["args"]["cmdline"] == st["cmdline"]
              and k["args"]["flags"] == ["KEXEC_FILE_NO_INITRAMFS"] and k["args"]["initrd_fd"] == -1,
              "kexec trace: kexec_file_load decoded (kernel path, cmdline, KEXEC_FILE_NO_INITRAMFS) = 0",
              json.dumps(kl)[:1500])
    rb = _syscalls(events, "reboot")
    ctx.check(rb and rb[-1]["phase"] == "entered" and rb[-1]["args"]["cmd_name"] == "KEXEC" and events[-1] is rb[-1]
              and not _summary(events),
              "kexec trace: reboot(KEXEC) reported at entry, fsync'ed, and it is the last line (no return)",
              json.dumps(events[-2:])[:1500])


def stage_retrieve(ctx) -> None:
    st = ctx.state[KEY]
    ctx.check(ctx.boot_id != st["boot_id"], "a new kernel booted (the traced program's kexec)",
              f"boot id still {ctx.boot_id}")
    _check_preserve_trace(ctx)
    out = OUT / "retrieve.jsonl"
    r = _run(_agent("trace", "--json", "-o", str(out), "--", *_prog("retrieve")))
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
        prog = json.loads((OUT / "preserve-prog.json").read_text())
    except (ValueError, IndexError, OSError):
        info, prog = {}, {}
    ctx.check(r.returncode == 0 and info.get("unknown_token_refused") and info.get("pattern_ok")
              and info.get("sha256") == prog.get("sha256"),
              "traced retrieve program: exit 0, memfd content identical across kexec",
              f"rc {r.returncode}: {r.stdout[-800:]} {r.stderr[-1500:]}")
    events = _jsonl(out) if out.exists() else []
    _show(ctx, "trace of the retrieve program (after kexec)", events)
    if not info:
        return
    sfd, mfd = info["session_fd"], info["memfd_fd"]
    ctx.diag(f"the program saw: session fd {sfd} -> {info['session_link']!r}, memfd fd {mfd} -> {info['memfd_link']!r}")
    rs = _luo(events, "RETRIEVE_SESSION")
    s = rs[0] if len(rs) == 1 else {}
    ctx.check(s and s["fd_target"] == "/dev/liveupdate" and s["result"] == 0 and s["luo"]["entry"]["name"] == SESSION
              and s["luo"]["returned_fd"] == sfd and s["luo"]["returned_fd_target"] == SESSION_LINK.format(SESSION)
              == info["session_link"],
              f"retrieve trace: RETRIEVE_SESSION {SESSION!r} = 0, returned fd {sfd} -> {SESSION_LINK.format(SESSION)}",
              json.dumps(rs)[:1500])
    rf = _luo(events, "RETRIEVE_FD")
    bad = [e for e in rf if e["luo"]["entry"]["token"] == TOKEN + 1]
    good = [e for e in rf if e["luo"]["entry"]["token"] == TOKEN]
    ctx.check(len(bad) == 1 and bad[0]["result"] == -2 and bad[0]["errno"] == "ENOENT"
              and bad[0]["luo"]["returned_fd"] is None,
              f"retrieve trace: RETRIEVE_FD of unknown token {TOKEN + 1:#x} = -1 ENOENT", json.dumps(bad)[:1000])
    ctx.check(len(good) == 1 and good[0]["result"] == 0 and good[0]["fd"] == sfd
              and good[0]["session"] == {"name": SESSION, "direction": "incoming"}
              and good[0]["luo"]["returned_fd"] == mfd and good[0]["luo"]["returned_fd_target"] == info["memfd_link"]
              == RETRIEVED_MEMFD_LINK,
              f"retrieve trace: RETRIEVE_FD token {TOKEN:#x} = 0, returned memfd fd {mfd} -> {info['memfd_link']}",
              json.dumps(good)[:1500])
    fin = _luo(events, "FINISH")
    ctx.check(len(fin) == 1 and fin[0]["result"] == 0 and fin[0]["fd"] == sfd and fin[0]["errno"] is None,
              "retrieve trace: FINISH on the session fd = 0", json.dumps(fin)[:1000])
    closes = [e for e in _syscalls(events, "close") if e["fd"] == sfd]
    ctx.check(closes and closes[-1]["result"] == 0 and closes[-1]["flags"] == []
              and closes[-1]["session"] == {"name": SESSION, "direction": "incoming"},
              "retrieve trace: closing the incoming session is not flagged as an unpreserve", json.dumps(closes)[:1000])
    summary = _summary(events)
    ctx.check(summary.get("sessions_retrieved") == 1 and summary.get("fds_retrieved") == 1
              and summary.get("sessions_finished") == 1 and summary.get("luo_calls") == 4
              and summary.get("errors") == {"ENOENT": 1} and summary.get("exit_code") == 0
              and summary.get("sessions_created") == 0 and summary.get("fds_preserved") == 0
              and summary.get("outgoing_sessions_closed") == 0 and summary.get("interrupted") is False,
              RETRIEVE_SUMMARY, json.dumps(summary))


def stages():
    return [stage_preserve, stage_retrieve]


if __name__ == "__main__":
    sys.exit(main())
