"""QMP client adapter: one async connection to a QEMU monitor (qemu.qmp) where every call has a
timeout and every failure becomes an exception of luoagent's tree (QmpUnreachable, QmpCommandFailed).

Protocol only: what the commands mean for a live update lives in `cpr` and `qemu_ram`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from luoagent.errors import QmpCommandFailed, QmpUnreachable

# qemu.qmp logs every failed connect attempt at ERROR through the root logger; this adapter
# turns those into exceptions with the socket and a remedy, so keep the library quiet
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Qmp:
    """An async QMP connection (qemu.qmp.QMPClient) where every call has a timeout.

    Use ``async with await Qmp.connect(path) as q:`` or call ``await q.close()``."""

    def __init__(self, client, socket_path: Path):
        self._client = client
        self.socket_path = socket_path
        self._watches: list["EventWatch"] = []

    # -- connection ----------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike,
        timeout: float = 10.0,
        process: subprocess.Popen | None = None,
    ) -> "Qmp":
        """Connect to a QMP unix socket, retrying until it appears or ``timeout`` passes.

        ``process``: the QEMU being waited for; if it exits, fail at once with its status."""
        from qemu.qmp import QMPClient

        path = Path(socket_path)
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            if process is not None and process.poll() is not None:
                raise QmpUnreachable(
                    f"QEMU (pid {process.pid}) exited with status {process.returncode} before "
                    f"its QMP socket {path} answered; read its log for the reason"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if path.exists():
                client = QMPClient(f"luoagent:{path.name}")
                try:
                    await asyncio.wait_for(client.connect(str(path)), timeout=remaining)
                    return cls(client, path)
                except asyncio.TimeoutError:
                    last_error = RuntimeError(
                        "connected, but no QMP greeting came (another client may hold the monitor)"
                    )
                    await _quiet_disconnect(client)
                    break
                except Exception as exc:  # ConnectError wraps OSError / EOFError
                    last_error = exc
                    await _quiet_disconnect(client)
            await asyncio.sleep(min(0.05, max(remaining, 0)))
        why = "the socket does not exist" if not path.exists() else f"last error: {last_error}"
        raise QmpUnreachable(
            f"QMP socket {path} did not answer within {timeout:g} s ({why}); check that the "
            "QEMU is running, was started with -qmp unix:PATH,server=on,wait=off, and that "
            "no other client holds the socket"
        )

    async def close(self) -> None:
        for watch in list(self._watches):
            watch.close()
        await _quiet_disconnect(self._client)

    # -- events --------------------------------------------------------------------------
    def watch(self, *names: str) -> "EventWatch":
        """Start collecting the QMP events ``names`` (e.g. STOP, RESUME) from now on; events
        that happen before this call are not seen, so call it before causing them."""
        watch = EventWatch(self, names)
        self._watches.append(watch)
        return watch

    async def __aenter__(self) -> "Qmp":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- commands ------------------------------------------------------------------------
    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None, timeout: float = 30.0):
        """Run one QMP command; QmpCommandFailed(error_class, desc) if QEMU refuses it."""
        from qemu.qmp import ExecuteError

        try:
            return await asyncio.wait_for(self._client.execute(cmd, args), timeout=timeout)
        except ExecuteError as exc:
            raise QmpCommandFailed(
                f"QEMU refused {cmd}: {exc.error_class}: {exc}",
                command=cmd,
                error_class=exc.error_class,
                desc=str(exc),
            ) from exc
        except asyncio.TimeoutError as exc:
            raise QmpUnreachable(
                f"QMP command {cmd} on {self.socket_path} got no answer within {timeout:g} s; "
                "QEMU may be hung or busy"
            ) from exc
        except Exception as exc:  # ExecInterruptedError, EOFError, OSError…
            raise QmpUnreachable(
                f"QMP connection {self.socket_path} broke during {cmd}: "
                f"{type(exc).__name__}: {exc}; QEMU may have exited"
            ) from exc

    async def add_fd(self, fd: int, fdset_id: int, opaque: str | None = None, timeout: float = 10.0) -> dict:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) and put it in fdset ``fdset_id`` (``/dev/fdset/N``).

        Returns QEMU's answer ``{"fdset-id": N, "fd": M}``; M is QEMU's fd number."""
        try:
            self._client.send_fd_scm(fd)
        except Exception as exc:
            raise QmpUnreachable(f"cannot pass fd {fd} over {self.socket_path}: {exc}") from exc
        args: dict[str, Any] = {"fdset-id": int(fdset_id)}
        if opaque is not None:
            args["opaque"] = opaque
        return await self.execute("add-fd", args, timeout=timeout)

    async def status(self, timeout: float = 10.0) -> str:
        """QEMU's run state: ``running``, ``paused``, ``postmigrate``, ``inmigrate``…"""
        answer = await self.execute("query-status", timeout=timeout)
        return str(answer["status"])

    async def stop(self, timeout: float = 10.0) -> None:
        await self.execute("stop", timeout=timeout)

    async def cont(self, timeout: float = 10.0) -> None:
        await self.execute("cont", timeout=timeout)

    async def version(self, timeout: float = 10.0) -> str:
        """QEMU's version as MAJOR.MINOR.MICRO (query-version)."""
        q = (await self.execute("query-version", timeout=timeout)).get("qemu", {})
        return f"{q.get('major')}.{q.get('minor')}.{q.get('micro')}"

    async def free_fdset(self, base: int) -> int:
        """The lowest fdset id >= ``base`` that this QEMU does not use yet."""
        used = {fs.get("fdset-id") for fs in await self.execute("query-fdsets")}
        n = base
        while n in used:
            n += 1
        return n

    async def quit(self, timeout: float = 10.0) -> None:
        """Ask QEMU to exit; the connection dropping while it does so is success."""
        with contextlib.suppress(QmpUnreachable):
            await self.execute("quit", timeout=timeout)


class EventWatch:
    """QMP events of some names on one connection, in arrival order (qemu.qmp EventListener)."""

    def __init__(self, qmp: Qmp, names: tuple[str, ...]):
        from qemu.qmp import EventListener

        self._qmp = qmp
        self.names = names
        self._listener = EventListener(list(names))
        qmp._client.register_listener(self._listener)
        self._closed = False

    async def wait(self, name: str, timeout: float, match: Mapping[str, Any] | None = None) -> dict:
        """The next ``name`` event (whose data contains ``match``, if given) as a dict; earlier
        events of other names are dropped. QmpUnreachable if none comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise asyncio.TimeoutError
                msg = await asyncio.wait_for(self._listener.get(), timeout=remaining)
            except asyncio.TimeoutError:
                raise QmpUnreachable(
                    f"no {name} event from {self._qmp.socket_path} within {timeout:g} s"
                    f"{f' (with {dict(match)})' if match else ''}; QEMU may have exited or hung"
                ) from None
            event = dict(msg)
            data = event.get("data") or {}
            if event.get("event") == name and all(data.get(k) == v for k, v in (match or {}).items()):
                return event

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._qmp._client.remove_listener(self._listener)
            with contextlib.suppress(ValueError):
                self._qmp._watches.remove(self)


def event_time_ns(event: Mapping[str, Any]) -> int:
    """When QEMU emitted ``event``, from its own timestamp (host realtime clock, microseconds)."""
    ts = event.get("timestamp") or {}
    return int(ts.get("seconds", 0)) * 1_000_000_000 + int(ts.get("microseconds", 0)) * 1_000


async def _quiet_disconnect(client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.disconnect(), timeout=5)


def run_sync(coro):
    """Run a coroutine to completion from synchronous code (CLI, tests)."""
    return asyncio.run(coro)
