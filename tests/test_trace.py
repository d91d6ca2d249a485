"""Host tests for `luoagent trace`: a C tracee issues LUO ioctls on non-LUO fds (they fail with ENOTTY).

The program prints what it sent; every decoded field is checked against that, on any kernel."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from luoagent._luo_shim import ffi, lib
from luoagent.workflows import trace as trace_wf

REPO = Path(__file__).resolve().parents[1]
PROG_SRC = REPO / "tests" / "trace_prog" / "luo_trace_prog.c"

# the documented JSON contract (module docstring of luoagent.workflows.trace, docs/trace.md)
SYSCALL_FIELDS = {
    "event", "pid", "tgid", "syscall", "phase", "ts", "duration_s", "args", "fd", "fd_target", "session",
    "luo", "result", "errno", "error", "returned_fd", "returned_fd_target", "flags", "note",
}
LUO_FIELDS = {"command", "request", "arg", "struct", "entry", "exit", "returned_fd", "returned_fd_target"}
SUMMARY_FIELDS = {
    "event", "sessions_created", "sessions_retrieved", "fds_preserved", "fds_retrieved",
    "sessions_finished", "luo_calls", "outgoing_sessions_closed", "errors", "exit_code", "interrupted",
}
LONG_NAME = "".join(chr(ord("a") + i % 26) for i in range(lib.LUO_SESSION_NAME_LENGTH - 1))


@pytest.fixture(scope="session")
def prog(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: install it (apt-get install gcc) to build the trace test program")
    out = tmp_path_factory.mktemp("trace_prog") / "luo_trace_prog"
    subprocess.run([gcc, "-O2", "-Wall", "-Werror", "-pthread", f"-I{REPO / 'csrc'}", "-o", str(out), str(PROG_SRC)],
                   check=True)
    return out


def luoagent(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 60)
    return subprocess.run([sys.executable, "-m", "luoagent", *args], capture_output=True, text=True, **kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def calls_from(stdout: str) -> list[dict]:
    calls = []
    for line in stdout.splitlines():
        if line.startswith("CALL "):
            _, label, pid, request, fd, arg, err = line.split()
            calls.append({"label": label, "pid": int(pid), "request": int(request, 16), "fd": int(fd),
                          "arg": int(arg, 16), "errno": int(err)})
    return calls


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


# --- decoding ----------------------------------------------------------------------------------
def test_json_decodes_every_field_the_program_sent(prog, tmp_path):
    out = tmp_path / "trace.jsonl"
    proc = luoagent("trace", "--json", "-o", str(out), "--", str(prog), "decode")
    assert_no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    sent = calls_from(proc.stdout)
    assert [c["label"] for c in sent] == ["create", "create_long", "retrieve", "create_unterminated",
                                         "preserve_0", "preserve_max", "retrieve_fd", "finish", "get_name",
                                         "bad_pointer", "kernel_pointer", "null_pointer"]
    events = read_jsonl(out)
    luo = [e for e in events if e["event"] == "syscall" and e["luo"]]
    assert len(luo) == len(sent)
    by_label = {}
    for call, ev in zip(sent, luo):
        by_label[call["label"]] = ev
        assert set(ev) == SYSCALL_FIELDS
        assert set(ev["luo"]) >= LUO_FIELDS
        assert ev["pid"] == call["pid"]
        assert ev["fd"] == call["fd"]
        assert int(ev["luo"]["request"], 16) == call["request"]
        assert int(ev["luo"]["arg"], 16) == call["arg"]
        assert ev["result"] == -call["errno"]
        assert ev["errno"] == errno.errorcode[call["errno"]]
        assert ev["error"] == os.strerror(call["errno"])
        assert ev["duration_s"] is not None and ev["duration_s"] >= 0
        assert ev["phase"] == "complete"
    cmd = {label: ev["luo"]["command"] for label, ev in by_label.items()}
    assert cmd == {"create": "CREATE_SESSION", "create_long": "CREATE_SESSION", "retrieve": "RETRIEVE_SESSION",
                   "create_unterminated": "CREATE_SESSION", "preserve_0": "PRESERVE_FD",
                   "preserve_max": "PRESERVE_FD", "retrieve_fd": "RETRIEVE_FD", "finish": "FINISH",
                   "get_name": "GET_NAME", "bad_pointer": "CREATE_SESSION", "kernel_pointer": "PRESERVE_FD",
                   "null_pointer": "FINISH"}
    session_size = ffi.sizeof("struct luo_session_arg")
    fd_size = ffi.sizeof("struct luo_fd_arg")

    e = by_label["create"]["luo"]["entry"]
    assert e == {"size": session_size, "fd": -1, "name": "luoagent/vm/alpha", "name_len": 17,
                 "name_terminated": True}
    assert by_label["create"]["fd_target"] == "/dev/null"
    e = by_label["create_long"]["luo"]["entry"]
    assert (e["name"], e["name_len"], e["name_terminated"]) == (LONG_NAME, 63, True)
    assert by_label["retrieve"]["luo"]["entry"]["name"] == "luoagent/vm/beta"
    assert by_label["retrieve"]["fd_target"].startswith("/memfd:luo-trace-test")
    e = by_label["create_unterminated"]["luo"]["entry"]
    assert (e["name"], e["name_len"], e["name_terminated"]) == ("x" * 64, 64, False)
    assert "unterminated-name" in by_label["create_unterminated"]["flags"]

    memfd = by_label["preserve_0"]["fd"]
    for label, token in (("preserve_0", 0), ("preserve_max", 2**64 - 1)):
        ev = by_label[label]
        assert ev["luo"]["entry"] == {"size": fd_size, "fd": memfd, "token": token}
        assert ev["luo"]["preserved_fd_target"].startswith("/memfd:luo-trace-test")
    assert by_label["retrieve_fd"]["luo"]["entry"] == {"size": fd_size, "fd": -1, "token": 0x8000000000000001}
    assert by_label["finish"]["luo"]["entry"] == {"size": ffi.sizeof("struct luo_finish_arg"), "reserved": 0}
    gn = by_label["get_name"]["luo"]
    assert gn["entry"]["size"] == ffi.sizeof("struct luo_get_name_arg")
    assert gn["exit"]["name"] == "prefilled"  # re-read at exit (the kernel wrote nothing: ENOTTY)

    bad = by_label["bad_pointer"]
    assert bad["luo"]["entry"] == {"error": f"unreadable pointer {bad['luo']['arg']} ({session_size} bytes)"}
    assert bad["luo"]["exit"]["error"].startswith("unreadable pointer 0x")
    assert "unreadable-pointer" in bad["flags"]
    assert by_label["kernel_pointer"]["luo"]["entry"] == {"error": f"unreadable pointer 0xffff888000001000 ({fd_size} bytes)"}
    finish_size = ffi.sizeof("struct luo_finish_arg")
    assert by_label["null_pointer"]["luo"]["entry"] == {"error": f"unreadable pointer 0x0 ({finish_size} bytes)"}
    for ev in luo:  # no call produced an fd
        assert ev["luo"]["returned_fd"] is None

    memfds = [e for e in events if e["event"] == "syscall" and e["syscall"] == "memfd_create"]
    assert len(memfds) == 1 and memfds[0]["args"]["name"] == "luo-trace-test"
    assert memfds[0]["returned_fd"] == memfd
    assert memfds[0]["returned_fd_target"].startswith("/memfd:luo-trace-test")

    opened = [line.split() for line in proc.stdout.splitlines() if line.startswith("OPEN ")]
    dev_fd, dev_errno = int(opened[0][1]), int(opened[0][2])
    opens = [e for e in events if e["event"] == "syscall" and e["syscall"] in ("open", "openat")]
    assert len(opens) == 1 and opens[0]["args"]["path"] == "/dev/liveupdate"
    if dev_fd < 0:
        assert opens[0]["errno"] == errno.errorcode[dev_errno]
    else:
        assert opens[0]["returned_fd"] == dev_fd

    summary = events[-1]
    assert set(summary) == SUMMARY_FIELDS
    assert summary["luo_calls"] == 12
    assert summary["errors"].get(errno.errorcode[sent[0]["errno"]]) == 12
    assert summary["exit_code"] == 0 and summary["interrupted"] is False
    assert summary["sessions_created"] == summary["fds_preserved"] == 0
    # non-LUO traffic (printf's writes, the dynamic loader's opens) stays hidden without --all
    assert not [e for e in events if e["event"] == "syscall" and e["syscall"] == "write"]


def test_human_output_names_commands_errno_and_summary(prog, tmp_path):
    out = tmp_path / "trace.txt"
    proc = luoagent("trace", "-o", str(out), "--", str(prog), "decode")
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    for command in ("CREATE_SESSION", "RETRIEVE_SESSION", "PRESERVE_FD", "RETRIEVE_FD", "FINISH", "GET_NAME"):
        assert f"LUO_{command}" in text
    assert "token=0xffffffffffffffff" in text
    assert f'name="{LONG_NAME}"' in text
    assert "unreadable pointer 0x" in text
    assert "ENOTTY (Inappropriate ioctl for device)" in text
    assert text.splitlines()[-1].startswith("--- summary:")
    assert "LUO calls 12" in text


def test_kexec_file_load_and_reboot_are_shown(prog, tmp_path):
    # the program drops CAP_SYS_BOOT first: both calls fail with EPERM (or ENOSYS) harmlessly
    out = tmp_path / "trace.jsonl"
    proc = luoagent("trace", "--json", "-o", str(out), "--", str(prog), "kexec")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    kernel_fd, kexec_errno = int(lines["KEXEC"][0]), int(lines["KEXEC"][2])
    reboot_errno = int(lines["REBOOT"][1])
    assert kexec_errno and reboot_errno == errno.EPERM
    events = [e for e in read_jsonl(out) if e["event"] == "syscall"]
    kexec = [e for e in events if e["syscall"] == "kexec_file_load"]
    assert len(kexec) == 1
    assert kexec[0]["args"] == {"kernel_fd": kernel_fd, "kernel": "/memfd:not-a-kernel (deleted)", "initrd_fd": -1,
                                "initrd": None, "cmdline": "console=ttyS0 luoagent.trace=test",
                                "flags": ["KEXEC_FILE_NO_INITRAMFS"]}
    assert kexec[0]["errno"] == errno.errorcode[kexec_errno]
    reboot = [e for e in events if e["syscall"] == "reboot"]
    assert [e["phase"] for e in reboot] == ["entered", "complete"]
    assert all(e["args"] == {"cmd": hex(0x45584543), "cmd_name": "KEXEC"} for e in reboot)
    assert reboot[0]["result"] is None and reboot[1]["errno"] == "EPERM"


def test_all_shows_other_syscalls(prog, tmp_path):
    out = tmp_path / "trace.jsonl"
    proc = luoagent("trace", "--json", "--all", "-o", str(out), "--", str(prog), "decode")
    assert proc.returncode == 0, proc.stderr
    events = read_jsonl(out)
    names = {e["syscall"] for e in events if e["event"] == "syscall"}
    assert {"write", "ioctl", "close", "mmap", "munmap"} <= names
    writes = [e for e in events if e["event"] == "syscall" and e["syscall"] == "write"]
    assert writes[0]["args"]["text"].startswith("write(")


def test_trace_command_api(prog, tmp_path):
    log = tmp_path / "stdout.txt"
    result = trace_wf.trace_command(["/bin/sh", "-c", 'exec "$0" decode > "$1"', str(prog), str(log)])
    assert result.exit_code == 0
    assert result.summary.luo_calls == 12
    assert [e["luo"]["command"] for e in result.luo_calls()][:3] == ["CREATE_SESSION", "CREATE_SESSION",
                                                                    "RETRIEVE_SESSION"]
    preserve = result.luo_calls("PRESERVE_FD")
    assert [e["luo"]["entry"].get("token") for e in preserve] == [0, 2**64 - 1, None]  # None: kernel pointer
    assert result.events[-1].event == "summary"
    assert len(calls_from(log.read_text())) == 12


def test_trace_command_streams_json_lines(prog, tmp_path):
    seen = []
    jsonl = tmp_path / "stage-trace.jsonl"
    result = trace_wf.trace_command([str(prog), "kexec"], emit=seen.append, jsonl_path=jsonl)
    assert result.exit_code == 0
    assert read_jsonl(jsonl) == [e.to_json() for e in result.events] == [e.to_json() for e in seen]
    assert [e["phase"] for e in result.syscalls("reboot")] == ["entered", "complete"]


def test_exit_code_of_the_command_is_passed_through(prog, tmp_path):
    proc = luoagent("trace", "-o", str(tmp_path / "t"), "--", str(prog), "no-such-mode")
    assert proc.returncode == 2
    proc = luoagent("trace", "-o", str(tmp_path / "t"), "--", "/bin/sh", "-c", "kill -TERM $$")
    assert proc.returncode == 128 + signal.SIGTERM
    assert "killed" in (tmp_path / "t").read_text()


# --- processes ---------------------------------------------------------------------------------
def test_follow_forks_sees_the_childs_calls(prog, tmp_path):
    out = tmp_path / "trace.jsonl"
    proc = luoagent("trace", "--json", "--follow-forks", "-o", str(out), "--", str(prog), "fork")
    assert proc.returncode == 0, proc.stderr
    sent = {c["label"]: c for c in calls_from(proc.stdout)}
    events = read_jsonl(out)
    luo = {e["luo"]["entry"]["name"]: e for e in events if e["event"] == "syscall" and e["luo"]}
    assert luo["parent-session"]["pid"] == sent["parent"]["pid"]
    assert luo["child-session"]["pid"] == sent["child"]["pid"] != sent["parent"]["pid"]
    forked = [e for e in events if e["event"] == "process" and e["what"] == "forked"]
    assert forked == [{"event": "process", "pid": sent["child"]["pid"], "what": "forked",
                       "parent": sent["parent"]["pid"]}]
    child_exit = [e for e in events if e["event"] == "process" and e["pid"] == sent["child"]["pid"]
                  and e["what"] == "exited"]
    assert child_exit[0]["exit_code"] == 7
    assert events[-1]["luo_calls"] == 2

    # without --follow-forks the child's call is not seen
    proc = luoagent("trace", "--json", "-o", str(out), "--", str(prog), "fork")
    names = [e["luo"]["entry"]["name"] for e in read_jsonl(out) if e["event"] == "syscall" and e["luo"]]
    assert names == ["parent-session"]


def test_follow_forks_sees_a_threads_calls(prog, tmp_path):
    out = tmp_path / "trace.jsonl"
    proc = luoagent("trace", "--json", "-f", "-o", str(out), "--", str(prog), "threads")
    assert proc.returncode == 0, proc.stderr
    tid = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("TID ")))
    events = read_jsonl(out)
    luo = [e for e in events if e["event"] == "syscall" and e["luo"]]
    leader = calls_from(proc.stdout)[0]["pid"]
    assert [(e["pid"], e["tgid"], e["luo"]["entry"]["name"]) for e in luo] == [(tid, leader, "thread-session")]
    assert {"event": "process", "pid": tid, "what": "thread", "parent": leader, "tgid": leader} in events


def test_follow_forks_survives_a_thread_calling_execve(prog, tmp_path):
    out = tmp_path / "trace.jsonl"
    proc = luoagent("trace", "--json", "-f", "-o", str(out), "--", str(prog), "threadexec", timeout=30)
    assert proc.returncode == 0, proc.stderr
    sent = {c["label"]: c for c in calls_from(proc.stdout)}
    events = read_jsonl(out)
    leader = events[0]["pid"]
    assert sent["parent"]["pid"] == leader  # the exec'ing thread took over the leader's pid
    names = {e["luo"]["entry"]["name"]: e["pid"] for e in events if e["event"] == "syscall" and e["luo"]}
    assert names == {"parent-session": leader, "child-session": sent["child"]["pid"]}
    assert {"event": "process", "pid": leader, "what": "exec", "cmdline": f"{prog} fork"} in events
    assert events[-1]["exit_code"] == 0


def test_ctrl_c_on_a_started_command_kills_it(prog, tmp_path):
    out = tmp_path / "trace.jsonl"
    tracer = subprocess.Popen([sys.executable, "-m", "luoagent", "trace", "--json", "-o", str(out), "--",
                               str(prog), "loop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = int(tracer.stdout.readline().split()[1])
    _wait_for(lambda: out.read_text().count('"CREATE_SESSION"') >= 2, what="2 traced calls")
    tracer.send_signal(signal.SIGINT)
    _, err = tracer.communicate(timeout=20)
    assert tracer.returncode == 130 and "Traceback" not in err, err
    events = read_jsonl(out)
    assert {"event": "process", "pid": pid, "what": "killed", "signal": "SIGKILL"} in events
    assert events[-1]["interrupted"] is True
    assert not Path(f"/proc/{pid}").exists()


def _start_loop(prog, mode="loop") -> tuple[subprocess.Popen, int]:
    loop = subprocess.Popen([str(prog), mode], stdout=subprocess.PIPE, text=True)
    ready = loop.stdout.readline().split()
    assert ready[0] == "READY"
    return loop, int(ready[1])


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_pid_attach_then_ctrl_c_detaches_and_the_process_keeps_running(prog, tmp_path):
    loop, pid = _start_loop(prog)
    out = tmp_path / "trace.jsonl"
    try:
        tracer = subprocess.Popen([sys.executable, "-m", "luoagent", "trace", "--json", "--pid", str(pid),
                                   "-o", str(out)], stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: out.exists() and out.read_text().count('"CREATE_SESSION"') >= 3, what="3 traced calls")
        assert _status(pid)["TracerPid"] == str(tracer.pid)
        tracer.send_signal(signal.SIGINT)
        _, err = tracer.communicate(timeout=20)
        assert tracer.returncode == 0, err
        assert "Traceback" not in err and "keeps running" in err
        events = read_jsonl(out)
        assert events[0] == {"event": "process", "pid": pid, "what": "attached", "cmdline": f"{prog} loop"}
        names = [e["luo"]["entry"]["name"] for e in events if e["event"] == "syscall" and e["luo"]]
        assert all(n.startswith("loop-") for n in names) and len(names) >= 3
        assert {"event": "process", "pid": pid, "what": "detached"} in events
        assert events[-1]["event"] == "summary" and events[-1]["interrupted"] is True
        status = _status(pid)
        assert status["TracerPid"] == "0"
        assert status["State"][0] not in "tT", status["State"]
        # still making progress after the tracer left
        ticks = [int(loop.stdout.readline().split()[1]) for _ in range(5)]
        assert ticks == sorted(ticks) and len(set(ticks)) == 5
        assert loop.poll() is None
    finally:
        loop.kill()
        loop.wait()


def test_sigterm_detaches_every_thread_of_an_attached_process(prog, tmp_path):
    loop, pid = _start_loop(prog, "threadloop")
    out = tmp_path / "trace.jsonl"
    try:
        tracer = subprocess.Popen([sys.executable, "-m", "luoagent", "trace", "--json", "-f", "--pid", str(pid),
                                   "-o", str(out)], stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: out.exists() and '"worker-' in out.read_text() and '"main-' in out.read_text(),
                  what="calls from both threads")
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
        assert len(tids) == 2
        assert all(_status_of_task(pid, t)["TracerPid"] == str(tracer.pid) for t in tids)
        tracer.send_signal(signal.SIGTERM)
        _, err = tracer.communicate(timeout=20)
        assert tracer.returncode == 0 and "Traceback" not in err, err
        events = read_jsonl(out)
        assert sorted(e["pid"] for e in events if e["event"] == "process" and e["what"] == "detached") == tids
        for t in tids:
            status = _status_of_task(pid, t)
            assert status["TracerPid"] == "0" and status["State"][0] not in "tT", status
        lines = [loop.stdout.readline().split() for _ in range(20)]
        assert {line[1] for line in lines} == {"main", "worker"}  # both threads still run
    finally:
        loop.kill()
        loop.wait()


def _status_of_task(pid: int, tid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def test_pid_that_exits_while_traced(prog, tmp_path):
    loop, pid = _start_loop(prog)
    out = tmp_path / "trace.jsonl"
    try:
        tracer = subprocess.Popen([sys.executable, "-m", "luoagent", "trace", "--json", "--pid", str(pid),
                                   "-o", str(out)], stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: out.exists() and '"CREATE_SESSION"' in out.read_text(), what="a traced call")
    finally:
        loop.kill()
        loop.wait()
    _, err = tracer.communicate(timeout=20)
    assert tracer.returncode == 0 and "Traceback" not in err, err
    events = read_jsonl(out)
    assert {"event": "process", "pid": pid, "what": "killed", "signal": "SIGKILL"} in events
    assert events[-1]["event"] == "summary"


# --- bad input ---------------------------------------------------------------------------------
def test_unknown_pid_is_a_clear_error():
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    proc = luoagent("trace", "--pid", str(pid_max + 1000))
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert f"no process with pid {pid_max + 1000}" in proc.stderr
    proc = luoagent("trace", "--json", "--pid", str(pid_max + 1000))
    assert json.loads(proc.stdout) == {"ok": False, "error": "TraceError",
                                       "message": proc.stderr.split("error: ", 1)[1].strip()}


def test_zombie_and_kernel_thread_pids_are_clear_errors():
    zombie = subprocess.Popen(["true"])
    _wait_for(lambda: _status(zombie.pid)["State"].startswith("Z"), what="a zombie")
    try:
        proc = luoagent("trace", "--pid", str(zombie.pid))
        assert_no_traceback(proc)
        assert proc.returncode == 1 and f"process {zombie.pid} has already exited" in proc.stderr
    finally:
        zombie.wait()
    kthreads = [int(p) for p in os.listdir("/proc") if p.isdigit() and trace_wf.ptrace_luo._is_kernel_thread(int(p))]
    assert kthreads, "no kernel thread visible in /proc (a pid namespace?)"
    proc = luoagent("trace", "--pid", str(kthreads[0]))
    assert proc.returncode == 1 and f"pid {kthreads[0]} is a kernel thread" in proc.stderr


def test_attach_to_an_already_traced_process_is_permission_denied(prog, tmp_path):
    loop, pid = _start_loop(prog)
    try:
        first = subprocess.Popen([sys.executable, "-m", "luoagent", "trace", "--pid", str(pid), "-o",
                                  str(tmp_path / "first")], stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: _status(pid)["TracerPid"] == str(first.pid), what="first tracer attached")
        proc = luoagent("trace", "--pid", str(pid))
        assert_no_traceback(proc)
        assert proc.returncode == 1
        assert f"permission denied attaching to pid {pid}: it is already traced by pid {first.pid}" in proc.stderr
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=20)
        assert first.returncode == 0
        assert loop.poll() is None
    finally:
        loop.kill()
        loop.wait()


def test_command_that_cannot_start():
    proc = luoagent("trace", "--", "/nonexistent/luoagent-test-binary")
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert "cannot start '/nonexistent/luoagent-test-binary': No such file or directory" in proc.stderr


@pytest.mark.parametrize("args", [["trace"], ["trace", "--pid", "1", "--", "true"]])
def test_usage_errors(args):
    proc = luoagent(*args)
    assert_no_traceback(proc)
    assert proc.returncode == 2
    assert "luoagent trace: error:" in proc.stderr


# --- session bookkeeping (pure logic) ----------------------------------------------------------
def test_closing_the_last_fd_of_an_outgoing_session_is_flagged():
    handler = trace_wf.LuoTraceHandler()
    session = trace_wf.SessionInfo("luoagent/vm/a", "outgoing", preserved=2)
    handler.sessions.add(100, 5, session)
    handler.process_event("forked", 101, parent=100)

    def close(pid):
        data = {"fd": 5, "fd_target": "anon_inode:[luo_session]", "flags": [], "note": None}
        handler._closed(pid, data)
        return data

    assert close(101)["flags"] == []  # the parent still holds it
    data = close(100)
    assert data["flags"] == ["outgoing-session-closed"]
    assert "'luoagent/vm/a'" in data["note"] and "2 preserved file(s) are unpreserved" in data["note"]
    assert handler.summary.outgoing_sessions_closed == 1

    handler.sessions.add(100, 6, trace_wf.SessionInfo("luoagent/vm/b", "incoming"))
    assert handler.sessions.exit(100)[0].name == "luoagent/vm/b"
    data = {"fd": 9, "fd_target": "anon_inode:[luo_session] luoagent/vm/x", "flags": [], "note": None}
    handler._closed(100, data)  # a session the tracer never saw being made
    assert data["flags"] == ["session-closed"] and "'luoagent/vm/x'" in data["note"]

    handler.sessions.add(os.getpid(), 987654, trace_wf.SessionInfo("luoagent/vm/exec", "outgoing"))
    handler.process_event("exec", os.getpid(), cmdline="x")  # fd 987654 is not open here: gone on exec
    assert handler.events[-1]["flags"] == ["outgoing-session-closed"]
    assert "close-on-exec" in handler.events[-1]["note"]
    assert handler.summary.outgoing_sessions_closed == 2

    handler.sessions.add(200, 3, trace_wf.SessionInfo("luoagent/vm/c", "outgoing"))
    handler.process_event("exited", 200, exit_code=0)
    assert handler.events[-1]["flags"] == ["outgoing-session-closed"]
    assert handler.summary.outgoing_sessions_closed == 3


class _FakeMemory:
    """Tracee memory for the pure-logic test below: address -> bytes, as the kernel left them."""

    def __init__(self):
        self.regions: dict[int, bytes] = {}

    def read(self, address, size):
        data = self.regions.get(address)
        if data is None or len(data) < size:
            raise trace_wf.ptrace_luo.UnreadablePointer(address, size)
        return data[:size]


def _struct_bytes(struct: str, **fields) -> bytes:
    cdata = ffi.new(struct + " *")
    cdata.size = ffi.sizeof(struct)
    for key, value in fields.items():
        if key == "name":
            ffi.memmove(cdata.name, value.encode(), len(value))
        else:
            setattr(cdata, key, value)
    return bytes(ffi.buffer(cdata))


def test_success_path_bookkeeping_without_a_kernel(monkeypatch):
    """What a successful create/preserve/close sequence does to the counters and flags (the
    kernel part is covered in the lab; here the struct bytes stand in for its answers)."""
    links = {3: "/dev/liveupdate", 5: "anon_inode:[luo_session] luoagent/vm/a", 7: "/memfd:ram (deleted)"}
    monkeypatch.setattr(trace_wf.ptrace_luo, "describe_fd", lambda pid, fd: links.get(fd))
    handler = trace_wf.LuoTraceHandler()
    memory = _FakeMemory()

    # a worker thread (tid 43) of process 42 makes the calls; the main thread closes the session
    handler.process_event("thread", 43, parent=42, tgid=42)

    def ioctl(fd, request, struct, entry, exit_fields, result=0):
        memory.regions[0x1000] = _struct_bytes(struct, **entry)
        stop = trace_wf.SyscallStop(43, "ioctl", (fd, request, 0x1000), memory, None, 1000, 42)
        state = handler.syscall_entry(stop)
        memory.regions[0x1000] = _struct_bytes(struct, **exit_fields)
        handler.syscall_exit(stop, state, result, 3000)
        return handler.events[-1].to_json()

    ev = ioctl(3, lib.LUO_IOCTL_CREATE_SESSION, "struct luo_session_arg", {"fd": -1, "name": "luoagent/vm/a"},
               {"fd": 5, "name": "luoagent/vm/a"})
    assert ev["luo"]["returned_fd"] == 5
    assert ev["luo"]["returned_fd_target"] == "anon_inode:[luo_session] luoagent/vm/a"
    assert ev["duration_s"] == 2e-06 and ev["errno"] is None
    ev = ioctl(5, lib.LUO_IOCTL_PRESERVE_FD, "struct luo_fd_arg", {"fd": 7, "token": 2**64 - 1},
               {"fd": 7, "token": 2**64 - 1})
    assert ev["session"] == {"name": "luoagent/vm/a", "direction": "outgoing"}
    assert ev["luo"]["preserved_fd_target"] == "/memfd:ram (deleted)"
    ev = ioctl(5, lib.LUO_IOCTL_PRESERVE_FD, "struct luo_fd_arg", {"fd": 7, "token": 1},
               {"fd": 7, "token": 1}, result=-errno.EBUSY)
    assert ev["errno"] == "EBUSY"
    ev = ioctl(5, lib.LUO_IOCTL_GET_NAME, "struct luo_get_name_arg", {}, {"name": "luoagent/vm/a"})
    assert "name=\"luoagent/vm/a\"" in trace_wf.format_line(handler.events[-1])

    handler.process_event("exited", 43, exit_code=0)  # a thread ending closes nothing
    assert "flags" not in handler.events[-1].to_json()
    close = trace_wf.SyscallStop(42, "close", (5,), memory, None, 5000)
    handler.syscall_exit(close, handler.syscall_entry(close), 0, 6000)
    ev = handler.events[-1].to_json()
    assert ev["flags"] == ["outgoing-session-closed"]
    assert "1 preserved file(s) are unpreserved" in ev["note"]
    s = handler.summary
    assert (s.sessions_created, s.fds_preserved, s.outgoing_sessions_closed, s.luo_calls) == (1, 1, 1, 4)
    assert s.errors == {"EBUSY": 1}
    line = trace_wf.format_line(handler.events[1])
    assert "-> {fd=5<anon_inode:[luo_session] luoagent/vm/a>}" in line
    assert "luoagent/vm/a luoagent/vm/a" not in line
