"""QEMU command-line adapter for a second QEMU started beside a running one on the same guest:
rewrite what two processes cannot share (QMP socket, pidfile, serial files) and refuse fds it cannot carry.

Pure functions over argv lists; which paths to move when is the caller's policy (workflows/upgrade.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from luoagent.errors import UsageError

_FD_OPT_RE = re.compile(r"(?:^|,)(fd|fds|vhostfd|vhostfds)=")
_MEM_FD_RE = re.compile(r"(?:^|,)mem-path=/proc/self/fd/(\d+)(?:,|$)")


#: the options whose value beside() reads (every other token is copied unchanged)
_WITH_VALUE = {"-machine", "-add-fd", "-qmp", "-monitor", "-serial", "-parallel", "-chardev", "-pidfile",
               "-netdev", "-net", "-device", "-object", "-drive", "-blockdev"}


@dataclass
class BesideArgv:
    """The argv for the second QEMU, and the paths to move once the first one has exited."""

    argv: list[str]
    qmp_socket: str                                  # where the second QEMU's QMP listens at first
    #: (path the second QEMU uses, path the first one used): rename each after the first exits,
    #: because its graceful exit unlinks the paths it created
    renames: list[tuple[str, str]] = field(default_factory=list)


#: what beside() appends to a path the new QEMU uses until the old one has exited
_SUFFIX_RE = re.compile(r"\.up-[0-9a-f]{8}$")


def temp_suffix() -> str:
    """A fresh suffix for beside() (matches _SUFFIX_RE, so a later upgrade recognises it)."""
    import secrets

    return "up-" + secrets.token_hex(4)


def _base(path: str) -> str:
    """``path`` without a suffix a previous upgrade added (its process still uses that name)."""
    return _SUFFIX_RE.sub("", path)


def _opts(value: str) -> list[str]:
    return value.split(",")


def _opt_value(value: str, key: str) -> str | None:
    for part in _opts(value):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


def _set_opt(value: str, key: str, new: str) -> str:
    parts = [p for p in _opts(value) if not p.startswith(key + "=")]
    return ",".join([*parts, f"{key}={new}"])


def _is_server(value: str) -> bool:
    return any(p in ("server", "server=on", "server=yes", "server=true") for p in _opts(value))


def beside(argv: list[str], *, qmp_socket: str, suffix: str, ram_fds: set[int],
           machine_type: str | None = None) -> BesideArgv:
    """Rewrite ``argv`` (a running QEMU's arguments after the binary) for a second QEMU that
    takes over its guest. ``qmp_socket``: the QMP socket the VM is known by (moved to the new
    process after the switch); ``suffix``: makes the temporary paths unique; ``ram_fds``: fd
    numbers the RAM memfds are inherited at; ``machine_type``: the resolved machine type of the
    running QEMU (e.g. ``pc-i440fx-11.1``), pinned so a newer binary's alias cannot differ.

    UsageError naming the option for what the second process cannot be given: inherited fds
    other than RAM (tap/vhost ``fd=``, ``-add-fd`` sets), vhost, other listening unix sockets."""
    out: list[str] = []
    renames: list[tuple[str, str]] = []
    new_qmp: str | None = None
    serial_n = 0
    i = 0
    while i < len(argv):
        arg = argv[i]
        val = argv[i + 1] if i + 1 < len(argv) else None
        key = "-" + arg.lstrip("-") if arg.startswith("-") else arg
        if key in ("-daemonize", "-S"):
            i += 1  # the new process is detached by luoagent and started paused on purpose
            continue
        if machine_type and key == "-machine" and val == f"type={machine_type}":
            i += 2  # pinned by a previous upgrade; pinned again below
            continue
        if key == "-incoming":
            i += 2  # a restored QEMU was started with -incoming; the new one gets its own
            continue
        if val is None or key not in _WITH_VALUE:
            # an option this rewrite does not look at (or its value): passed through as is
            out.append(arg)
            i += 1
            continue
        if key == "-add-fd":
            raise UsageError(
                f"QEMU option -add-fd {val}: fdsets are not carried to a new QEMU process; start the "
                "VM without -add-fd (RAM via mem-path=/proc/self/fd/N) to upgrade it")
        if key in ("-qmp", "-monitor", "-serial", "-parallel") and val.startswith("unix:"):
            path = _opts(val[len("unix:"):])[0]
            if key == "-qmp" and _base(path) == qmp_socket:
                new_qmp = f"{qmp_socket}.{suffix}"
                renames.append((new_qmp, qmp_socket))
                out += [arg, "unix:" + new_qmp + val[len("unix:") + len(path):]]
                i += 2
                continue
            if _is_server(val):
                raise UsageError(
                    f"QEMU option {arg} {val}: a second listening unix socket would be taken over by "
                    "the new QEMU and removed when the old one exits; only the VM's QMP socket "
                    f"({qmp_socket}) is moved")
        if key == "-chardev":
            backend = _opts(val)[0]
            if backend == "socket" and _opt_value(val, "path") and _is_server(val):
                path = _opt_value(val, "path") or ""
                if _base(path) != qmp_socket:
                    raise UsageError(
                        f"QEMU option -chardev {val}: a listening unix socket other than the VM's "
                        f"QMP socket ({qmp_socket}) cannot be handed to the new QEMU")
                new_qmp = f"{qmp_socket}.{suffix}"
                renames.append((new_qmp, qmp_socket))
                val = _set_opt(val, "path", new_qmp)
            elif backend == "file" and _opt_value(val, "append") not in ("on", "yes", "true"):
                val = _set_opt(val, "append", "on")  # QEMU truncates a file chardev otherwise
        if key == "-pidfile":
            tmp = f"{_base(val)}.{suffix}"
            renames.append((tmp, _base(val)))
            out += [arg, tmp]
            i += 2
            continue
        if key in ("-serial", "-parallel") and val.startswith("file:"):
            # `-serial file:P` opens P with O_TRUNC: keep the log by appending instead
            cid = f"luoagent-{key[1:]}{serial_n}"
            serial_n += 1
            out += ["-chardev", f"file,id={cid},path={val[len('file:'):]},append=on", arg, f"chardev:{cid}"]
            i += 2
            continue
        if key in ("-netdev", "-net", "-chardev", "-device", "-object", "-drive", "-blockdev"):
            m = _FD_OPT_RE.search(val)
            if m and not (key == "-object" and _MEM_FD_RE.search(val)):
                raise UsageError(
                    f"QEMU option {arg} {val}: {m.group(1)}= names an fd inherited by the running "
                    "QEMU, which a new QEMU process cannot be given; use a path or ifname instead")
            if re.search(r"(?:^|,)vhost=(on|yes|true)(?:,|$)", val):
                raise UsageError(
                    f"QEMU option {arg} {val}: a vhost device belongs to the process that opened it "
                    "and is not handed over; use vhost=off to upgrade this VM")
            m = _MEM_FD_RE.search(val)
            if key == "-object" and m and int(m.group(1)) not in ram_fds:
                raise UsageError(
                    f"QEMU option -object {val}: fd {m.group(1)} is not one of the VM's RAM memfds")
        out += [arg, val]
        i += 2
    if new_qmp is None:
        raise UsageError(
            f"the VM's QMP socket {qmp_socket} is not a `-qmp unix:PATH,server=on` or "
            "`-chardev socket,path=PATH,server=on` option of its QEMU; cannot move it to the new one")
    if machine_type:
        out += ["-machine", f"type={machine_type}"]
    return BesideArgv(out, new_qmp, renames)
