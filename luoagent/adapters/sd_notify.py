"""systemd's service notification protocol, written here (it is small): sd_notify datagrams
to $NOTIFY_SOCKET (READY=1, STATUS=, STOPPING=1, FDSTORE=1 with SCM_RIGHTS, BARRIER=1) and $LISTEN_FDS.

No policy: callers decide what to announce. Without $NOTIFY_SOCKET every call is a no-op
that returns False (not under systemd). Protocol facts: docs/facts.md "systemd"."""

from __future__ import annotations

import os
import select
import socket

from luoagent.errors import DaemonError

#: the first fd systemd passes (sd_listen_fds(3))
LISTEN_FDS_START = 3
#: systemd's fdname_is_valid(): at most 255 characters
FDNAME_MAX = 255


def active() -> bool:
    """True when a service manager listens ($NOTIFY_SOCKET is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def fd_store_max() -> int:
    """The unit's FileDescriptorStoreMax= as systemd passes it in $FDSTORE (0: no fd store)."""
    try:
        return int(os.environ.get("FDSTORE") or 0)
    except ValueError:
        raise DaemonError(f"$FDSTORE={os.environ.get('FDSTORE')!r} is not a number") from None


def check_fdname(name: str) -> str:
    """``name`` if systemd accepts it as an FDNAME (printable ASCII except ':', at most 255
    characters, as its fdname_is_valid() checks); DaemonError naming the offence otherwise."""
    bad = sorted({c for c in name if not " " <= c <= "~" or c == ":"})
    if bad or not name or len(name) > FDNAME_MAX:
        why = (f"has {', '.join(repr(c) for c in bad)}" if bad else
               "is empty" if not name else f"is {len(name)} characters (at most {FDNAME_MAX})")
        raise DaemonError(f"{name!r} cannot be an fd-store name (FDNAME): it {why}; systemd takes "
                          "printable ASCII without ':'")
    return name


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] not in "/@":
        raise DaemonError(f"$NOTIFY_SOCKET={addr!r} is neither a path nor an abstract socket (@name)")
    return "\0" + addr[1:] if addr[0] == "@" else addr


def notify(fields: dict[str, str | int], fds: list[int] | None = None) -> bool:
    """Send one notification (``{"READY": 1}`` -> ``READY=1``); ``fds`` go as SCM_RIGHTS."""
    addr = _address()
    if addr is None:
        return False
    for key, value in fields.items():
        if "\n" in f"{key}{value}" or "=" in key:
            raise DaemonError(f"sd_notify field {key!r} has a newline or '=': not sent")
    payload = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(addr)
        if fds:
            socket.send_fds(s, [payload], list(fds))
        else:
            s.send(payload)
    except OSError as exc:
        raise DaemonError(f"sd_notify to {os.environ.get('NOTIFY_SOCKET')} failed: {exc.strerror or exc}") from None
    finally:
        s.close()
    return True


def store_fd(fd: int, name: str, *, poll: bool = False) -> bool:
    """Push ``fd`` into the unit's fd store under ``name`` (FDPOLL=0 unless ``poll``)."""
    fields: dict[str, str | int] = {"FDSTORE": 1, "FDNAME": check_fdname(name)}
    if not poll:
        fields["FDPOLL"] = 0
    return notify(fields, [fd])


def remove_fd(name: str) -> bool:
    """Drop every fd stored under ``name`` from the unit's fd store."""
    return notify({"FDSTOREREMOVE": 1, "FDNAME": check_fdname(name)})


def barrier(timeout: float = 5.0) -> bool:
    """Wait until the manager has processed every notification sent before (BARRIER=1 with
    the write end of a pipe, alone in its datagram: the manager closes it once it got there).
    DaemonError on timeout; False when not under systemd."""
    if _address() is None:
        return False
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            notify({"BARRIER": 1}, [w])
        finally:
            os.close(w)
        poller = select.poll()
        poller.register(r, select.POLLHUP)
        if not poller.poll(int(timeout * 1000)):
            raise DaemonError(f"the service manager did not answer BARRIER=1 within {timeout:g} s")
    finally:
        os.close(r)
    return True


def listen_fds(unset: bool = True) -> dict[str, list[int]]:
    """The fds systemd passed this process, by FDNAME (sd_listen_fds_with_names(3)); each made
    close-on-exec. Empty when $LISTEN_PID is not this process."""
    env = os.environ
    try:
        pid = int(env.get("LISTEN_PID", "0"))
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise DaemonError("$LISTEN_PID/$LISTEN_FDS are not numbers") from None
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    if unset:
        for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(k, None)
    if pid != os.getpid() or count <= 0:
        return {}
    found: dict[str, list[int]] = {}
    for i in range(count):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        found.setdefault(names[i] if i < len(names) else "unknown", []).append(fd)
    return found
