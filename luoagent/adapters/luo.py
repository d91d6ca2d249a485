"""The kernel's Live Update Orchestrator (/dev/liveupdate) as Python objects over the cffi shim.

Validates names and tokens before any ioctl, logs every ioctl with its duration, maps errno to
the exceptions of luoagent.errors (``luo_error`` is a pure function, testable without LUO)."""

from __future__ import annotations

import errno as E
import os
import time
from collections.abc import Callable

from luoagent import errors
from luoagent._luo_shim import ffi, lib
from luoagent.adapters import procfs
from luoagent.log import get_logger

DEVICE = "/dev/liveupdate"
NAME_MAX_BYTES = lib.LUO_SESSION_NAME_LENGTH - 1  # the kernel needs room for the NUL
TOKEN_MAX = 2**64 - 1

log = get_logger(__name__)

#: ioctl number -> LUO command name (for logs and for decoding traced ioctls)
IOCTL_NAMES = {
    lib.LUO_IOCTL_CREATE_SESSION: "CREATE_SESSION",
    lib.LUO_IOCTL_RETRIEVE_SESSION: "RETRIEVE_SESSION",
    lib.LUO_IOCTL_PRESERVE_FD: "PRESERVE_FD",
    lib.LUO_IOCTL_RETRIEVE_FD: "RETRIEVE_FD",
    lib.LUO_IOCTL_FINISH: "FINISH",
    lib.LUO_IOCTL_GET_NAME: "GET_NAME",
}

# What to change when /dev/liveupdate is missing; doctor says the same in more detail.
ENABLE_HINT = (
    "boot a kernel (>= 6.19) built with CONFIG_KEXEC_HANDOVER=y, CONFIG_LIVEUPDATE=y and "
    "CONFIG_LIVEUPDATE_MEMFD=y, with 'liveupdate=on' and KHO enabled ('kho=on' or "
    "CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y) on its command line; run 'luoagent doctor'"
)


# --- validation ------------------------------------------------------------------------
def validate_name(name: str) -> bytes:
    """Return the session name as the bytes the kernel gets; InvalidName if it cannot be one."""
    if not isinstance(name, str):
        raise errors.InvalidName(f"session name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8", errors="surrogateescape")
    if not raw:
        raise errors.InvalidName("session name is empty; give a non-empty name (e.g. 'luoagent/vm/a')")
    if b"\0" in raw:
        raise errors.InvalidName(f"session name {name!r} contains a NUL byte; remove it")
    if len(raw) > NAME_MAX_BYTES:
        raise errors.InvalidName(
            f"session name {name!r} is {len(raw)} bytes in UTF-8; the kernel allows at most "
            f"{NAME_MAX_BYTES}: shorten it"
        )
    return raw


def validate_token(token: int) -> int:
    """Return ``token`` if it is an unsigned 64-bit integer; InvalidToken otherwise."""
    if isinstance(token, bool) or not isinstance(token, int):
        raise errors.InvalidToken(f"token must be an int in 0..2**64-1, not {type(token).__name__} {token!r}")
    if not 0 <= token <= TOKEN_MAX:
        raise errors.InvalidToken(f"token {token} is outside 0..2**64-1 (an unsigned 64-bit integer)")
    return token


def _validate_fd(fd) -> int:
    if hasattr(fd, "fileno"):
        fd = fd.fileno()
    if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
        raise errors.UsageError(f"file descriptor must be a non-negative int (or have fileno()), not {fd!r}")
    return fd


# --- errno -> exception ----------------------------------------------------------------
_GENERIC: dict[int, str] = {
    E.ENOTTY: "this kernel does not know the ioctl: its LUO is older or different from the "
    "ABI luoagent was built for (Linux >= 6.19)",
    E.E2BIG: "the kernel does not understand part of the request: its LUO uAPI is older than "
    "luoagent's; update the kernel or luoagent",
    E.EOPNOTSUPP: "the kernel understood the request but does not support a value in it",
    E.ENOMEM: "the kernel ran out of memory; free memory and retry",
    E.EOVERFLOW: "a size computation overflowed in the kernel",
    E.ENOSPC: "the kernel has no room for another entry; preserve fewer sessions/files",
    E.EBADF: "the file descriptor is not open",
    E.EFAULT: "bad address passed to the kernel (a luoagent bug)",
}


