"""The daemon's LUO session fds in systemd's fd store: each pushed right after it is made or
retrieved, removed when it ends (rollback, finish), and sorted when a (re)started daemon gets them back.

Why: a session lives as long as any fd of it is open. With a copy in the store
(`FileDescriptorStoreMax=` + `FileDescriptorStorePreserve=yes`) a daemon that crashes keeps its
sessions, and systemd carries them across `systemctl kexec` and hands the incoming sessions back
(`$LISTEN_FDNAMES`). FDNAME map: the FDNAME is the session name itself (`luoagent`,
`luoagent/vm/NAME`): VM names are ASCII letters, digits and `._+-` (manifest.vm_session_name),
which systemd's FDNAME rule (printable ASCII, no ':', at most 255) always accepts; a name it
would refuse is an error, never silently rewritten. The kernel's own name (GET_NAME) of a handed
back fd is what counts; the FDNAME is only what to remove it by. Outgoing or incoming: the
kernel's answer (luo.adopt_session), never the name. Disabled (not under systemd, or the unit
has no fd store): every call is a no-op and the daemon alone holds its fds."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from luoagent.adapters import luo, sd_notify
from luoagent.errors import DaemonError, LuoAgentError
from luoagent.log import get_logger

log = get_logger(__name__)

#: PID 1's own LUO session (systemd refuses a unit's session of this name and kills it)
SYSTEMD_SESSION = "systemd"
#: where a held session fd lives, as `luoagent status` names it
IN_DAEMON = "daemon"
IN_STORE = "fd store"


def fdname(session_name: str) -> str:
    """The FDNAME a session is stored under: its own name (checked, never rewritten)."""
    if session_name == SYSTEMD_SESSION:
        raise DaemonError("the LUO session name 'systemd' belongs to PID 1; luoagent never uses it")
    return sd_notify.check_fdname(session_name)


@dataclass
class FdStore:
    """The store of this daemon's unit, or a disabled stand-in (``enabled`` False)."""

    enabled: bool = False
    #: FileDescriptorStoreMax= ($FDSTORE): how many fds the store takes in all
    capacity: int = 0
    #: session name -> FDNAME of each session with a copy in the store now
    stored: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> "FdStore":
        """Enabled when a service manager listens and the unit has a store ($FDSTORE > 0)."""
        capacity = sd_notify.fd_store_max() if sd_notify.active() else 0
        return cls(enabled=capacity > 0, capacity=capacity)

    def describe(self) -> str:
        if self.enabled:
            return f"systemd fd store (FileDescriptorStoreMax={self.capacity}): LUO sessions survive a daemon crash"
        why = ("under systemd, but the unit has no fd store (FileDescriptorStoreMax=0)" if sd_notify.active()
               else "not under systemd")
        return f"no fd store ({why}): the daemon alone holds its LUO sessions; if it dies during a restore, RAM not yet handed to a QEMU is lost"

    def room(self) -> int:
        return self.capacity - len(self.stored) if self.enabled else 0

    def check_room(self, needed: int) -> None:
        """DaemonError if ``needed`` more fds would not fit (systemd drops extra fds, only logging it)."""
        if self.enabled and needed > self.room():
            raise DaemonError(
                f"the fd store of luoagent.service holds {self.capacity} fds ({len(self.stored)} in use) and "
                f"this job needs {needed} more (one per VM plus the manifest): raise FileDescriptorStoreMax= "
                "(a drop-in for luoagent.service), `systemctl daemon-reload`, restart the daemon, retry"
            )

    def push(self, session) -> None:
        """Store a copy of ``session``'s fd (FDPOLL=0: a session fd never signals EPOLLHUP);
        returns once systemd has it (BARRIER)."""
        if not self.enabled:
            return
        name = session.name  # GET_NAME: the kernel's name
        self.stored[name] = fdname(name)
        sd_notify.store_fd(session.fileno(), self.stored[name])
        sd_notify.barrier()

    def forget(self, name: str) -> None:
        """Drop ``name``'s copy (FDSTOREREMOVE) and wait until systemd closed it: with the
        daemon's own fd closed too, the kernel then releases the session (outgoing: its files
        are unpreserved; incoming: it is finished)."""
        if not self.enabled or name not in self.stored:
            return
        sd_notify.remove_fd(self.stored.pop(name))
        sd_notify.barrier()

    def where(self, name: str) -> list[str]:
        """Where the fds of a session the daemon holds live."""
        return [IN_DAEMON, IN_STORE] if name in self.stored else [IN_DAEMON]


@dataclass
class Handed:
    """What a started daemon got back from the store, sorted by the kernel's answer."""

    incoming: dict[str, luo.Session] = field(default_factory=dict)
    outgoing: dict[str, luo.Session] = field(default_factory=dict)
    #: FDNAMEs of fds that were no LUO session (closed and removed from the store)
    foreign: list[str] = field(default_factory=list)


def take_listen_fds(store: FdStore) -> Handed:
    """Adopt every fd systemd passed at start ($LISTEN_FDS); each session stays recorded as
    stored under its FDNAME, so forget() removes it. Second fds of one session are closed; an
    fd that is no LUO session is closed and removed from the store."""
    handed = Handed()
    for name, fds in sd_notify.listen_fds().items():
        for fd in fds:
            try:
                session = luo.adopt_session(fd)
                kernel_name = session.name
            except LuoAgentError as exc:
                log.warning("fd_store.foreign_fd", fdname=name, error=str(exc))
                with contextlib.suppress(OSError):
                    os.close(fd)
                if name not in handed.foreign:
                    handed.foreign.append(name)
                    if store.enabled:
                        sd_notify.remove_fd(name)
                continue
            store.stored[kernel_name] = name
            into = handed.incoming if session.incoming else handed.outgoing
            if kernel_name in into:
                session.close()  # a second copy of a session we already hold
            else:
                into[kernel_name] = session
    return handed

