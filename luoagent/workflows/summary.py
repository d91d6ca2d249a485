"""Human renderings of the result documents of `update` and `restore` (what `--json` prints
as JSON): one summary line, then one line per VM."""

from __future__ import annotations

import sys


def ram_figures_text(v: dict) -> str:
    """The RAM figures of one VM in the words of what QEMU measured (keys as update's result)."""
    def n(key):
        return "not reported" if v.get(key) is None else f"{v[key]:,} B"

    block = {True: "no guest RAM block among them (each is larger than that total)",
             False: "a guest RAM block MAY be among them", None: "QEMU did not report which blocks"}
    pages = ("QEMU did not report the RAM page bytes it wrote" if v.get("ram_pages_written_bytes") is None
             else f"QEMU wrote {n('ram_pages_written_bytes')} of RAM pages")
    return (pages
            + (f" and {v['zero_pages_written']:,} zero-page markers" if v.get("zero_pages_written") is not None else "")
            + f", from RAM blocks of {n('ram_blocks_in_stream_bytes')} in all: "
            + block[v.get("no_guest_ram_block_in_stream")]
            + f"; so at most {v['guest_ram_bytes_copied_at_most']:,} B of guest RAM went into the stream")


def update_summary(result: dict, out=None) -> None:
    """The human text of an update result document (stdout unless ``out``)."""
    out = out if out is not None else sys.stdout
    print(f"luoagent update: {result['status']}", file=out)
    for p in result["phases"]:
        print(f"  {p['phase']:<18} {p['seconds'] * 1000:9.1f} ms{'' if p['ok'] else '  FAILED'}", file=out)
    for v in result["vms"]:
        print(
            f"  VM {v['name']}: RAM {v['ram_bytes'] >> 20} MiB kept in place, vmstate {v['vmstate_bytes']} B "
            f"({v['vmstate_percent_of_ram']:.3f} % of RAM), stop→saved {v['quiesce_seconds'] * 1000:.1f} ms; "
            + ram_figures_text(v),
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
                f"guest RAM copied at most {v['ram_bytes_copied']} B (RAM page bytes QEMU wrote)",
                file=out,
            )
            if v.get("blackout_parts"):
                print("    blackout: " + ", ".join(f"{k} {s:.3f} s" for k, s in v["blackout_parts"].items()), file=out)
        else:
            print(f"  VM {v['name']}: FAILED: {v['error']}", file=out)
            print(f"    {v['retry']}", file=out)
    out.flush()
