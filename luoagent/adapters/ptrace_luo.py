"""Trace another process's system calls with python-ptrace and decode its LUO ioctl arguments.

Ioctl numbers and struct layouts come from the compiled shim (luoagent._luo_shim); nothing is restated here."""

from __future__ import annotations

import errno as errno_mod
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ptrace import PtraceError
from ptrace.binding import ptrace_cont, ptrace_detach, ptrace_geteventmsg
from ptrace.binding.func import PTRACE_EVENT_CLONE, PTRACE_EVENT_EXEC, PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK
from ptrace.debugger import PtraceDebugger, PtraceProcess
from ptrace.debugger.child import ChildError, createChild
from ptrace.debugger.process_event import ProcessEvent
from ptrace.func_call import FunctionCallOptions

from luoagent._luo_shim import ffi, lib
from luoagent.adapters import procfs
from luoagent.errors import TraceError

# waitpid flag: report every child, clone()d threads included (linux/wait.h)
_WALL = 0x40000000
# Linux ioctl request encoding (asm-generic/ioctl.h): the "type" byte sits in bits 8..15.
_IOC_TYPESHIFT = 8
# kernel-internal errnos a tracer can see on syscall exit (include/linux/errno.h); Python's errno
# module does not name them
_KERNEL_ERRNO_NAMES = {
    512: "ERESTARTSYS",
    513: "ERESTARTNOINTR",
    514: "ERESTARTNOHAND",
    515: "ENOIOCTLCMD",
    516: "ERESTART_RESTARTBLOCK",
}
# a path argument longer than this is shown cut (PATH_MAX)
_PATH_MAX = 4096
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --- the LUO ABI, as the shim states it ---------------------------------------------------------
@dataclass(frozen=True)
class LuoCommand:
    """One LUO ioctl: its name, request number, argument struct and what the kernel writes back."""

    name: str  # e.g. "CREATE_SESSION"
    request: int
    struct: str  # cffi type name of the argument struct
    target: str  # "device" (/dev/liveupdate) or "session" (a session fd)
    returns_fd: bool  # on success the kernel stores a new fd in arg.fd
    returns_name: bool  # on success the kernel stores the session name in arg.name


def _build_commands() -> dict[int, LuoCommand]:
    table = [
        ("CREATE_SESSION", "struct luo_session_arg", "device", True, False),
        ("RETRIEVE_SESSION", "struct luo_session_arg", "device", True, False),
        ("PRESERVE_FD", "struct luo_fd_arg", "session", False, False),
        ("RETRIEVE_FD", "struct luo_fd_arg", "session", True, False),
        ("FINISH", "struct luo_finish_arg", "session", False, False),
        ("GET_NAME", "struct luo_get_name_arg", "session", False, True),
    ]
    commands = {}
    for name, struct, target, returns_fd, returns_name in table:
        request = getattr(lib, f"LUO_IOCTL_{name}")
        commands[request] = LuoCommand(name, request, struct, target, returns_fd, returns_name)
    return commands


LUO_COMMANDS: dict[int, LuoCommand] = _build_commands()
LUO_IOCTL_TYPE: int = lib.LUO_IOCTL_TYPE


def is_luo_request(request: int) -> bool:
    """True for any ioctl request of LUO's type byte (known command or not)."""
    return ((request & 0xFFFFFFFF) >> _IOC_TYPESHIFT) & 0xFF == LUO_IOCTL_TYPE


def luo_command(request: int) -> LuoCommand | None:
    return LUO_COMMANDS.get(request & 0xFFFFFFFF)


def struct_size(struct: str) -> int:
    return ffi.sizeof(struct)


# --- reading the tracee's memory ----------------------------------------------------------------
class UnreadablePointer(Exception):
    """The tracee has nothing readable at ``address`` (unmapped, or it exited)."""

    def __init__(self, address: int, size: int):
        super().__init__(f"unreadable pointer 0x{address:x} ({size} bytes)")
        self.address = address
        self.size = size


