"""Helpers several lab scenarios share (a KTAP check, the env of child agents, the guest image), written once.

Not a scenario itself: the registry skips modules whose name starts with an underscore."""

from __future__ import annotations

import os
from pathlib import Path

import luoagent
from luoagent import testmode

#: KTAP description of the "did a kexec really happen" check after a preserve stage
NEW_BOOT = "a new kernel booted since preserve (boot id changed)"


def check_new_boot(ctx, st: dict) -> None:
    """KTAP check that the boot id differs from the one a preserve stage saved in ``st["boot_id"]``."""
    ctx.check(ctx.boot_id != st["boot_id"], NEW_BOOT, f"boot id still {ctx.boot_id}")


def agent_env() -> dict:
    """Environment for a child `python3 -m luoagent` (or a helper program) a stage runs: it
    imports this very agent copy, and the stage's fault-injection switches do not leak into it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(luoagent.__file__).resolve().parents[1])
    for k in (testmode.FAULT_ENV, testmode.SKIP_ENV):
        env.pop(k, None)
    return env


def guest_elf() -> Path:
    """The counter guest's image on the lab run disk (built on the host, luoagent/lab/guest.py)."""
    for p in (Path("/lab/guest/guest.elf"), *Path("/lab/guest").glob("*.elf")):
        if p.is_file():
            return p
    raise RuntimeError("the lab run disk has no guest (/lab/guest/*.elf): was the guest built?")
