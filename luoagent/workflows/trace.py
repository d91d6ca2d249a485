"""Workflow `luoagent trace`: an LUO-aware syscall tracer (python-ptrace) for a command or a pid.

Shows every LUO ioctl decoded from the tracee's memory plus the live-update syscalls around it.

Usage::

    luoagent trace [--json] [--follow-forks] [--all] [-o FILE] -- CMD ARGS...
    luoagent trace [--json] [--follow-forks] [--all] [-o FILE] --pid PID

Output goes to stderr (like strace, so the traced program's stdout stays its own) or to
``-o FILE`` (``-o -`` for stdout): one line per call, or with ``--json`` one JSON object per line.

Which calls are shown (everything, with python-ptrace's generic formatting, under ``--all``):
``ioctl`` whose request has LUO's type byte (0xBA), ``memfd_create``, ``open``/``openat``/
``openat2`` of a path containing ``liveupdate``, ``close`` of /dev/liveupdate or of an LUO
session fd (closing the last fd of an *outgoing* session unpreserves its files: flagged
``outgoing-session-closed``), ``kexec_file_load``, ``kexec_load`` and ``reboot`` (``reboot`` is
also reported when it is entered, because a successful kexec reboot never returns).

JSON lines (stable field names; new fields may be added, none renamed)::

    {"event": "syscall",
     "pid": int, "tgid": int, "syscall": str,      # caller's thread id and process id; e.g. "ioctl"
     "phase": "complete" | "entered" | "unfinished",   # entered: reported at entry (reboot); unfinished:
                                                  # the process ended (or was detached) inside the call
     "ts": float,                                  # wall-clock seconds (epoch) at entry
     "duration_s": float | null,                   # entry stop to exit stop, as seen by the tracer
     "args": {...},                                # per syscall, see below
     "fd": int | null, "fd_target": str | null,    # the fd the call acts on, its /proc/PID/fd link
     "session": {"name", "direction"} | null,      # when fd is a known LUO session
                                                   # direction: outgoing | incoming | unknown
     "luo": null | {"command": str,                # CREATE_SESSION ... GET_NAME, or UNKNOWN
                    "request": "0xba00", "arg": "0x7ffd...",
                    "struct": "struct luo_session_arg",
                    "entry": {fields} | {"error": "unreadable pointer 0x..."},
                    "exit":  {fields} | {"error": ...} | null,   # re-read at exit
                    "returned_fd": int | null, "returned_fd_target": str | null,
                    "preserved_fd_target"?: str | null},       # PRESERVE_FD: what arg.fd is
     "result": int | null,                          # raw return value (-errno on failure)
     "errno": "ENOTTY" | null, "error": str | null, # errno name and text on failure
     "returned_fd": int | null, "returned_fd_target": str | null,  # open/memfd_create results
     "flags": [str],                                # outgoing-session-closed, session-closed,
                                                   # unterminated-name, size-mismatch, unreadable-pointer
     "note": str | null}                            # a human explanation of the flags
    {"event": "process", "pid": int, "what": "started"|"attached"|"forked"|"thread"|"exec"|
     "exited"|"killed"|"detached", "parent"?: int, "tgid"?: int (thread), "exit_code"?: int, "signal"?: str,
     "argv"?: [str], "cmdline"?: str, "flags"?: [str], "note"?: str}
    {"event": "summary", "sessions_created", "sessions_retrieved", "fds_preserved",
     "fds_retrieved", "sessions_finished", "luo_calls", "outgoing_sessions_closed": int,
     "errors": {"ENOTTY": int, ...}, "exit_code": int | null, "interrupted": bool}

Struct fields (``entry``/``exit``) are named as in the shim's struct: ``size``, ``fd``,
``token`` (unsigned 64-bit integer), ``reserved``, ``name`` (text up to the first NUL) with
``name_len`` and ``name_terminated``. ``args`` per syscall: ioctl ``{fd, request, arg}``;
open/openat/openat2 ``{path, flags}``; close ``{fd}``; memfd_create ``{name, flags}``;
kexec_file_load ``{kernel_fd, initrd_fd, cmdline, flags: [names]}``; reboot ``{cmd, cmd_name}``;
anything else under --all ``{text}``.
From code: ``trace_command(argv, follow_forks=False) -> TraceResult(events, summary, exit_code)``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from luoagent import log, report
from luoagent.adapters import ptrace_luo
from luoagent.adapters.ptrace_luo import SyscallStop, SyscallTracer
from luoagent.errors import LuoAgentError, TraceError, UsageError

# syscalls that matter around a live update (everything else only with --all)
LIVE_UPDATE_SYSCALLS = frozenset(
    {"ioctl", "memfd_create", "open", "openat", "openat2", "close", "kexec_file_load", "kexec_load", "reboot"}
)
DEVICE_PATH = "/dev/liveupdate"


# the kernel names a session file "[luo_session] NAME" (kernel/liveupdate/luo_session.c), so its
# /proc/PID/fd link reads "anon_inode:[luo_session] NAME"
_SESSION_LINK_PREFIX = "anon_inode:[luo_session]"


def _is_session_link(link: str | None) -> bool:
    return bool(link) and "luo_session" in link


def _session_name_from_link(link: str | None) -> str | None:
    if link and link.startswith(_SESSION_LINK_PREFIX + " "):
        return link[len(_SESSION_LINK_PREFIX) + 1:]
    return None


# --- session bookkeeping (policy: what a close means) ------------------------------------------
@dataclass
class SessionInfo:
    """An LUO session the tracer saw being created or retrieved, and what happened in it."""

    name: str
    direction: str  # outgoing | incoming | unknown
    preserved: int = 0
    retrieved: int = 0
    finished: bool = False
    holders: int = 0  # (pid, fd) pairs the tracer knows refer to it

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "direction": self.direction}


class SessionBook:
    """Which (pid, fd) is which LUO session; fds are inherited on fork, dropped on close/exit."""

    def __init__(self) -> None:
        self.by_fd: dict[tuple[int, int], SessionInfo] = {}

    def add(self, pid: int, fd: int, session: SessionInfo) -> None:
        self.drop(pid, fd)
        session.holders += 1
        self.by_fd[(pid, fd)] = session

    def get(self, pid: int, fd: int) -> SessionInfo | None:
        return self.by_fd.get((pid, fd))

    def drop(self, pid: int, fd: int) -> SessionInfo | None:
        """Forget (pid, fd); returns the session if that was its last known holder."""
        session = self.by_fd.pop((pid, fd), None)
        if session is None:
            return None
        session.holders -= 1
        return session if session.holders == 0 else None

    def fork(self, parent: int, child: int) -> None:
        for (pid, fd), session in list(self.by_fd.items()):
            if pid == parent:
                self.add(child, fd, session)

    def exit(self, pid: int) -> list[SessionInfo]:
        """The process is gone: sessions whose last known fd it held."""
        return [s for (p, fd) in list(self.by_fd) if p == pid for s in [self.drop(p, fd)] if s]


def unpreserve_note(session: SessionInfo, how: str) -> str:
    return (f"outgoing session {session.name!r} {how}: its {session.preserved} preserved file(s) are "
            f"unpreserved (unless another process still holds the session)")


# --- events --------------------------------------------------------------------------------------
@dataclass
class TraceEvent:
    """One reported thing: a syscall, a process life event, or the summary (see module doc)."""

    event: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, **self.data}

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)


@dataclass
class TraceSummary:
    sessions_created: int = 0
    sessions_retrieved: int = 0
    fds_preserved: int = 0
    fds_retrieved: int = 0
    sessions_finished: int = 0
    luo_calls: int = 0
    outgoing_sessions_closed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None
    interrupted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions_created": self.sessions_created,
            "sessions_retrieved": self.sessions_retrieved,
            "fds_preserved": self.fds_preserved,
            "fds_retrieved": self.fds_retrieved,
            "sessions_finished": self.sessions_finished,
            "luo_calls": self.luo_calls,
            "outgoing_sessions_closed": self.outgoing_sessions_closed,
            "errors": dict(sorted(self.errors.items())),
            "exit_code": self.exit_code,
            "interrupted": self.interrupted,
        }


@dataclass
class TraceResult:
    events: list[TraceEvent]
    summary: TraceSummary
    exit_code: int | None  # the traced command's exit status (128+N if killed by signal N)

    def syscalls(self, syscall: str | None = None) -> list[TraceEvent]:
        return [e for e in self.events if e.event == "syscall" and (syscall is None or e.data["syscall"] == syscall)]

    def luo_calls(self, command: str | None = None) -> list[TraceEvent]:
        return [e for e in self.syscalls("ioctl")
                if e.data.get("luo") and (command is None or e.data["luo"]["command"] == command)]


# --- rendering -----------------------------------------------------------------------------------
def _fd_text(fd: int | None, target: str | None, session: dict | None) -> str:
    if fd is None:
        return "?"
    inner = target or "?"
    if session and session["name"] not in inner:
        inner += f" {session['name']}"
    return f"{fd}<{inner}>"


def _struct_text(fields: dict[str, Any]) -> str:
    if "error" in fields:
        return f"<{fields['error']}>"
    parts = []
    for key, value in fields.items():
        if key.endswith("_len") or key.endswith("_terminated"):
            continue
        if isinstance(value, str):
            text = json.dumps(value)
            if fields.get(f"{key}_terminated") is False:
                text += "(unterminated)"
            parts.append(f"{key}={text}")
        elif key == "token":
            parts.append(f"token={value:#x}")
        else:
            parts.append(f"{key}={value}")
    return "{" + ", ".join(parts) + "}"


def format_line(event: TraceEvent) -> str:
    """One human-readable line for an event."""
    d = event.data
    if event.event == "summary":
        errors = ", ".join(f"{k} {v}" for k, v in d["errors"].items()) or "none"
        line = (f"--- summary: sessions created {d['sessions_created']}, retrieved {d['sessions_retrieved']}, "
                f"finished {d['sessions_finished']}; fds preserved {d['fds_preserved']}, retrieved "
                f"{d['fds_retrieved']}; LUO calls {d['luo_calls']}; outgoing sessions closed "
                f"{d['outgoing_sessions_closed']}; errors: {errors}")
        if d["exit_code"] is not None:
            line += f"; exit code {d['exit_code']}"
        if d["interrupted"]:
            line += "; interrupted"
        return line
    if event.event == "process":
        extra = {k: v for k, v in d.items() if k not in ("pid", "what", "note", "flags")}
        line = f"[{d['pid']}] +++ {d['what']}" + (" " + " ".join(f"{k}={v}" for k, v in extra.items()) if extra else "")
        if d.get("note"):
            line += f"  !! {d['note']}"
        return line
    name = d["syscall"]
    args = d["args"]
    if d.get("luo"):
        luo = d["luo"]
        entry = _struct_text(luo["entry"])
        if luo.get("preserved_fd_target"):
            entry = entry.replace(f"fd={luo['entry']['fd']},", f"fd={luo['entry']['fd']}<{luo['preserved_fd_target']}>,", 1)
        call = f"ioctl({_fd_text(d['fd'], d['fd_target'], d.get('session'))}, LUO_{luo['command']}, {luo['arg']} {entry})"
    elif name == "ioctl":
        call = f"ioctl({_fd_text(d['fd'], d['fd_target'], d.get('session'))}, {args['request']}, {args['arg']})"
    elif name == "close":
        call = f"close({_fd_text(d['fd'], d['fd_target'], d.get('session'))})"
    elif "text" in args:
        call = args["text"]
    else:
        call = f"{name}(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()) + ")"
    if d["phase"] == "entered":
        result = "= ? (entered)"
    elif d["phase"] == "unfinished":
        result = "= ? (unfinished: process ended or was detached inside the call)"
    elif d["errno"]:
        result = f"= -1 {d['errno']} ({d['error']})"
    else:
        result = f"= {d['result']}"
    line = f"[{d['pid']}] {call} {result}"
    luo = d.get("luo")
    if luo and luo.get("exit") is not None and d["phase"] == "complete" and d["result"] == 0:
        out = []
        if luo.get("returned_fd") is not None:
            out.append(f"fd={_fd_text(luo['returned_fd'], luo['returned_fd_target'], None)}")
        exit_fields = luo["exit"]
        if "error" in exit_fields:
            out.append(exit_fields["error"])
        elif luo["command"] == "GET_NAME":
            out.append(f"name={json.dumps(exit_fields.get('name'))}")
        if out:
            line += " -> {" + ", ".join(out) + "}"
    elif d.get("returned_fd_target"):
        line += f" -> {d['returned_fd_target']}"
    if d["duration_s"] is not None:
        line += f" <{d['duration_s']:.6f}s>"
    if d.get("note"):
        line += f"  !! {d['note']}"
    return line


# --- the tracer's handler (what matters, how it reads) ------------------------------------------
@dataclass
class _CallState:
    data: dict[str, Any]
    luo: ptrace_luo.LuoCommand | None = None


class LuoTraceHandler:
    """Turns syscall stops into TraceEvents: decodes LUO structs, tracks sessions, counts."""

    def __init__(self, show_all: bool = False, emit: Callable[[TraceEvent], None] | None = None,
                 keep_events: bool = True):
        self.show_all = show_all
        self.emit_cb = emit
        self.keep_events = keep_events
        self.events: list[TraceEvent] = []
        self.summary = TraceSummary()
        self.sessions = SessionBook()  # keyed by process (tgid): threads share their fds
        self.threads: set[int] = set()  # tids that are not their process's leader
        self._tgids: dict[int, int] = {}  # tid -> tgid for those threads
        self._clock_offset_ns = time.time_ns() - time.monotonic_ns()

    def emit(self, event: TraceEvent) -> None:
        if self.keep_events:
            self.events.append(event)
        if self.emit_cb is not None:
            self.emit_cb(event)

    # engine callbacks ------------------------------------------------------------------------
    def wants(self, pid: int, name: str) -> bool:
        return self.show_all or name in LIVE_UPDATE_SYSCALLS

    def syscall_entry(self, stop: SyscallStop) -> _CallState | None:
        data: dict[str, Any] = {
            "pid": stop.pid, "tgid": stop.tgid, "syscall": stop.name, "phase": "complete",
            "ts": round((stop.entered_ns + self._clock_offset_ns) / 1e9, 6), "duration_s": None,
            "args": {}, "fd": None, "fd_target": None, "session": None, "luo": None,
            "result": None, "errno": None, "error": None, "returned_fd": None, "returned_fd_target": None,
            "flags": [], "note": None,
        }
        state = _CallState(data)
        a = stop.args
        name = stop.name
        if name == "ioctl":
            request = a[1] & 0xFFFFFFFF
            if not ptrace_luo.is_luo_request(request) and not self.show_all:
                return None
            self._fd(stop, data, ptrace_luo.as_int(a[0]))
            data["args"] = {"fd": data["fd"], "request": f"{request:#x}", "arg": f"{a[2]:#x}"}
            if ptrace_luo.is_luo_request(request):
                self._luo_entry(stop, state, request, a[2])
        elif name in ("open", "openat", "openat2"):
            path_arg = a[0] if name == "open" else a[1]
            try:
                raw, cut = stop.memory.read_cstring(path_arg)
                path = raw.decode("utf-8", errors="backslashreplace") + ("..." if cut else "")
            except ptrace_luo.UnreadablePointer:
                path = None
            if path is not None and "liveupdate" in path:
                flags = None if name == "openat2" else (a[1] if name == "open" else a[2]) & 0xFFFFFFFF
                data["args"] = {"path": path, "flags": flags}
            elif self.show_all:
                data["args"] = {"text": None}  # generic formatting at exit
            else:
                return None
        elif name == "close":
            fd = ptrace_luo.as_int(a[0])
            self._fd(stop, data, fd)
            link = data["fd_target"]
            if not (link == DEVICE_PATH or _is_session_link(link) or data["session"] or self.show_all):
                return None
            data["args"] = {"fd": fd}
        elif name == "memfd_create":
            try:
                raw, cut = stop.memory.read_cstring(a[0], 256)
                mname = raw.decode("utf-8", errors="backslashreplace") + ("..." if cut else "")
            except ptrace_luo.UnreadablePointer as exc:
                mname = None
                data["flags"].append("unreadable-pointer")
                data["note"] = str(exc)
            data["args"] = {"name": mname, "flags": a[1] & 0xFFFFFFFF}
        elif name == "kexec_file_load":
            cmdline = None
            if a[2]:
                try:
                    raw, _ = stop.memory.read_cstring(a[3], min(a[2], 65536))
                    cmdline = raw.decode("utf-8", errors="backslashreplace")
                except ptrace_luo.UnreadablePointer as exc:
                    data["flags"].append("unreadable-pointer")
                    data["note"] = str(exc)
            kernel_fd = ptrace_luo.as_int(a[0])
            initrd_fd = ptrace_luo.as_int(a[1])
            data["args"] = {
                "kernel_fd": kernel_fd, "kernel": ptrace_luo.describe_fd(stop.pid, kernel_fd),
                "initrd_fd": initrd_fd, "initrd": ptrace_luo.describe_fd(stop.pid, initrd_fd),
                "cmdline": cmdline, "flags": ptrace_luo.kexec_file_flag_names(a[4]),
            }
        elif name == "reboot":
            cmd = a[2] & 0xFFFFFFFF
            data["args"] = {"cmd": f"{cmd:#x}", "cmd_name": ptrace_luo.reboot_command_name(cmd)}
            # a successful kexec reboot never comes back: say it now
            self.emit(TraceEvent("syscall", {**data, "phase": "entered", "flags": list(data["flags"])}))
        else:
            data["args"] = {"text": None}
        return state

    def syscall_exit(self, stop: SyscallStop, state: _CallState | None, result: int, exited_ns: int) -> None:
        if state is None:
            return
        data = state.data
        data["duration_s"] = round((exited_ns - stop.entered_ns) / 1e9, 6)
        data["result"] = result
        if -4096 < result < 0:
            data["errno"] = ptrace_luo.errno_name(-result)
            data["error"] = os.strerror(-result) if -result < 512 else data["errno"]
            self.summary.errors[data["errno"]] = self.summary.errors.get(data["errno"], 0) + 1
        if data["args"].get("text", 0) is None:
            try:
                data["args"]["text"] = stop.call.format()
            except Exception as exc:  # python-ptrace's generic formatter: never fatal
                data["args"]["text"] = f"{stop.name}(<{exc}>)"
        name = stop.name
        if state.luo is not None or (data["luo"] and data["luo"]["command"] == "UNKNOWN"):
            self._luo_exit(stop, state, result)
        elif name in ("open", "openat", "openat2") and result >= 0:
            data["returned_fd"] = result
            data["returned_fd_target"] = ptrace_luo.describe_fd(stop.pid, result)
        elif name == "memfd_create" and result >= 0:
            data["returned_fd"] = result
            data["returned_fd_target"] = ptrace_luo.describe_fd(stop.pid, result)
        elif name == "close" and result == 0:
            self._closed(stop.tgid, data)
        self.emit(TraceEvent("syscall", data))

    def syscall_unfinished(self, stop: SyscallStop, state: _CallState | None) -> None:
        if state is None:
            return
        state.data["phase"] = "unfinished"
        self.emit(TraceEvent("syscall", state.data))

    def process_event(self, kind: str, pid: int, **info: Any) -> None:
        data: dict[str, Any] = {"pid": pid, "what": kind, **info}
        if kind == "thread":
            self.threads.add(pid)
            self._tgids[pid] = info.get("tgid", pid)
        elif kind == "forked" and "parent" in info:
            self.sessions.fork(self._tgid_of(info["parent"]), pid)
        elif kind == "exec":
            # the kernel opens session fds O_CLOEXEC: an exec closes them all
            lost = []
            for (holder, fd) in [key for key in self.sessions.by_fd if key[0] == pid]:
                if not _is_session_link(ptrace_luo.describe_fd(pid, fd)):
                    last = self.sessions.drop(holder, fd)
                    if last is not None and last.direction == "outgoing":
                        lost.append(last)
            if lost:
                self.summary.outgoing_sessions_closed += len(lost)
                data["flags"] = ["outgoing-session-closed"]
                data["note"] = "; ".join(unpreserve_note(s, "closed by execve (session fds are close-on-exec)")
                                         for s in lost)
        elif kind in ("exited", "killed", "detached") and pid in self.threads:
            self.threads.discard(pid)  # a thread's end closes nothing: its process holds the fds
        elif kind in ("exited", "killed", "detached"):
            if kind != "detached":
                lost = [s for s in self.sessions.exit(pid) if s.direction == "outgoing"]
            else:
                self.sessions.exit(pid)
                lost = []
            if lost:
                self.summary.outgoing_sessions_closed += len(lost)
                data["flags"] = ["outgoing-session-closed"]
                data["note"] = "; ".join(unpreserve_note(s, "closed by process exit") for s in lost)
        self.emit(TraceEvent("process", data))

    # helpers ---------------------------------------------------------------------------------
    def _tgid_of(self, pid: int) -> int:
        return self._tgids.get(pid, pid)

    def _fd(self, stop: SyscallStop, data: dict[str, Any], fd: int) -> None:
        data["fd"] = fd
        data["fd_target"] = ptrace_luo.describe_fd(stop.pid, fd)
        session = self.sessions.get(stop.tgid, fd)
        if session is not None and not (data["fd_target"] and _is_session_link(data["fd_target"])):
            # the fd was reused for something else without us seeing the close (dup2, exec...)
            if data["fd_target"] is not None:
                self.sessions.drop(stop.tgid, fd)
                session = None
        if session is None and _is_session_link(data["fd_target"]):
            # a session opened before the tracer came (--pid) or passed in: name from the link
            data["session"] = {"name": _session_name_from_link(data["fd_target"]), "direction": "unknown"}
        else:
            data["session"] = session.to_json() if session else None

    def _luo_entry(self, stop: SyscallStop, state: _CallState, request: int, arg: int) -> None:
        data = state.data
        command = ptrace_luo.luo_command(request)
        self.summary.luo_calls += 1
        if command is None:
            data["luo"] = {"command": "UNKNOWN", "request": f"{request:#x}", "arg": f"{arg:#x}",
                           "struct": None, "entry": {"error": "unknown LUO command: not decoded"},
                           "exit": None, "returned_fd": None, "returned_fd_target": None}
            return
        state.luo = command
        decoded = ptrace_luo.decode_struct(stop.memory, arg, command.struct)
        data["luo"] = {"command": command.name, "request": f"{request:#x}", "arg": f"{arg:#x}",
                       "struct": command.struct, "entry": decoded.to_json(), "exit": None,
                       "returned_fd": None, "returned_fd_target": None}
        if decoded.fields is None:
            self._flag(data, "unreadable-pointer", decoded.error)
            return
        expected = ptrace_luo.struct_size(command.struct)
        if decoded.fields.get("size") != expected:
            self._flag(data, "size-mismatch",
                       f"arg.size={decoded.fields.get('size')}, this ABI's struct is {expected} bytes")
        if decoded.fields.get("name_terminated") is False and command.name in ("CREATE_SESSION", "RETRIEVE_SESSION"):
            self._flag(data, "unterminated-name", "session name has no NUL within its 64 bytes (kernel: EINVAL)")
        if command.name == "PRESERVE_FD":
            target_fd = decoded.fields.get("fd")
            data["luo"]["preserved_fd_target"] = ptrace_luo.describe_fd(stop.pid, target_fd)

    def _luo_exit(self, stop: SyscallStop, state: _CallState, result: int) -> None:
        data = state.data
        luo = data["luo"]
        command = state.luo
        if command is None:
            return
        decoded = ptrace_luo.decode_struct(stop.memory, int(luo["arg"], 16), command.struct)
        luo["exit"] = decoded.to_json()
        if result != 0 or decoded.fields is None:
            return
        entry = luo["entry"] if "error" not in luo["entry"] else {}
        pid, fd = stop.tgid, data["fd"]
        session = self.sessions.get(pid, fd)
        if command.returns_fd:
            new_fd = decoded.fields.get("fd")
            luo["returned_fd"] = new_fd
            luo["returned_fd_target"] = ptrace_luo.describe_fd(stop.pid, new_fd)
        if command.name in ("CREATE_SESSION", "RETRIEVE_SESSION"):
            outgoing = command.name == "CREATE_SESSION"
            if outgoing:
                self.summary.sessions_created += 1
            else:
                self.summary.sessions_retrieved += 1
            self.sessions.add(pid, luo["returned_fd"],
                              SessionInfo(entry.get("name", "?"), "outgoing" if outgoing else "incoming"))
        elif command.name == "PRESERVE_FD":
            self.summary.fds_preserved += 1
            if session:
                session.preserved += 1
        elif command.name == "RETRIEVE_FD":
            self.summary.fds_retrieved += 1
            if session:
                session.retrieved += 1
        elif command.name == "FINISH":
            self.summary.sessions_finished += 1
            if session:
                session.finished = True
        elif command.name == "GET_NAME" and session is None:
            self.sessions.add(pid, fd, SessionInfo(decoded.fields.get("name", "?"), "unknown"))
            data["session"] = self.sessions.get(pid, fd).to_json()

    def _closed(self, pid: int, data: dict[str, Any]) -> None:
        fd = data["fd"]
        known = self.sessions.get(pid, fd)
        last = self.sessions.drop(pid, fd)
        if last is not None and last.direction == "outgoing":
            self.summary.outgoing_sessions_closed += 1
            self._flag(data, "outgoing-session-closed", unpreserve_note(last, "closed"))
        elif known is None and _is_session_link(data["fd_target"]):
            name = _session_name_from_link(data["fd_target"])
            self._flag(data, "session-closed",
                       f"LUO session {name!r} of unknown direction was closed: if it was outgoing, its "
                       f"files are unpreserved")

    @staticmethod
    def _flag(data: dict[str, Any], flag: str, note: str | None) -> None:
        data["flags"].append(flag)
        if note:
            data["note"] = note if not data["note"] else f"{data['note']}; {note}"


# --- driving it ----------------------------------------------------------------------------------
def _exit_code(status: int | None) -> int | None:
    if status is None:
        return None
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return None


def trace(*, argv: list[str] | None = None, pid: int | None = None, follow_forks: bool = False,
          show_all: bool = False, emit: Callable[[TraceEvent], None] | None = None,
          keep_events: bool = True) -> TraceResult:
    """Trace a new command (``argv``) or a running process (``pid``) until it is gone.

    KeyboardInterrupt ends tracing: a started command is killed, an attached process is
    detached and keeps running; the result then has ``summary.interrupted``."""
    if (argv is None) == (pid is None):
        raise UsageError("trace needs either a command or a pid, not both")
    logger = log.get_logger("luoagent.trace")
    handler = LuoTraceHandler(show_all=show_all, emit=emit, keep_events=keep_events)
    tracer = SyscallTracer(handler, follow_forks=follow_forks, all_syscalls=show_all)
    logger.info("trace.start", argv=argv, pid=pid, follow_forks=follow_forks, show_all=show_all)
    if argv is not None:
        tracer.spawn(argv)
    else:
        tracer.attach(pid)
    try:
        tracer.run()  # on any exception it has already killed (command) or detached (pid) the tracees
    except KeyboardInterrupt:
        handler.summary.interrupted = True
    except LuoAgentError:
        raise
    except Exception as exc:  # a tracer bug must still end in a message, not a traceback
        raise TraceError(f"tracing stopped by an internal error: {type(exc).__name__}: {exc}") from exc
    handler.summary.exit_code = _exit_code(tracer.main_status)
    logger.info("trace.end", **handler.summary.to_json())
    handler.emit(TraceEvent("summary", handler.summary.to_json()))
    return TraceResult(handler.events, handler.summary, handler.summary.exit_code)


def trace_command(argv: list[str], follow_forks: bool = False, show_all: bool = False,
                  emit: Callable[[TraceEvent], None] | None = None,
                  jsonl_path: str | os.PathLike | None = None) -> TraceResult:
    """Run ``argv`` under the tracer and return every event (for lab scenarios and tests).

    ``emit`` also sees each event as it happens; ``jsonl_path`` appends them as JSON lines,
    flushed per line and fsync'ed before a reboot call runs, so a trace of a stage that kexecs
    can be read in the next boot."""
    if jsonl_path is None:
        return trace(argv=list(argv), follow_forks=follow_forks, show_all=show_all, emit=emit)
    with open(jsonl_path, "a", buffering=1) as out:
        def both(event: TraceEvent) -> None:
            out.write(json.dumps(event.to_json()) + "\n")
            out.flush()
            if event.data.get("phase") == "entered":
                os.fsync(out.fileno())
            if emit is not None:
                emit(event)

        return trace(argv=list(argv), follow_forks=follow_forks, show_all=show_all, emit=both)


# --- CLI -----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per line (fields: see docs/trace.md)")
    parser.add_argument("-f", "--follow-forks", action="store_true", help="also trace children and threads")
    parser.add_argument("-a", "--all", action="store_true", dest="show_all",
                        help="show every syscall, not only the live-update ones")
    parser.add_argument("-p", "--pid", type=int, help="attach to this running process instead of starting one")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write the trace here ('-' = stdout; default: stderr)")
    # dest is not "command": the CLI keeps the subcommand's name there
    parser.add_argument("cmd_argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS",
                        help="the command to trace")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    command = list(args.cmd_argv or [])
    if command and command[0] == "--":
        command = command[1:]
    if args.pid is not None and command:
        raise UsageError("give either --pid PID or -- CMD ARGS..., not both")
    if args.pid is None and not command:
        raise UsageError("nothing to trace: use 'luoagent trace -- CMD ARGS...' or 'luoagent trace --pid PID'")
    out: TextIO
    close_out = False
    if args.output in (None, ""):
        out = sys.stderr
    elif args.output == "-":
        out = sys.stdout
    else:
        try:
            out = open(args.output, "w", buffering=1)
        except OSError as exc:
            raise UsageError(f"cannot write trace output to {args.output}: {exc.strerror}") from None
        close_out = True

    def emit(event: TraceEvent) -> None:
        text = json.dumps(event.to_json()) if args.json else format_line(event)
        try:
            out.write(text + "\n")
            out.flush()
        except OSError as exc:
            raise TraceError(f"cannot write the trace to {args.output or 'stderr'}: {exc.strerror or exc}") from None
        if close_out and event.data.get("phase") == "entered":
            os.fsync(out.fileno())  # a reboot may follow: get the line onto the disk first

    # SIGTERM/SIGHUP end tracing like Ctrl-C: an attached process is detached and keeps running
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = trace(argv=command or None, pid=args.pid, follow_forks=args.follow_forks,
                       show_all=args.show_all, emit=emit, keep_events=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if close_out:
            out.close()
    if args.pid is not None:
        if result.summary.interrupted:
            report.echo("trace", f"luoagent trace: detached from pid {args.pid}; it keeps running")
        return 0
    if result.summary.interrupted:
        return 130
    return result.exit_code if result.exit_code is not None else 1


__all__ = ["TraceEvent", "TraceResult", "TraceSummary", "configure", "format_line", "run", "trace",
           "trace_command"]