class TraceeMemory:
    """Reads bytes out of a stopped tracee through python-ptrace (/proc/PID/mem or PEEKDATA)."""

    def __init__(self, process: PtraceProcess):
        self._process = process

    def read(self, address: int, size: int) -> bytes:
        if address == 0:
            raise UnreadablePointer(address, size)
        try:
            data = self._process.readBytes(address, size)
        except (PtraceError, OSError, ValueError, OverflowError):
            raise UnreadablePointer(address, size) from None
        if len(data) != size:  # a short read: the range runs into an unmapped page
            raise UnreadablePointer(address, size)
        return data

    def read_cstring(self, address: int, limit: int = _PATH_MAX) -> tuple[bytes, bool]:
        """The NUL-terminated string at ``address`` and whether it was cut at ``limit``.

        Reads page by page so a short string just before an unmapped page still decodes."""
        out = b""
        while len(out) < limit:
            chunk = min(_PAGE - (address % _PAGE), limit - len(out))
            data = self.read(address, chunk)
            nul = data.find(b"\0")
            if nul >= 0:
                return out + data[:nul], False
            out += data
            address += chunk
        return out, True


@dataclass
class DecodedStruct:
    """An LUO argument struct read from the tracee: its fields, or why it could not be read."""

    address: int
    struct: str
    fields: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.fields is None:
            return {"error": self.error}
        return dict(self.fields)


def decode_struct(memory: TraceeMemory, address: int, struct: str) -> DecodedStruct:
    """Read ``struct`` at ``address`` in the tracee; fields named as in the shim's cdef.

    A byte-array field (a session name) becomes ``<field>`` (text up to the first NUL, undecodable
    bytes escaped) plus ``<field>_len`` and ``<field>_terminated`` (False: no NUL in the array)."""
    size = ffi.sizeof(struct)
    try:
        data = memory.read(address, size)
    except UnreadablePointer as exc:
        return DecodedStruct(address, struct, error=str(exc))
    cdata = ffi.new(struct + " *")
    ffi.memmove(cdata, data, size)
    fields: dict[str, Any] = {}
    for name, cfield in ffi.typeof(struct).fields:
        value = getattr(cdata, name)
        if cfield.type.kind == "array":
            raw = bytes(ffi.buffer(value))
            nul = raw.find(b"\0")
            text = raw if nul < 0 else raw[:nul]
            fields[name] = text.decode("utf-8", errors="backslashreplace")
            fields[f"{name}_len"] = len(text)
            fields[f"{name}_terminated"] = nul >= 0
        else:
            fields[name] = int(value)
    return DecodedStruct(address, struct, fields=fields)


def describe_fd(pid: int, fd: int) -> str | None:
    """What fd ``fd`` of ``pid`` refers to (its /proc/PID/fd link), None if it is not open."""
    if fd < 0:
        return None
    return procfs.fd_target(pid, fd)


def errno_name(code: int) -> str:
    """'ENOTTY' for 25; the kernel-internal restart codes by their kernel names."""
    return errno_mod.errorcode.get(code) or _KERNEL_ERRNO_NAMES.get(code) or f"E{code}"


# reboot(2) commands (linux/reboot.h); only KEXEC matters here, the rest just get their names
_REBOOT_COMMANDS = {
    0x45584543: "KEXEC",
    0x01234567: "RESTART",
    0xCDEF0123: "HALT",
    0x4321FEDC: "POWER_OFF",
    0x89ABCDEF: "CAD_ON",
    0x00000000: "CAD_OFF",
}


def reboot_command_name(cmd: int) -> str:
    return _REBOOT_COMMANDS.get(cmd & 0xFFFFFFFF, f"{cmd & 0xFFFFFFFF:#x}")


def kexec_file_flag_names(flags: int) -> list[str]:
    """kexec_file_load flags by name (values from the shim); unknown bits as hex."""
    names = []
    for name in ("KEXEC_FILE_UNLOAD", "KEXEC_FILE_ON_CRASH", "KEXEC_FILE_NO_INITRAMFS"):
        bit = getattr(lib, name)
        if flags & bit:
            names.append(name)
            flags &= ~bit
    if flags:
        names.append(f"{flags:#x}")
    return names


