"""Lab scenario stable-update: running VMs carried across a Debian stable update of the same
series, 7.2.12 -> 7.2.13, through `luoagent update` (real kexec) and `luoagent restore`.

Stage 1 runs on the 7.2.12 lab kernel (built from Debian's exact linux-source-7.2 7.2.12),
starts two counter guests and updates into the 7.2.13 lab kernel; the preflight reads both
images' LUO ABI strings. Stage 2 (7.2.13) restores both and checks that each guest continued."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from luoagent.lab.scenarios import kernel_change as kc
from luoagent.lab.scenarios.vm_update import VM_RAM, start_guest

NAME = "stable-update"
DESCRIPTION = "VMs across a Debian stable update 7.2.12 -> 7.2.13 (update, real kexec, restore)"
MEMORY = "1G"
SLOW = True
TIMEOUT = 500.0
KERNELS = ("7.2.12", "7.2")
OLD_KERNEL = Path("/lab/kernels/7.2.12/bzImage")
VMS = ("a", "b")
FROM, TO = KERNELS[0], "7.2.13"


def stage_start_and_update(ctx) -> None:
    kc._series(ctx, KERNELS[0])
    st = ctx.state.setdefault(kc.KEY, {"vms": {}, "releases": [os.uname().release]})
    for vm in VMS:
        st["vms"][vm] = start_guest(vm, secrets.randbits(48))
        ctx.diag(f"guest {vm}: pid {st['vms'][vm]['pid']}, {VM_RAM >> 20} MiB memfd RAM")
    ctx.save()
    kc._update(ctx, VMS, kc.LAB_KERNEL, OLD_KERNEL, FROM, TO)


def stage_restore(ctx) -> None:
    kc._after_update(ctx, FROM, TO)
    kc._series(ctx, KERNELS[1])
    st = ctx.state[kc.KEY]
    st["releases"].append(os.uname().release)
    out = kc.OUT_DIR / f"restore-{TO}"
    r = kc.agent("restore", "--json", out=out)
    for line in kc._file(out, ".err").read_text(errors="replace").splitlines():
        ctx.diag(f"restore on {TO}: " + line)
    try:
        doc = json.loads(kc._file(out, ".json").read_text())
    except ValueError:
        doc = {"vms": []}
    if r.returncode != 0:
        ctx.diag(f"restore exited {r.returncode}")
    for vm in VMS:
        kc._check_restored(ctx, vm, TO, doc)
    ctx.diag("releases crossed: " + " -> ".join(st["releases"]))
    for vm in VMS:
        kc.agent("vm", "stop", vm, "--force")


def stages():
    return [stage_start_and_update, stage_restore]
