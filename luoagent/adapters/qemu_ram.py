"""QEMU RAM adapter: which memory backends a running QEMU has and whether each is a memfd LUO
can keep in place, plus the command-line pieces that put guest RAM on a memfd.

Reads QOM over QMP and the fds through /proc/PID/fd; builds and rewrites `-object` arguments."""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass

from luoagent.adapters.qmp_client import Qmp
from luoagent.errors import RestoreError, UsageError, VmNotPreservable

#: QOM type prefix of every host-memory backend object
MEMORY_BACKEND_PREFIX = "memory-backend"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int) -> int:
    """Parse ``"512M"``/``"2G"``/``"1048576"`` (binary units, like QEMU's -m) into bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"cannot parse size {text!r}: use a number with an optional K/M/G/T suffix")
    value = int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())
    if value <= 0:
        raise UsageError(f"size {text!r} must be greater than zero")
    return value


def ram_backend_args(
    backend_id: str,
    size: int,
    fd: int | None = None,
    *,
    fdset: int | None = None,
    machine_backend: bool = True,
) -> list[str]:
    """argv for a share=on memory-backend-file over a memfd QEMU inherits at ``fd``.

    ``fdset``: use ``mem-path=/dev/fdset/N`` instead (only when probe_cpr said
    fdset_mem_backend; QEMU 11.1.3 opens mem-path with plain open() and refuses it)."""
    if (fd is None) == (fdset is None):
        raise ValueError("give exactly one of fd or fdset")
    mem_path = f"/dev/fdset/{fdset}" if fdset is not None else f"/proc/self/fd/{fd}"
    args = ["-object", f"memory-backend-file,id={backend_id},size={int(size)},mem-path={mem_path},share=on"]
    if machine_backend:
        args += ["-machine", f"memory-backend={backend_id}"]
    return args


@dataclass(frozen=True)
class RamBackend:
    """One memory-backend object of a running QEMU and the fd (in QEMU) behind it."""

    id: str
    size: int
    share: bool
    mem_path: str | None
    qemu_fd: int | None
    qom_type: str = "memory-backend-file"
    #: readlink of /proc/PID/fd/qemu_fd, e.g. "/memfd:luoagent-vm-a (deleted)"
    target: str | None = None
    #: why it cannot be kept in place (None: it can)
    problem: str | None = None


_FD_PATH_RE = re.compile(r"^/(?:proc/self/fd|dev/fd)/(\d+)$")
_FDSET_PATH_RE = re.compile(r"^/dev/fdset/(\d+)$")


async def inspect_ram(pid: int, qmp: Qmp) -> list[RamBackend]:
    """Every memory backend of the QEMU at ``pid``, each with ``problem`` set if it would be
    copied by cpr-reboot (sorted by id, so token order is stable)."""
    children = await qmp.execute("qom-list", {"path": "/objects"})
    found: list[RamBackend] = []
    fdsets: list | None = None
    for child in children:
        ctype = str(child.get("type", ""))
        m = re.match(r"^child<(.+)>$", ctype)
        if not m or not m.group(1).startswith(MEMORY_BACKEND_PREFIX):
            continue
        qom_type, bid = m.group(1), child["name"]
        path = f"/objects/{bid}"
        size = int(await qmp.execute("qom-get", {"path": path, "property": "size"}))
        share = bool(await qmp.execute("qom-get", {"path": path, "property": "share"}))
        mem_path = None
        if qom_type == "memory-backend-file":
            mem_path = str(await qmp.execute("qom-get", {"path": path, "property": "mem-path"}))
        qemu_fd = target = problem = None
        if qom_type == "memory-backend-ram":
            problem = "memory-backend-ram is private anonymous memory: cpr-reboot would copy it"
        elif qom_type == "memory-backend-memfd":
            problem = (
                "memory-backend-memfd RAM is still copied by x-ignore-shared (it only skips "
                "share=on memory-backend-file); use memory-backend-file,mem-path=/proc/self/fd/N"
            )
        elif qom_type != "memory-backend-file":
            problem = f"{qom_type} is not supported; use memory-backend-file over a memfd"
        elif not share:
            problem = "share=off: QEMU maps the file privately, its RAM would be copied"
        else:
            if _FDSET_PATH_RE.match(mem_path or "") and fdsets is None:
                fdsets = await qmp.execute("query-fdsets")
            qemu_fd, problem = _resolve_mem_path(mem_path or "", fdsets or [])
            if qemu_fd is not None:
                target, problem = _check_memfd(pid, qemu_fd)
        found.append(RamBackend(bid, size, share, mem_path, qemu_fd, qom_type, target, problem))
    return sorted(found, key=lambda b: b.id)


def _resolve_mem_path(mem_path: str, fdsets: list) -> tuple[int | None, str | None]:
    """Which fd number inside QEMU a mem-path names: /proc/self/fd/N, /dev/fd/N, /dev/fdset/N."""
    m = _FD_PATH_RE.match(mem_path)
    if m:
        return int(m.group(1)), None
    m = _FDSET_PATH_RE.match(mem_path)
    if m:
        for fs in fdsets:
            if fs.get("fdset-id") == int(m.group(1)) and fs.get("fds"):
                return int(fs["fds"][0]["fd"]), None
        return None, f"mem-path {mem_path}: no such fdset in QEMU"
    return None, (
        f"mem-path {mem_path!r} is a path, not a memfd QEMU holds: its RAM could not be "
        "preserved by LUO; start QEMU with mem-path=/proc/self/fd/N over a memfd"
    )


def _check_memfd(pid: int, qemu_fd: int) -> tuple[str | None, str | None]:
    """Is fd ``qemu_fd`` of ``pid`` a file LUO can preserve: an unlinked shmem file (memfd)?

    The link name is no proof: a memfd retrieved from LUO is re-created nameless and reads
    as "/ (deleted)", so this checks what the kernel's memfd handler checks: shmem (seals
    can be queried) and no links left."""
    link = f"/proc/{pid}/fd/{qemu_fd}"
    try:
        target = os.readlink(link)
        st = os.stat(link)
        vfs = os.statvfs(link)
    except OSError as exc:
        return None, f"cannot inspect {link}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return target, f"fd {qemu_fd} in QEMU is {target!r}, not a regular memfd"
    if st.st_nlink != 0:
        return target, f"fd {qemu_fd} in QEMU is {target!r}, a linked file, not a memfd"
    try:
        probe_fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return target, f"cannot open {link} to check it is a memfd: {exc.strerror}"
    try:
        fcntl.fcntl(probe_fd, fcntl.F_GET_SEALS)
    except OSError:
        return target, f"fd {qemu_fd} in QEMU is {target!r}, a deleted file but not shmem (not a memfd)"
    finally:
        os.close(probe_fd)
    # hugetlbfs reports its huge page size as the block size; LUO refuses MFD_HUGETLB
    if vfs.f_bsize > os.sysconf("SC_PAGE_SIZE"):
        return target, "hugetlb memfd: LUO cannot preserve MFD_HUGETLB memfds"
    return target, None


async def ram_backends(pid: int, qmp: Qmp) -> list[RamBackend]:
    """The RAM backends of the QEMU at ``pid``; VmNotPreservable (naming each problem) if
    any would be copied, or if the VM has no memory backend at all."""
    backends = await inspect_ram(pid, qmp)
    bad = [b for b in backends if b.problem]
    if bad:
        raise VmNotPreservable(
            "VM RAM cannot stay in place: "
            + "; ".join(f"backend {b.id!r}: {b.problem}" for b in bad)
        )
    if not backends:
        raise VmNotPreservable(
            "VM has no memory-backend object: its RAM is private and would be copied; start "
            "it with -object memory-backend-file,...,share=on -machine memory-backend=ID"
        )
    return backends


async def ramblocks(q: Qmp) -> dict[str, int]:
    """RAM block name -> used bytes, from HMP `info ramblock` (QMP has no equivalent)."""
    text = await q.execute("human-monitor-command", {"command-line": "info ramblock"})
    blocks: dict[str, int] = {}
    for line in str(text).splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[3].startswith("0x") and parts[4].startswith("0x"):
            blocks[parts[0]] = int(parts[4], 16)
    return blocks


def _split_opts(value: str) -> list[str]:
    """Split a QEMU option string on ',' (',,' is an escaped comma)."""
    parts, cur, i = [], [], 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if i + 1 < len(value) and value[i + 1] == ",":
                cur.append(",,")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _rewrite_object(value: str, mem_paths: dict[str, str], found: set[str]) -> str:
    if value.lstrip().startswith("{"):
        try:
            obj = json.loads(value)
        except ValueError:
            return value
        if obj.get("qom-type") == "memory-backend-file" and obj.get("id") in mem_paths:
            obj["mem-path"] = mem_paths[obj["id"]]
            found.add(obj["id"])
            return json.dumps(obj)
        return value
    parts = _split_opts(value)
    kv = {p.split("=", 1)[0]: i for i, p in enumerate(parts) if "=" in p}
    qom_type = parts[0] if "=" not in parts[0] else parts[0].split("=", 1)[1] if parts[0].startswith("qom-type=") else ""
    ident = parts[kv["id"]].split("=", 1)[1] if "id" in kv else None
    if qom_type != "memory-backend-file" or ident not in mem_paths:
        return value
    found.add(ident)
    new = f"mem-path={mem_paths[ident]}"
    if "mem-path" in kv:
        parts[kv["mem-path"]] = new
    else:
        parts.append(new)
    return ",".join(parts)


def restore_argv(argv: list[str], mem_paths: dict[str, str]) -> list[str]:
    """The recorded QEMU argv with each RAM backend's mem-path replaced, -daemonize and any
    -incoming dropped, and ``-incoming defer`` appended."""
    out: list[str] = []
    found: set[str] = set()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-daemonize", "--daemonize"):
            i += 1
            continue
        if a in ("-incoming", "--incoming", "-add-fd", "--add-fd") and i + 1 < len(argv):
            # -add-fd names fds the old QEMU inherited; RAM now comes from /proc/self/fd/N
            i += 2
            continue
        if a in ("-object", "--object") and i + 1 < len(argv):
            out += [a, _rewrite_object(argv[i + 1], mem_paths, found)]
            i += 2
            continue
        out.append(a)
        i += 1
    missing = sorted(set(mem_paths) - found)
    if missing:
        raise RestoreError(
            f"the recorded QEMU argv has no memory-backend-file object for RAM backend(s) {', '.join(missing)}; "
            "cannot tell QEMU where that RAM is"
        )
    return out + ["-incoming", "defer"]
