"""Workflow `luoagent doctor`: can this host do a live update, and what exactly to change if not.

Checks kernel release, config, command line, /dev/liveupdate, privileges and QEMU's CPR support."""

from __future__ import annotations

import gzip
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from luoagent import errors
from luoagent.adapters import qemu_binary
from luoagent.adapters.luo import DEVICE, LiveUpdate
from luoagent.log import get_logger

log = get_logger(__name__)

MIN_KERNEL = (6, 19)
CAP_SYS_BOOT = 22

# option -> (why it is needed, kallsyms symbol that exists only when it is built in)
KERNEL_OPTIONS = {
    "KEXEC_FILE": ("kexec_file_load(2), the only loader KHO works with", "kexec_locate_mem_hole"),
    "KEXEC_HANDOVER": ("Kexec HandOver carries preserved memory across kexec", "kho_preserve_folio"),
    "LIVEUPDATE": ("the Live Update Orchestrator (/dev/liveupdate)", "liveupdate_reboot"),
    "LIVEUPDATE_MEMFD": ("lets LUO preserve memfds (guest RAM, vmstate)", "memfd_luo_can_preserve"),
}
REBUILD = "rebuild the kernel with CONFIG_{opt}=y (`scripts/config -e {opt}; make olddefconfig`, " \
          "then check it survived) and boot it"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


# --- gathering facts (each returns plain data, so the checks below are pure) --------------
def read_kernel_config(release: str) -> tuple[dict[str, str] | None, str]:
    """(options, where they came from): CONFIG_X -> 'y'/'m'/value; None when unreadable."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{release}")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        return parse_config(raw.decode(errors="replace")), str(path)
    return None, f"/proc/config.gz and /boot/config-{release}"


def parse_config(text: str) -> dict[str, str]:
    opts = {}
    for line in text.splitlines():
        m = re.match(r"CONFIG_(\w+)=(.*)", line)
        if m:
            opts[m.group(1)] = m.group(2).strip('"')
    return opts


def kernel_symbols(names) -> set[str]:
    """Which of ``names`` /proc/kallsyms lists (fallback evidence when the config is unreadable)."""
    wanted, found = set(names), set()
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] in wanted and parts[1] not in "wWvV":
                    found.add(parts[2])
    except OSError:
        pass
    return found


def cmdline_params(cmdline: str) -> dict[str, str]:
    """Kernel parameters before any ``--`` (the rest belongs to init); last one wins."""
    params = {}
    for word in cmdline.split():
        if word == "--":
            break
        key, _, value = word.partition("=")
        params[key] = value
    return params


def _truthy(value: str | None) -> bool | None:
    """The kernel's kstrtobool reading of a parameter value (None when absent/unparsable)."""
    if value is None:
        return None
    v = value.lower()
    if v in ("1", "y", "yes", "on", "true"):
        return True
    if v in ("0", "n", "no", "off", "false"):
        return False
    return None


def effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


# --- checks ----------------------------------------------------------------------------
def check_release(release: str) -> Check:
    m = re.match(r"(\d+)\.(\d+)", release)
    version = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    ok = version >= MIN_KERNEL
    return Check("kernel-release", ok, f"running {release}",
                 "" if ok else f"boot a kernel >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (LUO appeared in "
                 "6.19; e.g. Debian's linux-source-7.2) built with the options below")


def check_config(config: dict[str, str] | None, source: str, symbols: set[str], device_exists: bool) -> list[Check]:
    checks = []
    for opt, (why, symbol) in KERNEL_OPTIONS.items():
        fix = REBUILD.format(opt=opt)
        if config is not None:
            value = config.get(opt)
            ok = value == "y" or (value == "m" and opt == "LIVEUPDATE_MEMFD")
            detail = f"CONFIG_{opt}={value} in {source}" if value else f"CONFIG_{opt} is not set in {source}"
        else:  # no config file: judge by what the running kernel shows
            ok = symbol in symbols or (device_exists and opt in ("KEXEC_HANDOVER", "LIVEUPDATE"))
            detail = (f"config unreadable ({source}); the running kernel "
                      f"{'has' if ok else 'shows no sign of'} it (/proc/kallsyms: {symbol})")
            if not ok:
                fix += "; or enable CONFIG_IKCONFIG_PROC so doctor can read the config"
        checks.append(Check(f"config-{opt.lower().replace('_', '-')}", ok, f"{detail} — {why}", "" if ok else fix))
    return checks