def as_int(value: int) -> int:
    """A C ``int`` argument from a 64-bit register value (fds: -1 stays -1)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


# --- the ptrace engine --------------------------------------------------------------------------
@dataclass
class SyscallStop:
    """A tracee stopped at a system call's entry or exit."""

    pid: int
    name: str
    args: tuple[int, ...]  # raw register values, unsigned
    memory: TraceeMemory
    call: Any  # python-ptrace's PtraceSyscall (formats arguments generically)
    entered_ns: int = 0  # time.monotonic_ns() at the entry stop
    tgid: int = 0  # the process (thread group) the calling thread belongs to; 0: same as pid

    def __post_init__(self) -> None:
        if not self.tgid:
            self.tgid = self.pid


class TraceHandler(Protocol):
    """What the engine tells its user; the handler decides what matters and how to show it."""

    def wants(self, pid: int, name: str) -> bool: ...  # decode this syscall? (at entry)

    def syscall_entry(self, stop: SyscallStop) -> Any: ...  # returns state for the exit, or None

    def syscall_exit(self, stop: SyscallStop, state: Any, result: int, exited_ns: int) -> None: ...

    def syscall_unfinished(self, stop: SyscallStop, state: Any) -> None: ...

    def process_event(self, kind: str, pid: int, **info: Any) -> None: ...


@dataclass
class _Tracee:
    process: PtraceProcess
    tgid: int = 0  # thread group id (the pid of the process this thread belongs to)
    pending: tuple[SyscallStop, Any] | None = None  # an entered syscall awaiting its exit
    awaiting_initial_stop: bool = False  # auto-attached child whose first SIGSTOP is due


