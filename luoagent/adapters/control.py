"""The daemon's control socket: a root-only Unix stream socket (created 0600, peer checked with
SO_PEERCRED) carrying versioned JSON lines; the asyncio server side and the blocking client side.

Framing only, no policy: each message is one JSON object on one line, ``"v"`` = PROTOCOL.
The messages themselves are documented in docs/daemon.md."""

from __future__ import annotations

import asyncio
import contextlib
import errno as E
import json
import os
import socket
import stat
import struct
from pathlib import Path

from luoagent.errors import DaemonError, DaemonNotRunning, PeerRefused

#: protocol major version; a message with another "v" is refused with an error naming both
PROTOCOL = 1
#: one message may not exceed this (a status document is a few KB)
MAX_LINE = 1 << 20


def encode(msg: dict) -> bytes:
    return (json.dumps({"v": PROTOCOL, **msg}, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> dict:
    """One received line -> message; DaemonError for anything that is not protocol 1 JSON."""
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise DaemonError(f"control socket: not a JSON line ({exc})") from None
    if not isinstance(msg, dict):
        raise DaemonError("control socket: a message must be a JSON object")
    if msg.get("v") != PROTOCOL:
        raise DaemonError(
            f"control socket: protocol version {msg.get('v')!r}, this luoagent speaks {PROTOCOL}; "
            "run the same luoagent version as the daemon (or restart the daemon after an upgrade)"
        )
    return msg


def peer_creds(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


# ---------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------
class Channel:
    """One accepted client connection: ``send`` (never blocks the daemon), ``recv``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pid: int, uid: int):
        self.reader, self.writer, self.pid, self.uid = reader, writer, pid, uid

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def send(self, msg: dict) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write(encode(msg))

    async def recv(self) -> dict | None:
        """The next message, None at end of stream."""
        try:
            line = await self.reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise DaemonError(f"control socket: message longer than {MAX_LINE} bytes") from None
        except (ConnectionError, OSError):
            return None
        if not line:
            return None
        return decode(line)

    async def close(self) -> None:
        # also while the daemon shuts down (tasks cancelled): closing must not raise
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self.writer.wait_closed()


def _prepare(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # stale: left by a daemon that died
        return
    finally:
        probe.close()
    raise DaemonError(f"another luoagent daemon is already serving {path}; stop it first (`luoagent status`)")


async def serve(path: Path, handle, allowed_uids: set[int]) -> asyncio.AbstractServer:
    """Listen on ``path`` (mode 0600 from creation: the umask is set around bind) and run
    ``await handle(channel)`` per client whose SO_PEERCRED uid is in ``allowed_uids``; others
    get one error message and are disconnected."""
    _prepare(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)

    async def on_connect(reader, writer):
        pid, uid, _gid = peer_creds(writer.get_extra_info("socket"))
        ch = Channel(reader, writer, pid, uid)
        try:
            if uid not in allowed_uids:
                ch.send({"type": "error", "error": PeerRefused.__name__, "exit_code": PeerRefused.exit_code,
                         "message": f"the luoagent daemon accepts only root; this client runs as uid {uid} "
                                    f"(pid {pid}): run the command as root"})
                return
            await handle(ch)
        except asyncio.CancelledError:
            pass  # the server shuts down: what was sent is flushed below, then the client sees EOF
        finally:
            await ch.close()

    return await asyncio.start_unix_server(on_connect, sock=sock, limit=MAX_LINE)


# ---------------------------------------------------------------------------------------
# client (blocking: a CLI command is one conversation)
# ---------------------------------------------------------------------------------------
class Client:
    def __init__(self, sock: socket.socket, path: Path):
        self.sock, self.path = sock, path
        self._buf = b""
        self.hello: dict = {}

    @classmethod
    def connect(cls, path: Path, timeout: float = 10.0) -> "Client":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            s.close()
            if exc.errno in (E.ENOENT, E.ECONNREFUSED):
                raise DaemonNotRunning(f"no luoagent daemon serves {path}") from None
            if exc.errno in (E.EACCES, E.EPERM):
                raise PeerRefused(
                    f"permission denied on the control socket {path}: the luoagent daemon accepts only "
                    "root (socket mode 0600); run this command as root"
                ) from None
            raise DaemonError(f"cannot reach the luoagent daemon at {path}: {exc.strerror or exc}") from None
        s.settimeout(None)
        c = cls(s, path)
        first = c.recv()
        if first is None:
            raise DaemonError(f"the luoagent daemon at {path} closed the connection at once")
        if first.get("type") == "error":
            raise error_from(first)
        c.hello = first
        return c

    def send(self, msg: dict) -> None:
        self.sock.sendall(encode(msg))

    def recv(self) -> dict | None:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
            if len(self._buf) > MAX_LINE:
                raise DaemonError(f"control socket: message longer than {MAX_LINE} bytes")
        line, self._buf = self._buf.split(b"\n", 1)
        return decode(line)

    def close(self) -> None:
        self.sock.close()


def error_from(msg: dict) -> Exception:
    """An error message from the daemon as the exception of the same name (else DaemonError)."""
    from luoagent import errors

    cls = getattr(errors, str(msg.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.LuoAgentError)):
        cls = DaemonError
    try:
        exc = cls(str(msg.get("message", "")))
    except TypeError:
        exc = DaemonError(str(msg.get("message", "")))
    if isinstance(msg.get("exit_code"), int) and msg["exit_code"] != exc.exit_code:
        exc.exit_code = msg["exit_code"]
    return exc