def check_cmdline(params: dict[str, str], config: dict[str, str] | None, device_exists: bool) -> list[Check]:
    lu = _truthy(params.get("liveupdate"))
    lu_ok = bool(lu) or device_exists
    c1 = Check("cmdline-liveupdate", lu_ok,
               f"liveupdate={params['liveupdate']}" if "liveupdate" in params else "no liveupdate= parameter",
               "" if lu_ok else "add 'liveupdate=on' to the kernel command line (bootloader config, e.g. "
               "GRUB_CMDLINE_LINUX; a kexec reusing this command line inherits it)")
    kho = _truthy(params.get("kho"))
    default_on = (config or {}).get("KEXEC_HANDOVER_ENABLE_DEFAULT") == "y"
    kho_ok = kho is True or (kho is None and default_on) or device_exists
    if kho is not None:
        detail = f"kho={params['kho']}"
    elif default_on:
        detail = "no kho= parameter; CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y turns KHO on"
    else:
        detail = "no kho= parameter and CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT is not set: KHO is off"
    c2 = Check("cmdline-kho", kho_ok, detail,
               "" if kho_ok else "add 'kho=on' to the kernel command line (or build with "
               "CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT=y); without KHO the kernel disables liveupdate")
    return [c1, c2]


def check_device(path: str = DEVICE) -> Check:
    if not os.path.exists(path):
        return Check("dev-liveupdate", False, f"{path} does not exist",
                     "boot a kernel with CONFIG_LIVEUPDATE=y and 'liveupdate=on kho=on' (see the checks above)")
    try:
        LiveUpdate.open(path).close()
    except errors.LuoError as exc:
        return Check("dev-liveupdate", False, str(exc),
                     "stop the process holding it" if isinstance(exc, errors.LuoBusy) else "see the message")
    return Check("dev-liveupdate", True, f"{path} present and openable")


def check_privileges(euid: int, caps: int) -> Check:
    has_boot = bool(caps & (1 << CAP_SYS_BOOT))
    ok = euid == 0 or has_boot
    detail = f"euid {euid}, CAP_SYS_BOOT {'present' if has_boot else 'missing'}"
    return Check("privileges", ok, detail,
                 "" if ok else "run as root (kexec needs CAP_SYS_BOOT; /dev/liveupdate is root-only)")


def check_qemu(explicit: str | None) -> list[Check]:
    try:
        binary = qemu_binary.find_qemu(explicit)
        version = qemu_binary.qemu_version(binary)
    except errors.QemuError as exc:
        fix = "install qemu-system-x86 >= 11.1 (Debian trixie-backports), or pass --qemu PATH / set $LUOAGENT_QEMU"
        return [Check("qemu", False, str(exc), fix)]
    checks = [Check("qemu", True, f"{binary} (QEMU {version})")]
    try:
        probe = qemu_binary.probe_cpr(binary)
    except errors.QemuError as exc:
        return checks + [Check("qemu-cpr", False, f"probing {binary} failed: {exc}",
                               "check that this QEMU starts (`-machine none`) and answers QMP")]
    upgrade = f"use a QEMU with cpr-reboot and x-ignore-shared (>= 11.1); {binary} is {version}"
    checks.append(Check("qemu-cpr-reboot", probe.cpr_reboot,
                        "migration mode cpr-reboot accepted" if probe.cpr_reboot else
                        f"cpr-reboot refused: {probe.details.get('cpr_reboot_error', '?')}",
                        "" if probe.cpr_reboot else upgrade))
    checks.append(Check("qemu-x-ignore-shared", probe.x_ignore_shared,
                        "capability x-ignore-shared present" if probe.x_ignore_shared else
                        "capability x-ignore-shared missing: guest RAM would be copied",
                        "" if probe.x_ignore_shared else upgrade))
    # Informational: luoagent does not need it (RAM memfds are inherited, mem-path=/proc/self/fd/N).
    checks.append(Check("qemu-fdset-mem-backend", True,
                        "memory-backend-file accepts /dev/fdset/N" if probe.fdset_mem_backend else
                        "memory-backend-file does not accept /dev/fdset/N (not needed: luoagent passes "
                        "RAM memfds as inherited fds, mem-path=/proc/self/fd/N)"))
    return checks


def check_daemon(sock: Path | None = None) -> Check:
    """Informational (never fails the verdict): is a luoagent daemon serving, and what a crash
    of the agent costs here (crash safety after the kexec needs systemd's fd store)."""
    from luoagent.adapters import control, systemctl
    from luoagent.workflows import client

    sock = sock or client.socket_path()
    lossy = ("a crash of the agent during the restore after a kexec loses the RAM of every VM it had "
             "not started yet (the kernel finishes a session whose last fd closes)")
    fix = ("run the daemon as the shipped luoagent.service (systemd/luoagent.service: fd store with "
           "FileDescriptorStorePreserve=yes) on a host booted with systemd >= 262")
    if not systemctl.booted():
        lossy = f"this host does not run systemd, so no fd store keeps the LUO sessions: {lossy}"
    try:
        c = control.Client.connect(sock, timeout=2.0)
    except errors.DaemonNotRunning:
        return Check("agent-daemon", True,
                     f"WARNING: no luoagent daemon serves {sock}: `luoagent update` then runs inside the CLI "
                     "process (if that is killed, `luoagent recover` undoes it) and restore too; "
                     f"{lossy}", fix)
    except errors.LuoAgentError as exc:
        return Check("agent-daemon", True, f"WARNING: {exc}; {lossy}", fix)
    try:
        pid = c.hello.get("pid")
        c.send({"id": 1, "op": "status", "args": {}})
        reply = c.recv() or {}
        store = ((reply.get("result") or {}).get("fd_store") or {})
    except errors.LuoAgentError:
        store = {}
    finally:
        c.close()
    if store.get("enabled"):
        return Check("agent-daemon", True, f"luoagent daemon pid {pid} serves {sock} and keeps its LUO sessions in "
                     f"systemd's fd store (FileDescriptorStoreMax={store.get('capacity')}): a crash of the agent "
                     "during an update rolls back, during a restore the next start finishes it")
    return Check("agent-daemon", True, f"luoagent daemon pid {pid} serves {sock}: updates run there and survive "
                 f"their client; WARNING: the daemon has no fd store: {lossy}", fix)