class SyscallTracer:
    """Runs a command under ptrace (or attaches to a pid) and reports syscalls to a handler.

    Reaps with waitpid(-1): do not run it while the same Python process waits for other children
    of its own. A tracer spawned child is killed if tracing stops early; an attached one is
    detached and left running."""

    def __init__(self, handler: TraceHandler, follow_forks: bool = False, all_syscalls: bool = False):
        self.handler = handler
        self.follow_forks = follow_forks
        self.debugger = PtraceDebugger()
        self.debugger.traceExec()  # an exec is an event stop, never a bare SIGTRAP
        if follow_forks:
            self.debugger.traceFork()
            self.debugger.traceClone()
        self.options = FunctionCallOptions(
            write_types=False, write_argname=False, replace_socketcall=False,
            string_max_length=256 if all_syscalls else 64, write_address=False, max_array_count=16,
        )
        self.tracees: dict[int, _Tracee] = {}
        self.spawned = False
        self.main_pid: int | None = None
        self.main_status: int | None = None  # raw wait status of the main tracee
        self._early_status: dict[int, int] = {}  # new children seen before their parent's event

    # -- starting ---------------------------------------------------------------------------
    def spawn(self, argv: list[str]) -> int:
        """Start ``argv`` stopped under ptrace (it runs once run() is called)."""
        if not argv:
            raise TraceError("no command to trace: give one after '--', e.g. luoagent trace -- ./prog")
        try:
            pid = createChild(list(argv), no_stdout=False, close_fds=False)
        except ChildError as exc:
            reason = re.sub(r"^\[Errno \d+\] ", "", str(exc))
            raise TraceError(f"cannot start {argv[0]!r}: {reason} (check the path and that it is executable)") from None
        except OSError as exc:
            raise TraceError(f"cannot start {argv[0]!r}: {exc.strerror}") from None
        try:
            process = self.debugger.addProcess(pid, is_attached=True)
        except ProcessEvent as exc:  # it died before its first exec stop
            raise TraceError(f"{argv[0]!r} (pid {pid}) ended before tracing could start: {exc}") from None
        self.spawned = True
        self.main_pid = pid
        self._register(process)
        self.handler.process_event("started", pid, argv=list(argv))
        return pid

    def attach(self, pid: int) -> None:
        """Attach to a running process (all its threads when following forks)."""
        if pid <= 0:
            raise TraceError(f"invalid pid {pid}: give the id of a running process")
        if not os.path.exists(f"/proc/{pid}"):
            raise TraceError(f"no process with pid {pid} (is it still running? see ps)")
        if pid == os.getpid():
            raise TraceError("luoagent trace cannot trace itself")
        if _proc_state(pid) == "Z":
            raise TraceError(f"process {pid} has already exited (a zombie its parent has not reaped)")
        if _is_kernel_thread(pid):
            raise TraceError(f"pid {pid} is a kernel thread: it makes no system calls to trace")
        tids = [pid]
        if self.follow_forks:
            try:
                tids += sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
            except OSError:
                pass
        for tid in tids:
            try:
                process = self.debugger.addProcess(tid, is_attached=False, is_thread=(tid != pid))
            except PtraceError as exc:
                if tid != pid:
                    continue  # a thread that ended meanwhile
                self.detach_all()
                raise TraceError(self._attach_failure(pid, exc)) from None
            except ProcessEvent as exc:
                if tid != pid:
                    continue
                self.detach_all()
                raise TraceError(f"process {pid} exited while attaching: {exc}") from None
            self._register(process, tgid=pid)
            if tid != pid:
                self.handler.process_event("thread", tid, parent=pid, tgid=pid)
        self.main_pid = pid
        self.handler.process_event("attached", pid, cmdline=procfs.cmdline(pid))

    @staticmethod
    def _attach_failure(pid: int, exc: PtraceError) -> str:
        code = getattr(exc, "errno", None)
        if code == errno_mod.ESRCH:
            return f"no process with pid {pid} (it exited?)"
        if code == errno_mod.EPERM:
            tracer = _tracer_pid(pid)
            if tracer:
                return (f"permission denied attaching to pid {pid}: it is already traced by pid {tracer} "
                        f"({procfs.cmdline(tracer) or '?'}); stop that tracer first")
            return (f"permission denied attaching to pid {pid}: run as root (CAP_SYS_PTRACE) or relax "
                    f"/proc/sys/kernel/yama/ptrace_scope")
        return f"cannot attach to pid {pid}: {exc}"

    def _register(self, process: PtraceProcess, awaiting_initial_stop: bool = False, tgid: int = 0) -> _Tracee:
        process.syscall_state.ignore_callback = self._ignore
        tracee = _Tracee(process, tgid=tgid or process.pid, awaiting_initial_stop=awaiting_initial_stop)
        self.tracees[process.pid] = tracee
        return tracee

    def _ignore(self, call) -> bool:
        return not self.handler.wants(call.process.pid, call.name)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        """Trace until every tracee is gone. KeyboardInterrupt: kill (spawned) or detach, re-raise."""
        try:
            for tracee in list(self.tracees.values()):
                tracee.process.syscall()
            while self.tracees:
                try:
                    pid, status = os.waitpid(-1, _WALL)
                except ChildProcessError:
                    break
                tracee = self.tracees.get(pid)
                if tracee is None:
                    self._early_status[pid] = status
                    continue
                self._handle(tracee, status)
        except BaseException:
            # a second Ctrl-C must not interrupt the clean-up (signal handlers: main thread only)
            main = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
            try:
                if self.spawned:
                    self.kill_all()
                else:
                    self.detach_all()
            finally:
                if main:
                    signal.signal(signal.SIGINT, previous)
            raise

    def _handle(self, tracee: _Tracee, status: int) -> None:
        process = tracee.process
        pid = process.pid
        if not os.WIFSTOPPED(status):
            self._gone(tracee, status)
            return
        sig = os.WSTOPSIG(status)
        event = status >> 16
        process.is_stopped = True
        if event in (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE):
            self._adopt(ptrace_geteventmsg(pid), tracee, is_thread=(event == PTRACE_EVENT_CLONE))
            self._resume(tracee)
        elif event == PTRACE_EVENT_EXEC:
            tracee = self._exec_took_over(tracee)
            _reset_memory_reader(tracee.process)
            self.handler.process_event("exec", pid, cmdline=procfs.cmdline(pid))
            self._resume(tracee)
        elif event:
            self._resume(tracee)
        elif sig == (signal.SIGTRAP | 0x80):
            self._syscall_stop(tracee)
            self._resume(tracee)
        elif sig == signal.SIGSTOP and tracee.awaiting_initial_stop:
            tracee.awaiting_initial_stop = False
            self._resume(tracee)
        else:  # a signal for the tracee: deliver it
            self._resume(tracee, sig)

    def _exec_took_over(self, leader: _Tracee) -> _Tracee:
        """A non-leader thread that calls execve comes out of it with the leader's pid; the other
        threads (the old leader included) vanish without an exit report. Move the exec'ing
        thread's state (it is inside execve) to the leader's pid."""
        pid = leader.process.pid
        former = ptrace_geteventmsg(pid)
        moved = self.tracees.get(former)
        if former == pid or moved is None:
            return leader
        self._forget(leader.process)
        self.tracees.pop(former, None)
        self.debugger.deleteProcess(moved.process)
        moved.process.pid = pid
        moved.process.is_thread = False
        moved.tgid = pid
        self.debugger.dict[pid] = moved.process
        self.debugger.list.append(moved.process)
        self.tracees[pid] = moved
        if moved.pending is not None:
            moved.pending[0].pid = pid
        self.handler.process_event("exited", former, note=f"thread became pid {pid} by execve")
        return moved

    def _resume(self, tracee: _Tracee, sig: int = 0) -> None:
        try:
            tracee.process.syscall(sig)
        except PtraceError as exc:
            if exc.errno != errno_mod.ESRCH:  # ESRCH: killed meanwhile; its exit status follows
                raise

    def _syscall_stop(self, tracee: _Tracee) -> None:
        process = tracee.process
        state = process.syscall_state
        if state.next_event == "enter":
            now = time.monotonic_ns()
            call = state.enter(self.options)
            if call is None:
                return
            args = tuple(arg.value for arg in call.arguments)
            stop = SyscallStop(process.pid, call.name, args, TraceeMemory(process), call, now, tracee.tgid)
            tracee.pending = (stop, self.handler.syscall_entry(stop))
        else:
            call = state.exit()
            now = time.monotonic_ns()
            pending, tracee.pending = tracee.pending, None
            if call is None or pending is None:
                return
            stop, handler_state = pending
            self.handler.syscall_exit(stop, handler_state, call.result, now)

    def _adopt(self, new_pid: int, parent: _Tracee, is_thread: bool) -> None:
        if new_pid in self.tracees:
            return
        process = PtraceProcess(self.debugger, new_pid, True, parent=parent.process, is_thread=is_thread)
        self.debugger.dict[new_pid] = process
        self.debugger.list.append(process)
        tgid = parent.tgid if is_thread else new_pid
        tracee = self._register(process, awaiting_initial_stop=True, tgid=tgid)
        if is_thread:
            self.handler.process_event("thread", new_pid, parent=parent.process.pid, tgid=tgid)
        else:
            self.handler.process_event("forked", new_pid, parent=parent.process.pid)
        status = self._early_status.pop(new_pid, None)
        if status is not None:
            self._handle(tracee, status)

    def _gone(self, tracee: _Tracee, status: int) -> None:
        process = tracee.process
        pid = process.pid
        if tracee.pending is not None:
            stop, state = tracee.pending
            tracee.pending = None
            self.handler.syscall_unfinished(stop, state)
        if pid == self.main_pid:
            self.main_status = status
        if os.WIFEXITED(status):
            self.handler.process_event("exited", pid, exit_code=os.WEXITSTATUS(status))
        else:
            self.handler.process_event("killed", pid, signal=signal.Signals(os.WTERMSIG(status)).name)
        self._forget(process)

    def _forget(self, process: PtraceProcess) -> None:
        _reset_memory_reader(process)
        process.running = False
        process.is_attached = False
        self.debugger.deleteProcess(process)
        self.tracees.pop(process.pid, None)

    # -- stopping -----------------------------------------------------------------------------
    def kill_all(self) -> None:
        """SIGKILL every tracee and reap it (a spawned command must not outlive its tracer)."""
        for pid, tracee in list(self.tracees.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        newborn: set[int] = set()  # auto-attached children we never adopted
        while self.tracees or newborn:
            try:
                pid, status = os.waitpid(-1, _WALL)
            except ChildProcessError:
                break
            tracee = self.tracees.get(pid)
            if os.WIFSTOPPED(status):
                if tracee is None and pid not in newborn:
                    newborn.add(pid)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        newborn.discard(pid)
            elif tracee is not None:
                self._gone(tracee, status)
            else:
                newborn.discard(pid)

    def detach_all(self) -> None:
        """Detach from every tracee and leave it running, wherever it was stopped or not.

        A tracee in a ptrace stop is detached at once; a running one gets a SIGSTOP aimed at it
        and is detached at that stop with the SIGSTOP suppressed, so nothing stays stopped."""
        work: list[tuple[int, bool]] = [(pid, False) for pid in self.tracees]
        while work:
            pid, stop_pending = work.pop(0)
            if _proc_state(pid) == "t":  # already in a ptrace stop (reaped or not)
                self._ptrace_detach(pid, 0)
                continue
            if not stop_pending:
                try:
                    _tgkill(_tgid(pid), pid, signal.SIGSTOP)
                except ProcessLookupError:
                    self._forget_pid(pid)
                    continue
            while True:
                try:
                    _, status = os.waitpid(pid, _WALL)
                except ChildProcessError:
                    self._forget_pid(pid)
                    break
                if not os.WIFSTOPPED(status):
                    tracee = self.tracees.get(pid)
                    if tracee is not None:
                        self._gone(tracee, status)
                    break
                sig, event = os.WSTOPSIG(status), status >> 16
                if event in (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE):
                    # the new child starts with a SIGSTOP of its own: detach it at that stop
                    work.append((ptrace_geteventmsg(pid), True))
                if sig == signal.SIGSTOP and not event:
                    self._ptrace_detach(pid, 0)
                    break
                # a syscall, event or other signal stop first: run on to the SIGSTOP
                deliver = 0 if event or sig in (signal.SIGTRAP | 0x80, signal.SIGTRAP) else sig
                try:
                    ptrace_cont(pid, deliver)
                except PtraceError:
                    self._forget_pid(pid)
                    break

    def _ptrace_detach(self, pid: int, sig: int) -> None:
        tracee = self.tracees.get(pid)
        if tracee is not None and tracee.pending is not None:
            stop, state = tracee.pending
            tracee.pending = None
            self.handler.syscall_unfinished(stop, state)
        try:
            ptrace_detach(pid, sig)
        except PtraceError:
            pass  # gone meanwhile: nothing to leave running
        else:
            self.handler.process_event("detached", pid)
        self._forget_pid(pid)

    def _forget_pid(self, pid: int) -> None:
        tracee = self.tracees.get(pid)
        if tracee is not None:
            self._forget(tracee.process)


def _reset_memory_reader(process: PtraceProcess) -> None:
    """Close python-ptrace's /proc/PID/mem handle: after an exec it still points at the old memory."""
    mem = getattr(process, "read_mem_file", None)
    if mem is not None:
        try:
            mem.close()
        except OSError:
            pass
        process.read_mem_file = None
    # python-ptrace swaps in its slow PEEKDATA reader on the instance when /proc/PID/mem fails
    process.__dict__.pop("readBytes", None)


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat after the ")" that ends the command name: [state, ppid, ...] ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return []


def _proc_state(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[0].decode() if fields else ""


def _is_kernel_thread(pid: int) -> bool:
    # PF_KTHREAD (include/linux/sched.h) in the flags field of /proc/PID/stat
    try:
        flags = int(_stat_fields(pid)[6])
    except (ValueError, IndexError):
        return False
    return bool(flags & 0x00200000)


def _status_number(pid: int, field: str, default: int) -> int:
    """The number after ``field:`` in /proc/PID/status, ``default`` if the process or line is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return default


def _tracer_pid(pid: int) -> int:
    return _status_number(pid, "TracerPid", 0)


def _tgid(tid: int) -> int:
    return _status_number(tid, "Tgid", tid)


def _tgkill(tgid: int, tid: int, sig: int) -> None:
    """Signal one thread: a process-wide SIGSTOP could be taken by a thread we already let go."""
    if tgid == tid:
        os.kill(tid, sig)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(tgid, tid, sig) != 0:
        code = ctypes.get_errno()
        if code == errno_mod.ESRCH:
            raise ProcessLookupError(tid)
        raise OSError(code, os.strerror(code))


__all__ = [
    "LUO_COMMANDS",
    "LuoCommand",
    "DecodedStruct",
    "SyscallStop",
    "SyscallTracer",
    "TraceHandler",
    "TraceeMemory",
    "UnreadablePointer",
    "as_int",
    "decode_struct",
    "describe_fd",
    "errno_name",
    "is_luo_request",
    "luo_command",
]
