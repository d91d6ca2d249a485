"""The systemd lab installs the repository's own units (systemd/) the way a distro package would,
and checks that systemd runs them: luoagent.service enabled, up at boot with no command typed.

The agent becomes /usr/bin/luoagent: a launcher for the run disk's package (as a package would
install one); a lab-only drop-in orders the service after the run disk's mount."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

UNITS_DIR = Path("/lab/units")          # the repository's systemd/ on the run disk
LAUNCHER = Path("/lab/bin/luoagent")     # python3 launcher for /lab/agent (boot.make_run_disk)
SYSTEM_DIR = Path("/etc/systemd/system")
SERVICE = "luoagent.service"
STAGE_UNIT = "luoagent-lab-stage.service"
#: what the lab adds to the shipped unit, and why: the agent's code lives on the run disk, and a
#: Python daemon starting under nested TCG on a loaded host has taken minutes
LAB_DROP_IN = """# luoagent lab only (luoagent/lab/host_units.py): the agent lives on the run disk
[Unit]
After=lab.mount luoagent-lab-run-disk.service

[Service]
TimeoutStartSec=300
"""

INSTALLED = "shipped units installed in /etc/systemd/system, /usr/bin/luoagent, luoagent.service enabled"
SERVICE_UP = "luoagent.service active (Type=notify: READY after serving) and `luoagent status --json` answers"
SERVICE_UP_AFTER = "after the kexec: luoagent.service active and `luoagent status --json` answers"
UP_AT_BOOT = "after the kexec, systemd started luoagent.service at boot before the stage (no command typed)"


def systemctl(*args: str, timeout: float = 360) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout)


def prop(unit: str, name: str) -> str:
    return systemctl("show", "-P", name, unit).stdout.strip()


def install() -> list[str]:
    """Copy the units and the launcher in, daemon-reload, enable luoagent.service; returns the units."""
    units = sorted(p.name for p in UNITS_DIR.iterdir() if p.is_file())
    for name in units:
        shutil.copyfile(UNITS_DIR / name, SYSTEM_DIR / name)
    shutil.copyfile(LAUNCHER, "/usr/bin/luoagent")
    Path("/usr/bin/luoagent").chmod(0o755)
    drop_in = SYSTEM_DIR / f"{SERVICE}.d"
    drop_in.mkdir(exist_ok=True)
    (drop_in / "luoagent-lab.conf").write_text(LAB_DROP_IN)
    systemctl("daemon-reload")
    return units


def status_json() -> tuple[dict | None, str]:
    out = subprocess.run(["/usr/bin/luoagent", "status", "--json"], capture_output=True, text=True, timeout=300)
    try:
        return json.loads(out.stdout), out.stderr
    except ValueError:
        return None, f"exit {out.returncode}: {out.stdout[-1000:]} {out.stderr[-1000:]}"


def journal(unit: str, lines: int = 40) -> str:
    out = subprocess.run(["journalctl", "-b", "--no-pager", "-n", str(lines), "-u", unit],
                         capture_output=True, text=True)
    return (out.stdout or out.stderr)[-4000:]


def install_and_start(ctx) -> bool:
    """Stage before a kexec: install as a package would (enable --now), check the service serves."""
    units = install()
    enabled = systemctl("enable", "--now", SERVICE)
    state = prop(SERVICE, "UnitFileState")
    ok = ctx.check(SERVICE in units and enabled.returncode == 0 and state == "enabled", INSTALLED,
                   f"units {units}; enable exit {enabled.returncode}: {enabled.stderr.strip()}; "
                   f"UnitFileState={state!r}")
    return check_serving(ctx, SERVICE_UP) and ok


def check_serving(ctx, desc: str) -> bool:
    active = prop(SERVICE, "ActiveState")
    status, err = status_json() if active == "active" else (None, "service not active")
    return ctx.check(active == "active" and status is not None, desc,
                     f"ActiveState={active!r}; status: {err}\n{journal(SERVICE)}")


def check_started_at_boot(ctx) -> bool:
    """Stage after the kexec: the service is up, and it started before this stage's unit did."""
    service_start = prop(SERVICE, "ExecMainStartTimestampMonotonic")
    stage_start = prop(STAGE_UNIT, "ExecMainStartTimestampMonotonic")
    active = prop(SERVICE, "ActiveState")
    before = service_start.isdigit() and stage_start.isdigit() and 0 < int(service_start) < int(stage_start)
    ok = ctx.check(active == "active" and before, UP_AT_BOOT,
                   f"ActiveState={active!r}; started at {service_start} us, the stage at {stage_start} us\n"
                   f"{journal(SERVICE)}")
    ctx.diag(f"luoagent.service up at boot: started {int(service_start or 0) / 1e6:.1f} s after the kernel, "
             f"the stage at {int(stage_start or 0) / 1e6:.1f} s")
    return ok
