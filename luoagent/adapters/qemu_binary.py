"""QEMU binary adapter: find qemu-system-x86_64, read its version, launch and stop it, and probe
what it supports for a RAM-in-place live update (cpr-reboot, x-ignore-shared, fdset RAM).

No policy: it reports what a QEMU can do; workflows decide what to do."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from luoagent.adapters import private_files, procfs, systemctl
from luoagent.adapters.qmp_client import Qmp, run_sync
from luoagent.errors import QemuError, QemuNotFound, QmpCommandFailed, QmpUnreachable, UntrustedBinary

QEMU_ENV = "LUOAGENT_QEMU"
QEMU_BINARY_NAME = "qemu-system-x86_64"


def find_qemu(explicit: str | os.PathLike | None = None) -> Path:
    """Return the QEMU binary: ``explicit``, else ``$LUOAGENT_QEMU``, else PATH; QemuNotFound."""
    if explicit is not None:
        return _usable_binary(Path(explicit), "the path given")
    env = os.environ.get(QEMU_ENV)
    if env:
        return _usable_binary(Path(env), f"${QEMU_ENV}")
    found = shutil.which(QEMU_BINARY_NAME)
    if found:
        return Path(found)
    raise QemuNotFound(
        f"no {QEMU_BINARY_NAME} found: not on PATH and ${QEMU_ENV} is not set; "
        f"install QEMU >= 11.1, pass --qemu PATH, or set {QEMU_ENV} "
        "(the lab's wrapper: `luoagent lab build` prints it)"
    )


def _usable_binary(path: Path, origin: str) -> Path:
    if not path.exists():
        raise QemuNotFound(f"QEMU binary {path} ({origin}) does not exist")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise QemuNotFound(f"QEMU binary {path} ({origin}) is not an executable file")
    return path


_VERSION_RE = re.compile(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)")


def qemu_version(binary: str | os.PathLike) -> str:
    """Return QEMU's version string (e.g. ``"11.1.3"``) from ``BINARY --version``."""
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as exc:
        raise QemuNotFound(f"cannot run {binary} --version: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"{binary} --version did not answer within 30 s") from exc
    match = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or not match:
        raise QemuNotFound(
            f"{binary} --version failed (exit {out.returncode}): "
            f"{(out.stderr or out.stdout).strip()[:300]!r}; is it a qemu-system binary?"
        )
    return match.group(1)


def qmp_args(socket_path: str | os.PathLike) -> list[str]:
    return ["-qmp", f"unix:{socket_path},server=on,wait=off"]


def launch(
    binary: str | os.PathLike,
    argv: Sequence[str],
    pass_fds: Iterable[int] = (),
    qmp_socket: str | os.PathLike | None = None,
    log: str | os.PathLike | None = None,
    *,
    daemon: bool = False,
    fd_map: dict[int, int] | None = None,
    scope_unit: str | None = None,
    cwd: str | os.PathLike | None = None,
) -> subprocess.Popen:
    """Start ``binary argv...`` with ``pass_fds`` inherited at the same numbers.

    ``fd_map`` {number in QEMU: our fd}: inherit our fd at that exact number (a second QEMU
    on the same RAM needs the memfd where ``mem-path=/proc/self/fd/N`` points);
    ``qmp_socket`` adds ``-qmp unix:PATH,server=on,wait=off`` (a stale socket file is removed);
    ``log`` receives QEMU's stdout+stderr; ``daemon`` puts it in its own session so it
    outlives the caller; ``scope_unit`` runs it in that transient systemd scope (its own
    cgroup; `systemd-run --scope` execs QEMU itself, so the pid and the fds stay); ``cwd``: where
    relative paths in ``argv`` start (a daemon starting a VM for a client: the client's directory)."""
    prefix = systemctl.scope_prefix(scope_unit) if scope_unit else []
    if fd_map:
        with _placed_fds(fd_map) as (keep, preexec):
            return _launch(binary, argv, [*pass_fds, *keep], qmp_socket, log, daemon=daemon,
                           _preexec=preexec, prefix=prefix, cwd=cwd)
    return _launch(binary, argv, pass_fds, qmp_socket, log, daemon=daemon, prefix=prefix, cwd=cwd)


@contextlib.contextmanager
def _placed_fds(fd_map: dict[int, int]):
    """Arrange for each ``fd_map`` source to appear at its target number in the child.

    A free target number is filled here in the parent (so subprocess's own pipes cannot take
    it); an occupied one is overwritten in the child just before exec (preexec_fn runs before
    subprocess closes the fds not kept)."""
    opened: list[int] = []
    late: list[tuple[int, int]] = []
    try:
        for target, source in sorted(fd_map.items()):
            if target <= 2:
                raise QemuError(f"cannot place an inherited fd at number {target} (stdio)")
            try:
                os.fstat(target)
                in_use = True
            except OSError:
                in_use = False
            if in_use and target != source:
                late.append((os.dup(source), target))
                opened.append(late[-1][0])
            elif not in_use:
                os.dup2(source, target, inheritable=False)
                opened.append(target)

        def preexec() -> None:
            for source, target in late:
                os.dup2(source, target)

        yield list(fd_map), (preexec if late else None)
    finally:
        for fd in opened:
            with contextlib.suppress(OSError):
                os.close(fd)


def _launch(binary, argv, pass_fds, qmp_socket, log, *, daemon: bool, _preexec=None,
            prefix: Sequence[str] = (), cwd=None) -> subprocess.Popen:
    full = [*prefix, str(binary), *argv]
    if qmp_socket is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_socket)
        full += qmp_args(qmp_socket)
    out = os.fdopen(private_files.open_append(log), "ab") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            full,
            pass_fds=tuple(pass_fds),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            start_new_session=daemon,
            preexec_fn=_preexec,
            cwd=cwd,
            # what QEMU creates itself (serial log, pidfile, sockets) holds guest output: 0600
            umask=0o077,
        )
    except OSError as exc:
        raise QemuNotFound(f"cannot start {binary}: {exc}") from exc
    finally:
        if log is not None:
            out.close()