def _ename(err: int) -> str:
    return E.errorcode.get(err, f"errno {err}")


def luo_error(
    op: str,
    err: int,
    *,
    name: str | None = None,
    token: int | None = None,
    fd: int | None = None,
    incoming: bool | None = None,
    holders: Callable[[], list[procfs.Holder]] | None = None,
    device: str = DEVICE,
) -> errors.LuoError:
    """The exception for ``err`` from LUO operation ``op``; pure except for calling ``holders``.

    ``op`` is one of open, create_session, retrieve_session, preserve, retrieve, finish, get_name.
    ``incoming`` says whether the session was retrieved after kexec (True) or created (False).
    """
    what = {
        "open": f"opening {device}",
        "create_session": f"creating session {name!r}",
        "retrieve_session": f"retrieving session {name!r}",
        "preserve": f"preserving fd {fd} as token {token} in session {name!r}",
        "retrieve": f"retrieving token {token} from session {name!r}",
        "finish": f"finishing session {name!r}",
        "get_name": "reading a session's name",
    }.get(op, op)
    head = f"{what} failed ({_ename(err)}): "

    def make(cls, why):
        return cls(head + why, errno=err)

    if op == "open":
        if err in (E.ENOENT, E.ENODEV, E.ENXIO):
            return make(errors.LuoUnavailable, f"this kernel has no Live Update Orchestrator; {ENABLE_HINT}")
        if err == E.EBUSY:
            found = holders() if holders else []
            who = (
                "; ".join(f"pid {h.pid} ({h.cmdline or '?'}) holds it as fd {h.fd}" for h in found)
                if found
                else "no holder visible in /proc (run as root to see every process)"
            )
            return make(
                errors.LuoBusy,
                f"only one process may have it open at a time: {who}; stop that process or "
                "let it finish, then retry",
            )
        if err == E.EIO:
            return make(
                errors.LuoStateCorrupt,
                "the state handed over by the previous kernel could not be deserialized; preserved "
                "sessions of that boot are lost: check dmesg for 'luo'/'KHO' errors",
            )
        if err in (E.EACCES, E.EPERM):
            return make(errors.LuoError, "permission denied; run as root (LUO needs CAP_SYS_ADMIN-level access)")
    elif op == "create_session":
        if err == E.EEXIST:
            return make(
                errors.SessionExists,
                "a session with this name already exists in this boot (names are unique until "
                "kexec); close the other session's fd or pick another name",
            )
        if err == E.EINVAL:
            return make(errors.LuoIoctlError, "the kernel rejected the name (empty or not NUL-terminated)")
    elif op == "retrieve_session":
        if err == E.ENOENT:
            return make(
                errors.SessionNotFound,
                "no session of that name came across the last kexec in this boot (it was never "
                "preserved, its fd was closed before kexec, or this boot was not a live update)",
            )
        if err == E.EINVAL:
            return make(
                errors.SessionAlreadyRetrieved,
                "it was already retrieved in this boot (a session can be retrieved once); use "
                "the fd of the first retrieval",
            )
    elif op == "preserve":
        if incoming and err == E.EINVAL:
            return make(
                errors.LuoIoctlError,
                "this session was retrieved after kexec; files can only be preserved in a "
                "session created in this boot",
            )
        if err in (E.ENOENT, E.EINVAL):
            return make(
                errors.NotPreservable,
                "the kernel cannot preserve this kind of file: only unlinked shmem files from "
                "memfd_create() are preservable (MFD_HUGETLB memfds, regular files, sockets and "
                "devices are refused)",
            )
        if err == E.EOPNOTSUPP:
            return make(
                errors.NotPreservable,
                "the memfd carries a seal this kernel cannot preserve; use only "
                "F_SEAL_SEAL/SHRINK/GROW/WRITE/FUTURE_WRITE/EXEC",
            )
        if err == E.EEXIST:
            return make(errors.TokenExists, "the token is already used in this session; pick a unique token")
        if err == E.EBUSY:
            return make(
                errors.FileAlreadyPreserved,
                "this file (the same open file, maybe through another fd) is already preserved, "
                "possibly in another session; preserve it once",
            )
        if err == E.EFBIG:
            return make(errors.NotPreservable, "the memfd is too large to preserve (more than 2**32 pages)")
    elif op == "retrieve":
        if not incoming and err == E.EINVAL:
            return make(
                errors.LuoIoctlError,
                "this session was created in this boot; only sessions retrieved after kexec give files back",
            )
        if err == E.ENOENT:
            return make(
                errors.TokenNotFound,
                "the session holds no file with this token in this boot; check the token "
                "recorded before kexec",
            )
        return make(
            errors.LuoIoctlError,
            (_GENERIC.get(err, "the kernel could not restore the file") + "; a failed retrieve is "
             "not retried: this token keeps failing until the next kexec"),
        )
    elif op == "finish":
        if not incoming and err == E.EINVAL:
            return make(
                errors.SessionFinishFailed,
                "this session was created in this boot; only a session retrieved after kexec "
                "can be finished (closing an outgoing session unpreserves its files)",
            )
        why = {
            E.EBUSY: "a preserved file's handler is not ready to release it yet"
        }.get(err, _GENERIC.get(err, "the kernel refused"))
        return make(errors.SessionFinishFailed, why + "; the files stay preserved, retry finish")
    return make(errors.LuoIoctlError, _GENERIC.get(err, "unexpected error from the kernel"))


