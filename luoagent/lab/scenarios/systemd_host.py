"""Lab scenario systemd-host: the systemd flavour itself (systemd 262 as PID 1, the stage as a unit,
`systemctl kexec`), systemd's own LUO use (a unit's fd-store memfd across that kexec) and the
repository's units installed and run as on a host.

Stage 1: systemd is PID 1; the shipped units are installed and luoagent.service enabled and
started; a bystander unit (FileDescriptorStoreMax=1, FileDescriptorStorePreserve=yes) pushes a
1 MiB random memfd (FDSTORE=1, FDNAME, FDPOLL=0); the runner loads the lab kernel with
kexec_file_load and runs `systemctl kexec`. Stage 2: KHO says it came through a KHO kexec;
luoagent.service came up at boot by itself; the bystander, started again, is handed the memfd
back under the same FDNAME with identical bytes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from luoagent.lab import bystander, host_units
from luoagent.lab.scenarios._common import check_new_boot

NAME = "systemd-host"
DESCRIPTION = ("systemd 262 as PID 1: stage unit, systemctl kexec, a unit's fd-store memfd kept via LUO, "
               "the shipped luoagent.service")
MEMORY = "1G"
FLAVOUR = "systemd"
SLOW = True
TIMEOUT = 240.0

PID1_SYSTEMD = "PID 1 is systemd 262 ({when})"
STAGE_AS_UNIT = "the stage runs in luoagent-lab-stage.service ({when})"
BEFORE, AFTER = "before the kexec", "after the kexec"


def check_systemd(ctx, when: str) -> None:
    """PID 1 is systemd 262.x and this stage runs inside the lab's stage unit."""
    comm = Path("/proc/1/comm").read_text().strip()
    version = subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout
    first = version.splitlines()[0] if version else ""
    words = first.split()
    major = words[1].split(".")[0] if len(words) > 1 else ""
    ctx.check(comm == "systemd" and words[:1] == ["systemd"] and major == "262",
              PID1_SYSTEMD.format(when=when), f"/proc/1/comm {comm!r}; systemctl --version: {first!r}")
    cgroup = Path(f"/proc/{os.getpid()}/cgroup").read_text()
    ctx.check("luoagent-lab-stage.service" in cgroup, STAGE_AS_UNIT.format(when=when), f"cgroup: {cgroup.strip()}")
    ctx.diag(f"{first}; uptime at stage start {Path('/proc/uptime').read_text().split()[0]} s")
    for args in (["time"], ["blame"]):  # where the boot's time went, as systemd measured it
        out = subprocess.run(["systemd-analyze", *args], capture_output=True, text=True)
        ctx.diag("systemd-analyze " + " ".join(args) + ": "
                 + " | ".join(line.strip() for line in (out.stdout or out.stderr).splitlines()[:8]))


def stage_before(ctx) -> None:
    check_systemd(ctx, BEFORE)
    ctx.state["boot_id"] = ctx.boot_id
    host_units.install_and_start(ctx)
    bystander.start_and_check_pushed(ctx)


def stage_after(ctx) -> None:
    check_new_boot(ctx, ctx.state)
    check_systemd(ctx, AFTER)
    host_units.check_started_at_boot(ctx)
    host_units.check_serving(ctx, host_units.SERVICE_UP_AFTER)
    bystander.check_after_kexec(ctx)


def stages():
    return [stage_before, stage_after]
