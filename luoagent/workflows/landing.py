"""Landing-side preflight of `luoagent update`: proves, before any VM is stopped, that the new
kernel and the new boot can take the VMs back — or refuses with every reason at once.

Checks (docs/architecture.md "Landing-side preflight"): the target image's LUO options and
ABI strings against the running kernel's; the new command line keeps liveupdate and KHO on;
each VM's argv can be rebuilt for restore and holds nothing that cannot cross a kexec, its
machine type pinned to the resolved version; every QEMU and VM that is not carried is named
with --allow-loss; MemAvailable covers the RAM holes that preserving fills."""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from luoagent.adapters import kimage, qemu_ram
from luoagent.errors import LuoAgentError, PreflightRefused
from luoagent.log import get_logger

log = get_logger(__name__)

#: options the landing kernel needs to take LUO sessions back (kernel/liveupdate/Kconfig)
REQUIRED_OPTIONS = ("KEXEC_HANDOVER", "LIVEUPDATE", "LIVEUPDATE_MEMFD")
RUNNING_CONFIG = Path("/proc/config.gz")
#: filesystems whose contents are gone after a reboot
VOLATILE_FS = {"tmpfs", "ramfs", "devtmpfs"}


@dataclass
class Verdict:
    """What the preflight found: ``problems`` refuse the update, ``notes`` are reported."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def refuse(self, text: str) -> None:
        self.problems.append(text)


# ---------------------------------------------------------------------------------------
# the kernel: configuration and LUO ABI
# ---------------------------------------------------------------------------------------
def running_identity() -> tuple[str, str]:
    u = os.uname()
    return u.release, u.version


def is_running_build(header_version: str, identity: tuple[str, str] | None = None) -> bool:
    """Is a bzImage whose header says ``header_version`` ("7.2.13 (u@h) #1 SMP ...") the very
    build that is running (same release and the same `uname -v` build stamp)?"""
    release, version = identity or running_identity()
    return bool(header_version) and header_version.startswith(release + " ") and header_version.endswith(version)


def _running_config() -> dict[str, str] | None:
    try:
        return kimage.parse_config(gzip.decompress(RUNNING_CONFIG.read_bytes()).decode(errors="replace"))
    except (OSError, EOFError):
        return None


def _image_config(img: kimage.KernelImage, release: str) -> tuple[dict[str, str] | None, str]:
    if img.config is not None:
        return img.config, "embedded IKCONFIG"
    beside = kimage.config_beside(img.path, release)
    if beside:
        return beside[1], str(beside[0])
    return None, ""


def _release_of(header_version: str) -> str:
    return header_version.split(" ", 1)[0] if header_version else ""


def check_kernel(kernel: Path, header_version: str, running_image: Path | None, allow_unverified: bool,
                 verdict: Verdict, identity: tuple[str, str] | None = None) -> dict[str, str] | None:
    """Configuration and ABI of the landing kernel; returns its configuration (None: unknown)."""
    identity = identity or running_identity()
    release = _release_of(header_version)
    override = " (or pass --allow-unverified-kernel to go ahead without this proof)"
    if is_running_build(header_version, identity):
        # the image is the running build itself: its ABI is the running kernel's by definition,
        # and /proc/config.gz (IKCONFIG_PROC) is that build's own configuration
        config, source, problem = _running_config(), str(RUNNING_CONFIG), ""
        if config is None:
            target = kimage.inspect(kernel)
            config, source = _image_config(target, release)
            problem = target.problem
        verdict.notes.append(f"target {kernel} is the running build ({identity[0]}): same LUO ABI")
    else:
        target = kimage.inspect(kernel)
        config, source = _image_config(target, release)
        problem = target.problem
        _check_abi(kernel, target, running_image, identity, allow_unverified, verdict)
    if config is None:
        text = (f"cannot read the configuration of {kernel}: no embedded IKCONFIG "
                f"({problem or 'CONFIG_IKCONFIG not set'}) and no config-{release or 'RELEASE'} "
                "or config beside it; put the kernel's .config beside the image as "
                f"config-{release or 'RELEASE'}{override}")
        if allow_unverified:
            verdict.notes.append("UNVERIFIED: " + text)
        else:
            verdict.refuse(text)
        return None
    missing = [o for o in REQUIRED_OPTIONS if config.get(o) != "y"]
    if missing:
        verdict.refuse(f"{kernel} cannot receive the VMs: its configuration ({source}) lacks "
                       + ", ".join(f"CONFIG_{o}=y (has {config.get(o, 'unset')})" for o in missing)
                       + "; rebuild it with those options (see `luoagent doctor`)")
    else:
        verdict.notes.append(f"target configuration ({source}): " + ", ".join(f"CONFIG_{o}=y" for o in REQUIRED_OPTIONS))
    return config


def _check_abi(kernel: Path, target: kimage.KernelImage, running_image: Path | None,
               identity: tuple[str, str], allow_unverified: bool, verdict: Verdict) -> None:
    release, version = identity
    override = "; pass --allow-unverified-kernel to go ahead without this proof"
    running: kimage.KernelImage | None = None
    why_unknown = ""
    candidates = [running_image] if running_image else [Path(f"/boot/vmlinuz-{release}")]
    for cand in candidates:
        if not cand.is_file():
            why_unknown = f"{cand} does not exist"
            continue
        from luoagent.adapters import kexec  # the header reader lives with the loader

        try:
            header = kexec.bzimage_version(cand)
        except LuoAgentError as exc:
            why_unknown = str(exc)
            continue
        if not is_running_build(header, identity):
            why_unknown = (f"{cand} is not the running kernel (its header says {header!r}, "
                           f"running {release} {version})")
            continue
        running = kimage.inspect(cand)
        if running.problem:
            why_unknown = f"{cand}: {running.problem}"
            running = None
    if target.problem:
        text = f"cannot read the LUO ABI strings of {kernel}: {target.problem}{override}"
        (verdict.notes.append("UNVERIFIED: " + text) if allow_unverified else verdict.refuse(text))
        return
    if running is None:
        text = (f"cannot read the running kernel's LUO ABI strings ({why_unknown}); name the running "
                f"kernel's image with --running-kernel BZIMAGE{override}")
        (verdict.notes.append("UNVERIFIED: " + text) if allow_unverified else verdict.refuse(text))
        return
    for prefix in kimage.ABI_PREFIXES:
        have, want = target.abi.get(prefix), running.abi.get(prefix)
        if prefix in target.ambiguous or prefix in running.ambiguous:
            text = (f"ambiguous {prefix} ABI strings (target {target.ambiguous.get(prefix, have)}, "
                    f"running {running.ambiguous.get(prefix, want)}){override}")
            (verdict.notes.append("UNVERIFIED: " + text) if allow_unverified else verdict.refuse(text))
        elif want is None:
            text = f"the running kernel has no {prefix}-vN ABI string: it cannot preserve for LUO{override}"
            (verdict.notes.append("UNVERIFIED: " + text) if allow_unverified else verdict.refuse(text))
        elif have != want:
            # no override: the new kernel would refuse (or panic on) data it does not understand
            verdict.refuse(f"LUO ABI mismatch: the running kernel writes {want}, {kernel} reads "
                           f"{have or f'no {prefix}-vN at all'}; the new kernel would drop the sessions or "
                           "panic. Choose a kernel built with the same ABI")
    if not verdict.problems:
        verdict.notes.append("LUO ABI identical: " + ", ".join(target.abi[p] for p in kimage.ABI_PREFIXES if p in target.abi))


# ---------------------------------------------------------------------------------------
# the new command line
# ---------------------------------------------------------------------------------------
def _kstrtobool(value: str | None) -> bool | None:
    """The kernel's kstrtobool (lib/kstrtox.c): y/Y/t/T/1, on -> True; n/N/f/F/0, off -> False."""
    if not value:
        return None
    if value[0] in "yYtT1":
        return True
    if value[0] in "nNfF0":
        return False
    if value[:2].lower() == "on":
        return True
    if value[:2].lower() == "of":
        return False
    return None


