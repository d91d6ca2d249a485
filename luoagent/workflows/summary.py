"""Human renderings of the result documents of `update` and `restore` (what `--json` prints
as JSON): one summary line, then one line per VM."""

from __future__ import annotations

import sys


def update_summary(result: dict, out=None) -> None:
    """The human text of an update result document (stdout unless ``out``)."""
    out = out if out is not None else sys.stdout
    print(f"luoagent update: {result['status']}", file=out)
    for p in result["phases"]:
        print(f"  {p['phase']:<18} {p['seconds'] * 1000:9.1f} ms{'' if p['ok'] else '  FAILED'}", file=out)
    for v in result["vms"]:
        print(
            f"  VM {v['name']}: RAM {v['ram_bytes'] >> 20} MiB kept in place, vmstate {v['vmstate_bytes']} B "
            f"({v['vmstate_percent_of_ram']:.3f} % of RAM), guest RAM copied {v['guest_ram_bytes_copied']} B, "
            f"stop→saved {v['quiesce_seconds'] * 1000:.1f} ms",
            file=out,
        )
    out.flush()


def restore_summary(result: dict, out=None) -> None:
    """The human text of a restore result document (stdout unless ``out``)."""
    out = out if out is not None else sys.stdout
    head = "all VMs restored" if result["ok"] else "some VMs were NOT restored"
    if "kernel_from" in result:
        head += f" (kernel {result['kernel_from']} -> {result['kernel_now']}, {result['seconds']:.3f} s)"
    print(f"luoagent restore: {head}", file=out)
    for v in result["vms"]:
        if v["ok"]:
            print(
                f"  VM {v['name']}: {v['status']} (pid {v['pid']}), blackout {v['blackout_ns'] / 1e9:.3f} s, "
                f"vmstate {v['vmstate_bytes']} B, RAM {v['ram_bytes'] >> 20} MiB in place, "
                f"RAM bytes copied {v['ram_bytes_copied']}",
                file=out,
            )
            if v.get("blackout_parts"):
                print("    blackout: " + ", ".join(f"{k} {s:.3f} s" for k, s in v["blackout_parts"].items()), file=out)
        else:
            print(f"  VM {v['name']}: FAILED: {v['error']}", file=out)
            print(f"    {v['retry']}", file=out)
    out.flush()