# --- ioctls ----------------------------------------------------------------------------
def _call(op: str, fn, *args, **ctx):
    """Run one shim function, log it with its duration, raise the mapped error on -errno."""
    start = time.perf_counter()
    ret = fn(*args)
    ms = round((time.perf_counter() - start) * 1000, 3)
    log.debug("luo.ioctl", op=op, result=ret if ret >= 0 else _ename(-ret), duration_ms=ms, **ctx)
    if ret < 0:
        raise luo_error(op, -ret, **ctx)
    return ret


class _OwnedFd:
    """An fd this object owns: closed on close(), on leaving a ``with`` block, and when collected."""

    _fd: int = -1

    def _closed_fd(self, fd: int) -> None:
        """Hook run after the fd is closed (subclasses log what closing meant)."""

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
            self._closed_fd(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # An unreferenced owner must not linger: for a session, its fd decides what survives kexec.
        try:
            self.close()
        except Exception:
            pass


class Session(_OwnedFd):
    """One LUO session fd.

    Outgoing (``create_session``): preserve files into it; they cross the next kexec only
    while this fd stays open — closing it unpreserves them. Incoming (``retrieve_session``
    after kexec): retrieve files, then ``finish``; closing it also finishes (unretrieved files
    are released). A session lives as long as its fd, independent of /dev/liveupdate's.
    """

    def __init__(self, fd: int, name: str, *, incoming: bool):
        self._fd = fd
        self._name = name
        self.incoming = incoming

    def fileno(self) -> int:
        if self._fd < 0:
            raise errors.UsageError(f"session {self._name!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def name(self) -> str:
        """The session's full name as the kernel knows it (GET_NAME ioctl)."""
        buf = ffi.new("char[]", lib.LUO_SESSION_NAME_LENGTH)
        _call("get_name", lib.luo_get_name, self.fileno(), buf, name=self._name, incoming=self.incoming)
        return ffi.string(buf).decode("utf-8", errors="surrogateescape")

    def preserve(self, fd, token: int) -> None:
        """Preserve the file behind ``fd`` under ``token`` (outgoing sessions only).

        The kernel pins the memfd's pages now and fills its holes; the file stays preserved
        while this session fd is open. Caller keeps ownership of ``fd`` (closing it is fine:
        the session holds its own reference). Only unlinked non-hugetlb memfds are accepted.
        """
        token = validate_token(token)
        fd = _validate_fd(fd)
        _call("preserve", lib.luo_preserve_fd, self.fileno(), fd, token,
              name=self._name, token=token, fd=fd, incoming=self.incoming)

    def retrieve(self, token: int) -> int:
        """Return a new fd (owned by the caller) for the file preserved under ``token``.

        Incoming sessions only. Retrieving the same token again returns the same file as a new
        fd; a failed retrieve is never retried by the kernel (the error sticks until kexec).
        FD_CLOEXEC was not preserved; the new fd is close-on-exec.
        """
        token = validate_token(token)
        return _call("retrieve", lib.luo_retrieve_fd, self.fileno(), token,
                     name=self._name, token=token, incoming=self.incoming)

    def finish(self) -> None:
        """Tell the kernel restoration is complete (incoming sessions only).

        Call after every needed token is retrieved; the kernel then drops its hold on the
        preserved resources. On failure they stay preserved and finish may be retried.
        """
        _call("finish", lib.luo_finish, self.fileno(), name=self._name, incoming=self.incoming)

    def close(self) -> None:
        """Close the session fd: outgoing → its files are unpreserved; incoming → finished."""
        super().close()

    def _closed_fd(self, fd: int) -> None:
        log.debug("luo.session_closed", name=self._name, incoming=self.incoming)

    def __repr__(self) -> str:
        kind = "incoming" if self.incoming else "outgoing"
        return f"<Session {self._name!r} {kind} fd={self._fd}>"


class LiveUpdate(_OwnedFd):
    """An open /dev/liveupdate: the factory of sessions.

    Only one process may hold it open (others get LuoBusy). Closing it does not end sessions
    created or retrieved through it: each lives as long as its own fd.
    """

    def __init__(self, fd: int, path: str = DEVICE):
        self._fd = fd
        self.path = path

    @classmethod
    def open(cls, path: str = DEVICE) -> LiveUpdate:
        """Open the LUO device; LuoUnavailable / LuoBusy / LuoStateCorrupt say why not."""
        start = time.perf_counter()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            fd, err = -1, exc.errno
        ms = round((time.perf_counter() - start) * 1000, 3)
        log.debug("luo.open", path=path, result=fd if fd >= 0 else _ename(err), duration_ms=ms)
        if fd < 0:
            raise luo_error("open", err, device=path, holders=lambda: procfs.holders(path))
        return cls(fd, path)

    def fileno(self) -> int:
        if self._fd < 0:
            raise errors.UsageError(f"{self.path} is closed")
        return self._fd

    def create_session(self, name: str) -> Session:
        """Create an outgoing session ``name`` (unique in this boot) for files to preserve."""
        raw = validate_name(name)
        fd = _call("create_session", lib.luo_create_session, self.fileno(), raw, name=name, incoming=False)
        return Session(fd, name, incoming=False)

    def retrieve_session(self, name: str) -> Session:
        """Retrieve the session ``name`` preserved by the previous kernel (once per boot)."""
        raw = validate_name(name)
        fd = _call("retrieve_session", lib.luo_retrieve_session, self.fileno(), raw, name=name, incoming=True)
        return Session(fd, name, incoming=True)


#: a token luoagent never preserves (its tokens are 0, 1..N and 0x1000): RETRIEVE_FD of it
#: tells the session's direction without touching any preserved file
PROBE_TOKEN = TOKEN_MAX


def adopt_session(fd: int) -> Session:
    """A Session for an LUO session fd this process got from elsewhere (systemd's fd store).

    GET_NAME works on either kind of session (the kernel's answer, not a file name); the
    direction comes from RETRIEVE_FD of PROBE_TOKEN, which the kernel type-checks first
    (luo_session.c): an outgoing session answers EINVAL, an incoming one (retrieved after
    kexec, finished or not) looks the token up and answers ENOENT. The caller gives ``fd``
    over to the Session. Not a session fd at all: LuoIoctlError (ENOTTY/EINVAL)."""
    fd = _validate_fd(fd)
    buf = ffi.new("char[]", lib.LUO_SESSION_NAME_LENGTH)
    _call("get_name", lib.luo_get_name, fd, buf, fd=fd)
    name = ffi.string(buf).decode("utf-8", errors="surrogateescape")
    ret = lib.luo_retrieve_fd(fd, PROBE_TOKEN)
    if ret >= 0:  # a foreign session that preserved this very token: it is incoming
        os.close(ret)
        return Session(fd, name, incoming=True)
    if -ret == E.ENOENT:
        return Session(fd, name, incoming=True)
    if -ret == E.EINVAL:
        return Session(fd, name, incoming=False)
    raise luo_error("retrieve", -ret, name=name, token=PROBE_TOKEN)
