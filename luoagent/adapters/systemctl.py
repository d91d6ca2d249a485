"""systemd's manager through its own tools: is this host booted with systemd, the argv prefix
that starts a command in a transient scope unit (`systemd-run --scope`), moving a process into
such a scope (`vm upgrade`'s new QEMU), `systemctl kexec`.

Why a scope for QEMU: `systemd-run --scope` registers the scope for its own pid and then
execs the command itself (run.c, start_transient_scope → execvpe), so the command keeps every
inherited fd at its number (`mem-path=/proc/self/fd/N` still names the RAM memfd) and lives
in its own cgroup: a restart or crash of luoagent.service never kills it."""

from __future__ import annotations

import os
import shutil
import subprocess

from luoagent.errors import KexecError, QemuError

#: sd_booted(3): this directory exists only when systemd is PID 1
BOOTED_MARKER = "/run/systemd/system"
VM_UNIT_PREFIX = "luoagent-vm-"
_UNIT_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-")


def booted() -> bool:
    """True when systemd runs this host (PID 1)."""
    return os.path.isdir(BOOTED_MARKER)


def vm_unit(vm_name: str) -> str:
    """The scope unit of a VM's QEMU: ``luoagent-vm-NAME.scope``, with every character a unit
    name cannot hold written as ``\\xNN`` (systemd's own escaping: ``+`` → ``\\x2b``)."""
    escaped = "".join(c if c in _UNIT_SAFE else "".join(f"\\x{b:02x}" for b in c.encode()) for c in vm_name)
    return f"{VM_UNIT_PREFIX}{escaped}.scope"


def scope_prefix(unit: str) -> list[str]:
    """argv that runs the following command in the transient scope ``unit`` (--collect: the
    unit goes away once QEMU exits, however it exits, so the name is free again)."""
    tool = shutil.which("systemd-run")
    if tool is None:
        raise QemuError("systemd runs this host but systemd-run is not on PATH; install systemd (it ships it)")
    # Delegate=yes: the scope's cgroup is then its owner's to place processes in (systemd's
    # delegation rules), which is how `vm upgrade` puts the VM's next QEMU into the same scope
    return [tool, "--scope", "--quiet", "--collect", f"--unit={unit}", "--property=Delegate=yes",
            "--description=luoagent VM (QEMU)", "--"]


#: the cgroup v2 hierarchy (the only one systemd >= 256 runs on)
CGROUP_ROOT = "/sys/fs/cgroup"


def delegated(unit: str, timeout: float = 30.0) -> bool:
    """Is ``unit`` active with Delegate=yes (so a process can be moved into it)?"""
    r = subprocess.run(["systemctl", "show", "--property=ActiveState,Delegate", unit],
                       capture_output=True, text=True, timeout=timeout)
    props = dict(line.partition("=")[::2] for line in r.stdout.splitlines())
    return r.returncode == 0 and props.get("ActiveState") == "active" and props.get("Delegate") == "yes"


def attach(unit: str, pid: int, timeout: float = 30.0) -> None:
    """Move process ``pid`` into the cgroup of the running, delegated unit ``unit``.

    Why not the manager's AttachProcessesToUnit: busctl always talks as a bus client, which
    PID 1's private socket is not, and a host may have no bus daemon (the lab has none). A
    delegated unit's cgroup is its owner's to place processes in, so the pid is written to its
    cgroup.procs, at the path systemd reports (ControlGroup); QemuError if that fails."""
    r = subprocess.run(["systemctl", "show", "-P", "ControlGroup", unit], capture_output=True, text=True,
                       timeout=timeout)
    cgroup = r.stdout.strip()
    if r.returncode != 0 or not cgroup.startswith("/"):
        raise QemuError(f"{unit} has no control group (is it running?): {(r.stderr or r.stdout).strip()[-300:]}")
    procs = os.path.join(CGROUP_ROOT, cgroup.lstrip("/"), "cgroup.procs")
    try:
        with open(procs, "w") as f:
            f.write(f"{pid}\n")
    except OSError as exc:
        raise QemuError(f"cannot move pid {pid} into {unit} ({procs}): {exc.strerror}") from None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            now = f.read().strip()
    except OSError as exc:
        raise QemuError(f"pid {pid} gone while it was moved into {unit}: {exc.strerror}") from None
    if not now.endswith(cgroup):
        raise QemuError(f"pid {pid} is in {now!r} after the move, not in {unit} ({cgroup})")


def stop_unit(unit: str, timeout: float = 60.0) -> bool:
    """``systemctl stop UNIT`` (waits for the stop job); False if systemctl refused."""
    r = subprocess.run(["systemctl", "stop", unit], capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0


def unit_active(unit: str, timeout: float = 30.0) -> bool:
    r = subprocess.run(["systemctl", "is-active", "--quiet", unit], timeout=timeout)
    return r.returncode == 0


def kexec(timeout: float = 120.0) -> None:
    """``systemctl kexec --no-block``: start the orderly shutdown that ends in a kexec of the
    image that is already loaded (kexec_file_load: only those carry KHO data). Returns once the
    manager queued the job; KexecError with systemctl's words if it refused (nothing has
    stopped then). --no-block: a waiting systemctl runs in our service's cgroup and is killed
    by the very shutdown it started, and its non-zero exit would look like a refusal."""
    try:
        r = subprocess.run(["systemctl", "--no-block", "kexec"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KexecError(f"`systemctl kexec` could not be run: {exc}") from None
    if r.returncode != 0:
        raise KexecError(f"`systemctl kexec` failed (exit {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-500:] or 'no message'}")
