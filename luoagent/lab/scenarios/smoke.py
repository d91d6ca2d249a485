"""Lab scenario smoke: proves the lab itself — LUO present, state carried, a real kexec happened.

Debug switches prove the harness can go red: ``fail`` (a check fails), ``raise`` (stage 1 raises,
stage 2 must never run), ``hang`` (stage 2 never returns: the host's stage timeout must fire),
``panic`` (stage 2 crashes the kernel: the host must report the dead VM)."""

from __future__ import annotations

import os
import time

NAME = "smoke"
DESCRIPTION = "lab bring-up: /dev/liveupdate present, scenario state carried across one real kexec"
MEMORY = "1G"
SLOW = False
TIMEOUT = 120.0

#: KTAP descriptions tests look up by name
NEW_KERNEL = "a new kernel booted (boot id changed, one more kexec)"
FAIL_ON_PURPOSE = "debug switch 'fail' not set"


def stage_before(ctx) -> None:
    ctx.check(os.path.exists("/dev/liveupdate"), "/dev/liveupdate exists",
              "the lab kernel has no LUO device: check liveupdate=on kho=on and CONFIG_LIVEUPDATE")
    ctx.check(ctx.hop == 0 or ctx.stage == 0, "first stage runs in the scenario's first boot")
    try:
        from luoagent._luo_shim import lib

        ctx.ok("the agent's cffi shim imports in the VM's python3")
        ctx.diag(f"shim ABI proven against the lab kernel's liveupdate.h at build time: "
                 f"{bool(getattr(lib, 'LUO_ABI_CHECKED', 0))}")
    except ImportError as exc:
        ctx.not_ok("the agent's cffi shim imports in the VM's python3", str(exc))
    ctx.state["boot_id"] = ctx.boot_id
    ctx.state["hop"] = ctx.hop
    ctx.diag(f"kernel {os.uname().release}, boot id {ctx.boot_id}")
    if ctx.debug.get("raise"):
        raise RuntimeError("debug switch 'raise': stage 1 fails on purpose")


def stage_after(ctx) -> None:
    ctx.check(ctx.state.get("boot_id") not in (None, ctx.boot_id) and ctx.hop == ctx.state.get("hop", -9) + 1,
              NEW_KERNEL, f"before: boot id {ctx.state.get('boot_id')} hop {ctx.state.get('hop')}; "
                          f"now: boot id {ctx.boot_id} hop {ctx.hop}")
    ctx.check(os.path.exists("/dev/liveupdate"), "/dev/liveupdate exists after kexec")
    if ctx.debug.get("panic"):
        ctx.diag("debug switch 'panic': crashing the kernel via sysrq-trigger")
        with open("/proc/sysrq-trigger", "w") as f:
            f.write("c")
    if ctx.debug.get("hang"):
        ctx.diag("debug switch 'hang': sleeping until the host's stage timeout fires")
        while True:
            time.sleep(3600)
    ctx.check(not ctx.debug.get("fail"), FAIL_ON_PURPOSE, "the host asked this check to fail (--debug fail)")


def stages():
    return [stage_before, stage_after]