def _last_param(cmdline: str, name: str) -> str | None:
    value = None
    for word in cmdline.split():
        if word.split("=", 1)[0] == name:
            value = word.split("=", 1)[1] if "=" in word else ""
    return value


def check_cmdline(cmdline: str, config: dict[str, str] | None, verdict: Verdict) -> None:
    """The new kernel's command line must keep LUO (liveupdate=on) and KHO on."""
    if _kstrtobool(_last_param(cmdline, "liveupdate")) is not True:
        verdict.refuse(f"the new command line does not turn LUO on (needs liveupdate=on): {cmdline!r}; "
                       "add liveupdate=on to --append (or boot the running kernel with it for --reuse-cmdline)")
    kho = _kstrtobool(_last_param(cmdline, "kho"))
    default_on = (config or {}).get("KEXEC_HANDOVER_ENABLE_DEFAULT") == "y"
    if kho is False or (kho is None and not default_on):
        verdict.refuse(f"the new command line leaves KHO off ({'kho=off' if kho is False else 'no kho=on'}"
                       f"{', and the image lacks CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT' if kho is None else ''}): "
                       f"{cmdline!r}; the new kernel would disable LUO. Add kho=on")


# ---------------------------------------------------------------------------------------
# each VM's command line
# ---------------------------------------------------------------------------------------
_PATH_OPTS = {"-kernel", "-initrd", "-bios", "-dtb", "-pflash", "-L", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom"}
#: key=value options that take a file the new QEMU reads again
_PATH_KEYS = {"file", "filename", "path", "mem-path", "script", "downscript"}
_FD_KEY_RE = re.compile(r"(?:^|,)((?:vhost)?fds?|vhostfds?)=([^,]+)")
_FD_PATH_RE = re.compile(r"/(?:proc/self/fd|dev/fd|dev/fdset)/\d+")
_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]*:(?!/*$)")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, fs type), longest mount point first (/proc/self/mountinfo)."""
    out = []
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            point = left.split()[4].replace("\\040", " ")
            out.append((point, right.split()[0]))
    except (OSError, IndexError):
        return []
    return sorted(out, key=lambda m: len(m[0]), reverse=True)


def fs_type(path: str, mounts: list[tuple[str, str]] | None = None) -> str:
    real = os.path.realpath(path)
    for point, kind in mounts if mounts is not None else _mounts():
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return kind
    return ""


def _split_keyval(value: str) -> list[tuple[str, str]]:
    out = []
    for part in qemu_ram._split_opts(value):
        key, eq, val = part.partition("=")
        out.append((key, val) if eq else ("", key))
    return out


def argv_problems(argv: list[str], ram_ids: list[str], mounts: list[tuple[str, str]] | None = None) -> list[str]:
    """What in a recorded QEMU argv cannot be rebuilt after a kexec. Runs the same rewrite
    restore runs (qemu_ram.restore_argv) and names every fd-passed device, relative path and
    input file on a filesystem that is empty after the reboot."""
    problems: list[str] = []
    try:
        rebuilt = qemu_ram.restore_argv(argv, {i: f"/proc/self/fd/{1000 + n}" for n, i in enumerate(ram_ids)})
    except LuoAgentError as exc:
        return [f"restore could not rebuild the argv: {exc}"]
    mounts = _mounts() if mounts is None else mounts
    for i, a in enumerate(argv):
        if a in ("-add-fd", "--add-fd"):
            problems.append(f"`-add-fd {argv[i + 1] if i + 1 < len(argv) else ''}`: an inherited fd; restore "
                            "cannot pass it to the new QEMU (only RAM memfds cross)")
    for i, a in enumerate(rebuilt[:-1]):
        value = rebuilt[i + 1]
        if not a.startswith("-") or value.startswith("-") and a not in _PATH_OPTS:
            continue
        is_ram = a in ("-object", "--object") and any(f"id={r}" in value for r in ram_ids)
        if not is_ram:
            fds = [f"{m.group(1)}={m.group(2)}" for m in _FD_KEY_RE.finditer(value)]
            if fds:
                problems.append(f"`{a} {value}`: {', '.join(fds)} name fds of this QEMU process; they do "
                                "not exist after the kexec: name the device by path or ifname instead")
            elif _FD_PATH_RE.search(value):
                problems.append(f"`{a} {value}`: names an fd of this QEMU process ({_FD_PATH_RE.search(value).group(0)}); "
                                "it does not exist after the kexec")
        paths: list[tuple[str, bool]] = []  # (path, read back by the new QEMU)
        if a in _PATH_OPTS:
            paths.append((value, True))
        elif a in ("-serial", "--serial", "-chardev", "-qmp", "-monitor") and ("file:" in value or "unix:" in value):
            paths.append((value.split(":", 1)[1].split(",", 1)[0], False))
        elif a in ("-pidfile", "-D"):
            paths.append((value, False))
        elif a.lstrip("-") in ("drive", "blockdev", "chardev", "netdev", "object", "device", "fsdev", "virtfs") and not is_ram:
            for key, val in _split_keyval(value):
                if key in _PATH_KEYS and val and not val.startswith("/proc/self/fd/") and val not in ("no", ""):
                    paths.append((val, a.lstrip("-") in ("drive", "blockdev", "fsdev", "virtfs")))
        for path, is_input in paths:
            if _URL_RE.match(path):
                continue  # a network or protocol source (nbd:, rbd:, iscsi://...), not a local file
            if not path.startswith("/"):
                problems.append(f"`{a} {value}`: relative path {path!r}; restore starts QEMU in another "
                                "directory: give an absolute path")
            elif is_input and fs_type(path, mounts) in VOLATILE_FS:
                problems.append(f"`{a} {value}`: {path} is on {fs_type(path, mounts)}, which is empty after the "
                                "reboot: move it to a persistent filesystem")
    return problems


def machine_type(argv: list[str]) -> tuple[int, int, str] | None:
    """(argv index, option index, type) of the machine type named in -machine/-M, or None."""
    found = None
    for i, a in enumerate(argv[:-1]):
        if a in ("-machine", "--machine", "-M"):
            for j, (key, val) in enumerate(_split_keyval(argv[i + 1])):
                if (key == "" and j == 0) or key == "type":
                    found = (i + 1, j, val)
    return found


def pin_machine(argv: list[str], resolved: str) -> tuple[list[str], str]:
    """argv with its machine type replaced by ``resolved`` (e.g. pc -> pc-i440fx-11.1), so a
    different QEMU after the kexec builds the same machine; returns (argv, what it said before)."""
    out = list(argv)
    where = machine_type(out)
    if where is None:
        return ["-machine", f"type={resolved}", *out], "(default)"
    i, j, old = where
    parts = qemu_ram._split_opts(out[i])
    parts[j] = f"type={resolved}" if parts[j].startswith("type=") else resolved
    out[i] = ",".join(parts)
    return out, old


async def resolved_machine(qmp) -> str:
    """The versioned machine type a running QEMU built: QOM /machine's type without '-machine'."""
    qom_type = str(await qmp.execute("qom-get", {"path": "/machine", "property": "type"}))
    return qom_type[: -len("-machine")] if qom_type.endswith("-machine") else qom_type


async def check_vm(w, verdict: Verdict) -> None:
    """One VM to carry: its argv is rebuildable and crossable; pins its machine type in place
    (``w.target.argv`` is what the manifest records)."""
    for p in argv_problems(w.target.argv, [b.id for b in w.backends]):
        verdict.refuse(f"VM {w.name}: {p}")
    resolved = await resolved_machine(w.qmp)
    pinned, before = pin_machine(w.target.argv, resolved)
    if before != resolved:
        w.target.argv = pinned
        verdict.notes.append(f"{w.name}: machine {before} pinned to {resolved}")


# ---------------------------------------------------------------------------------------
# what is left behind
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Left:
    """A QEMU or a recorded VM that the update would not carry (it dies with the kexec)."""

    name: str
    pid: int
    what: str

    def names(self) -> set[str]:
        return {self.name, str(self.pid), f"pid {self.pid}", f"pid{self.pid}"}


def _qemu_name(args: list[str]) -> str:
    for i, a in enumerate(args[:-1]):
        if a in ("-name", "--name"):
            for key, val in _split_keyval(args[i + 1]):
                if key in ("", "guest"):
                    return val
    return ""


def host_qemus(proc: Path = Path("/proc")) -> list[tuple[int, str]]:
    """(pid, -name or '') of every qemu-system-* process this agent can see."""
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parts = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [p.decode(errors="replace") for p in parts if p]
        for k, p in enumerate(args[:6]):  # the binary, or behind a dynamic loader and its options
            if re.search(r"(^|/)qemu-system-[\w]+$", p):
                out.append((int(entry.name), _qemu_name(args[k + 1:])))
                break
    return sorted(out)


def left_behind(carried_pids: set[int], carried_names: set[str], recorded: list[tuple[str, int]],
                qemus: list[tuple[int, str]] | None) -> list[Left]:
    """Everything not carried: VM-root VMs whose QEMU is alive, and (unless ``qemus`` is None)
    every other QEMU process."""
    out: list[Left] = []
    seen: set[int] = set()
    for name, pid in recorded:
        if name in carried_names or pid in carried_pids:
            continue
        if pid and _alive(pid):
            out.append(Left(name, pid, "VM in the VM root"))
            seen.add(pid)
    for pid, name in qemus or []:
        if pid in carried_pids or pid in seen or pid == os.getpid():
            continue
        out.append(Left(name or f"pid {pid}", pid, "QEMU process"))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def check_losses(left: list[Left], allowed: list[str], verdict: Verdict) -> None:
    unnamed = [x for x in left if not (x.names() & set(allowed))]
    for x in left:
        if x not in unnamed:
            verdict.notes.append(f"allowed loss: {x.what} {x.name} (pid {x.pid}) stops with the kexec")
    if unnamed:
        verdict.refuse("these would be killed by the kexec and are not carried: "
                       + "; ".join(f"{x.what} {x.name} (pid {x.pid})" for x in unnamed)
                       + " — carry each with --vm, or accept losing it with --allow-loss NAME")


# ---------------------------------------------------------------------------------------
# memory headroom
# ---------------------------------------------------------------------------------------
def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable")


def hole_bytes(pid: int, qemu_fd: int, size: int) -> int:
    """Bytes of a RAM memfd not yet backed by pages (what preserving must allocate)."""
    st = os.stat(f"/proc/{pid}/fd/{qemu_fd}")
    return max(0, size - st.st_blocks * 512)


def check_headroom(work, verdict: Verdict, available: int | None = None) -> None:
    need = {}
    for w in work:
        need[w.name] = sum(hole_bytes(w.target.pid, b.qemu_fd, b.size) for b in w.backends)
    total = sum(need.values())
    available = mem_available() if available is None else available
    mib = 1 << 20
    detail = ", ".join(f"{n} {v / mib:.0f} MiB" for n, v in need.items())
    if total > available:
        verdict.refuse(f"not enough memory to preserve the VMs' RAM: preserving fills every hole of each RAM "
                       f"memfd, {total / mib:.0f} MiB ({detail}), but MemAvailable is {available / mib:.0f} MiB; "
                       "free memory or carry fewer VMs")
    else:
        verdict.notes.append(f"memory headroom: holes to fill {total / mib:.0f} MiB, MemAvailable {available / mib:.0f} MiB")


def raise_if_refused(verdict: Verdict) -> None:
    if verdict.problems:
        raise PreflightRefused(
            f"update refused before anything was stopped or preserved ({len(verdict.problems)} problem"
            f"{'s' if len(verdict.problems) > 1 else ''}):\n" + "\n".join(f"  - {p}" for p in verdict.problems),
            step="preflight",
        )


# ---------------------------------------------------------------------------------------
# all of it, for update's preflight
# ---------------------------------------------------------------------------------------
async def preflight(*, kernel: Path, header_version: str, cmdline: str, work: list, recorded: list[tuple[str, int]],
                    running_image: Path | None = None, allow_unverified: bool = False,
                    allow_loss: list[str] | None = None, scan_host: bool = True) -> Verdict:
    """Every landing-side check; PreflightRefused naming every problem, else the verdict's notes.
    ``work``: update's VmWork list (QMP connected, backends known); ``recorded``: (name, pid)
    of every VM in the VM root; ``scan_host``: also list every other QEMU process."""
    verdict = Verdict()
    config = check_kernel(kernel, header_version, running_image, allow_unverified, verdict)
    check_cmdline(cmdline, config, verdict)
    for w in work:
        await check_vm(w, verdict)
    left = left_behind({w.target.pid for w in work}, {w.name for w in work}, recorded,
                       host_qemus() if scan_host else None)
    check_losses(left, list(allow_loss or []), verdict)
    check_headroom(work, verdict)
    raise_if_refused(verdict)
    return verdict