def gather(qemu: str | None = None, *, with_qemu: bool = True, with_daemon: bool = True) -> list[Check]:
    release = platform.release()
    config, source = read_kernel_config(release)
    device_exists = os.path.exists(DEVICE)
    symbols = kernel_symbols(s for _w, s in KERNEL_OPTIONS.values()) if config is None else set()
    params = cmdline_params(Path("/proc/cmdline").read_text())
    checks = [check_release(release)]
    checks += check_config(config, source, symbols, device_exists)
    checks += check_cmdline(params, config, device_exists)
    checks.append(check_device())
    checks.append(check_privileges(os.geteuid(), effective_caps()))
    if with_daemon:  # not from inside an update: the daemon would be asking itself
        checks.append(check_daemon())
    if with_qemu:
        checks += check_qemu(qemu)
    return checks


def check_vm_identities(root: str | None = None) -> Check:
    """Advice, never a failure: which running VMs' QEMUs run as root (a guest that escapes into
    such a QEMU owns the host). The identity is the kernel's (/proc/PID/status)."""
    from luoagent.adapters import procfs
    from luoagent.workflows import vm as vmwf

    as_root, others = [], []
    for record in vmwf.list_records(root):
        if not vmwf.is_vm_process(record):
            continue
        try:
            uid, _gid = procfs.identity(record.pid)
        except OSError:
            continue
        (as_root if uid == 0 else others).append(f"{record.name} (pid {record.pid}, uid {uid})")
    if as_root:
        return Check("vm-identity", True, "VMs whose QEMU runs as root: " + ", ".join(as_root),
                     "start VMs with `luoagent vm start --user USER` (QEMU -run-with user=) so a guest "
                     "escape does not run as root; restore keeps each QEMU's identity")
    return Check("vm-identity", True, ("no VM runs as root: " + ", ".join(others)) if others
                 else f"no running VMs under {vmwf.vm_root(root)}")


def report(checks: list[Check]) -> dict:
    return {"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}


def render(doc: dict) -> str:
    lines = []
    for c in doc["checks"]:
        lines.append(f"{'✔' if c['ok'] else '✘'} {c['name']:<24} {c['detail']}")
        if c["fix"]:  # a passing check with a fix is advice (vm-identity)
            lines.append(f"  {'':<24} {'fix' if not c['ok'] else 'advice'}: {c['fix']}")
    failed = sum(not c["ok"] for c in doc["checks"])
    lines.append("live update: possible on this host" if doc["ok"] else
                 f"live update: NOT possible on this host ({failed} problem{'s' * (failed != 1)} above)")
    return "\n".join(lines)


# --- CLI --------------------------------------------------------------------------------
def configure(parser):
    parser.add_argument("--json", action="store_true", help='print {"ok": bool, "checks": [...]} on stdout')
    parser.add_argument("--qemu", metavar="PATH", help="QEMU binary to check (default: $LUOAGENT_QEMU, then PATH)")
    parser.add_argument("--no-qemu", action="store_true", help="skip the QEMU checks (kernel/host only)")
    parser.add_argument("--vm-root", dest="vm_root", default=None,
                        help="VM root whose running VMs are checked for running as root "
                        "(default $LUOAGENT_VM_ROOT or /run/luoagent/vms)")


def run(args) -> int:
    doc = report(gather(args.qemu, with_qemu=not args.no_qemu) + [check_vm_identities(args.vm_root)])
    log.info("doctor", ok=doc["ok"], failed=[c["name"] for c in doc["checks"] if not c["ok"]])
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
    else:
        out = render(doc)
        enc = sys.stdout.encoding or "utf-8"
        if "utf" not in enc.lower():  # a C-locale terminal cannot print ✔/✘
            out = out.replace("✔", "OK").replace("✘", "NO")
        print(out)
    return 0 if doc["ok"] else 1