def kill_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a QEMU we started (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class CprProbe:
    """What a QEMU binary supports for a RAM-in-place live update."""

    cpr_reboot: bool
    x_ignore_shared: bool
    fdset_mem_backend: bool
    version: str
    details: dict = field(default_factory=dict)
    #: machine type names this binary knows (query-machines), e.g. "pc-i440fx-11.1"
    machines: tuple[str, ...] = ()
    #: migrate-set-parameters mode=cpr-transfer accepted
    cpr_transfer: bool = False

    @property
    def usable(self) -> bool:
        return self.cpr_reboot and self.x_ignore_shared


def probe_cpr(binary: str | os.PathLike, timeout: float = 30.0) -> CprProbe:
    """Start ``BINARY -machine none`` and ask it over QMP what cpr-reboot support it has."""
    version = qemu_version(binary)
    with tempfile.TemporaryDirectory(prefix="luoagent-probe-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        log = Path(tmp) / "qemu.log"
        proc = launch(
            binary,
            ["-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"],
            qmp_socket=sock,
            log=log,
        )
        try:
            return run_sync(_probe(proc, sock, version, timeout))
        except QmpUnreachable as exc:
            raise QemuError(f"probe of {binary} failed: {exc}; log: {log_tail(log)}") from exc
        finally:
            kill_process(proc)


async def _probe(proc: subprocess.Popen, sock: Path, version: str, timeout: float) -> CprProbe:
    details: dict[str, Any] = {}
    async with await Qmp.connect(sock, timeout=timeout, process=proc) as q:
        try:
            await q.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
            cpr_reboot = True
        except QmpCommandFailed as exc:
            cpr_reboot = False
            details["cpr_reboot_error"] = exc.desc
        try:
            await q.execute("migrate-set-parameters", {"mode": "cpr-transfer"})
            cpr_transfer = True
        except QmpCommandFailed as exc:
            cpr_transfer = False
            details["cpr_transfer_error"] = exc.desc
        machines = tuple(sorted(str(m["name"]) for m in await q.execute("query-machines")))
        caps = await q.execute("query-migrate-capabilities")
        names = {c["capability"] for c in caps}
        x_ignore_shared = "x-ignore-shared" in names
        details["capabilities"] = sorted(names)
        # Can RAM come from an fdset? Try it with a tiny memfd; QEMU 11.1.3 opens mem-path
        # with plain open(), so /dev/fdset/N is "No such file or directory" there.
        fd = os.memfd_create("luoagent-probe", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * 1024 * 1024)
            added = await q.add_fd(fd, 42)
            try:
                await q.execute(
                    "object-add",
                    {
                        "qom-type": "memory-backend-file",
                        "id": "luoagent-probe",
                        "size": 2 * 1024 * 1024,
                        "mem-path": f"/dev/fdset/{added['fdset-id']}",
                        "share": True,
                    },
                )
                fdset_mem_backend = True
                with contextlib.suppress(QmpCommandFailed):
                    await q.execute("object-del", {"id": "luoagent-probe"})
            except QmpCommandFailed as exc:
                fdset_mem_backend = False
                details["fdset_mem_backend_error"] = exc.desc
        finally:
            os.close(fd)
        await q.quit()
    return CprProbe(cpr_reboot, x_ignore_shared, fdset_mem_backend, version, details,
                    machines=machines, cpr_transfer=cpr_transfer)


def log_tail(path: Path, limit: int = 600) -> str:
    """The last ``limit`` characters of a QEMU log, quoted, for error messages."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return repr(text[-limit:]) if text else "(empty)"


def qemu_cmdline(pid: int) -> tuple[str, list[str]]:
    """(binary, QEMU arguments) of a running QEMU. The binary is what the kernel runs
    (/proc/PID/exe), never the process's own argv[0]; the arguments come from /proc/PID/cmdline
    (the process could rewrite them, but they only ever run again under its own identity).

    A QEMU run through the dynamic loader (the lab's host wrapper) has ld.so as its exe; the
    binary is then the qemu-system-* file the kernel has mapped executable into it."""
    try:
        exe = procfs.exe(pid)
        parts = procfs.argv(pid)
        if _is_loader(exe):
            mapped = [p for p in procfs.mapped_executables(pid) if _QEMU_NAME.search(p)]
            if not mapped:
                raise UntrustedBinary(
                    f"QEMU pid {pid} runs {exe} (a dynamic loader) but has no qemu-system-* binary mapped; "
                    "cannot tell which QEMU it is")
            exe = mapped[0]
    except OSError as exc:
        raise QmpUnreachable(f"QEMU pid {pid} vanished: {exc.strerror or exc}") from None
    for i, p in enumerate(parts):
        if _QEMU_NAME.search(p):
            return exe, parts[i + 1 :]
    return exe, parts[1:]


_QEMU_NAME = re.compile(r"qemu-system-[\w]+$")


def _is_loader(path: str) -> bool:
    return Path(path).name.startswith("ld-") and ".so" in Path(path).name


def check_trusted(binary: str | os.PathLike) -> Path:
    """The binary if only root can change it: a regular file (symlinks resolved) owned by root,
    not writable by group or others, in directories with the same properties. Otherwise
    UntrustedBinary: running it as root would run whatever its writer put there."""
    path = Path(os.path.realpath(binary))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UntrustedBinary(f"QEMU binary {binary}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UntrustedBinary(f"QEMU binary {binary} is not a regular file")
    for p in [path, *path.parents]:
        st = os.stat(p)
        writable = st.st_mode & 0o022 and not (p != path and st.st_mode & stat.S_ISVTX and st.st_uid == 0)
        if st.st_uid != 0 or writable:
            raise UntrustedBinary(
                f"QEMU binary {binary}: {p} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
                "luoagent only runs a QEMU that only root can change: install QEMU root-owned "
                "(e.g. the Debian package) or pass --qemu with such a binary")
    return path
