"""`luoagent lab demo`: build the lab if needed, run the vm-update scenario in it and tell the story:
two guests keep counting while the lab's kernel is live-updated under them.

The scenario does the work inside the lab VM (vm start, luoagent update → kexec, luoagent restore,
rollbacks); this module echoes its progress live and summarises its KTAP/diag lines."""

from __future__ import annotations

import json
import re
import time

from luoagent import report
from luoagent.report import Progress

SCENARIO = "vm-update"

_PHASE = re.compile(r"update: \[update\] (?P<phase>[\w-]+) done in (?P<s>[\d.]+) s")
_PREP = re.compile(r"update: \[update\]\s+kexec now \(preparation took (?P<s>[\d.]+) s\)")
_COUNTER = re.compile(r"guest (?P<vm>\S+): counter (?P<before>\d+) before update -> (?P<after>\d+) after restore "
                      r"-> (?P<later>\d+) 0\.5 s later")
_REPORT = re.compile(r"guest (?P<vm>\S+): blackout (?P<blackout>[\d.]+) s \(stop -> running, across kexec\), "
                     r"vmstate (?P<vmstate>\d+) B of (?P<ram>\d+) MiB RAM, guest RAM copied at most (?P<copied>-?\d+) B "
                     r"\(RAM page bytes QEMU wrote\), RAM blocks in stream (?P<blocks>-?\d+) B")
_PARTS = re.compile(r"restore: \[restore\] (?P<vm>\S+): running \(pid \d+\), blackout [\d.]+ s = (?P<parts>.*)")
_KERNELS = re.compile(r"restore: \[restore\] manifest: .* written by kernel (?P<old>\S+), now on (?P<new>\S+)")
_ROLLBACK = re.compile(r"(?P<case>fault after quiesce|reboot refused): luoagent update: error: (?P<msg>.*)")

#: console lines worth showing live (the rest is kernel boot noise)
_LIVE = re.compile(r"# (guest |update: \[update\] \S+ (done|FAILED)|update: \[update\]\s+\S+: (stop|ram0)|"
                   r"restore: \[restore\]|running: |fault after quiesce: luoagent|reboot refused: luoagent|"
                   r"kernel: KHO: exec from|lab-kexec: |restore: luoagent)|^\s*(not )?ok \d+ ")


def configure(parser) -> None:
    parser.add_argument("--console", action="store_true", help="echo the lab VM's whole serial console")


def summarize(diag_lines: list[str]) -> dict:
    """Pull the story's numbers out of the scenario's diag lines (pure; tested on its own)."""
    story: dict = {"phases": [], "vms": {}, "rollbacks": {}}
    for line in diag_lines:
        if m := _PHASE.search(line):
            if not story["rollbacks"] and not any(p["phase"] == m["phase"] for p in story["phases"]):
                story["phases"].append({"phase": m["phase"], "seconds": float(m["s"])})
        elif m := _PREP.search(line):
            story.setdefault("preparation_seconds", float(m["s"]))
        elif m := _COUNTER.search(line):
            story["vms"].setdefault(m["vm"], {}).update(
                counter_before=int(m["before"]), counter_after=int(m["after"]), counter_later=int(m["later"]))
        elif m := _REPORT.search(line):
            story["vms"].setdefault(m["vm"], {}).update(
                blackout_s=float(m["blackout"]), vmstate_bytes=int(m["vmstate"]),
                ram_bytes=int(m["ram"]) << 20, ram_bytes_copied=int(m["copied"]),
                ram_blocks_in_stream_bytes=int(m["blocks"]))
        elif m := _PARTS.search(line):
            story["vms"].setdefault(m["vm"], {})["blackout_parts"] = m["parts"]
        elif m := _KERNELS.search(line):
            story["kernel"] = {"from": m["old"], "to": m["new"]}
        elif m := _ROLLBACK.search(line):
            story["rollbacks"][m["case"]] = m["msg"]
    return story


def render(story: dict, passed: bool, duration: float) -> str:
    out = ["", "=== luoagent live update demo: the lab's kernel was replaced under two running VMs ==="]
    if "kernel" in story:
        out.append(f"kernel {story['kernel']['from']} -> {story['kernel']['to']} by kexec (KHO + LUO), "
                   "guest RAM kept in place in memfds")
    if story["phases"]:
        out.append("luoagent update, phase by phase (inside the lab VM, nested TCG):")
        for p in story["phases"]:
            out.append(f"  {p['phase']:<18} {p['seconds'] * 1000:9.1f} ms")
        if "preparation_seconds" in story:
            out.append(f"  {'then kexec':<18} after {story['preparation_seconds']:.3f} s of preparation")
    for name, v in sorted(story["vms"].items()):
        out.append(f"VM {name}:")
        if "counter_before" in v:
            out.append(f"  guest counter   {v['counter_before']:,} before update -> {v['counter_after']:,} after "
                       f"restore -> {v['counter_later']:,} 0.5 s later (it kept counting, no reboot)")
        if "vmstate_bytes" in v:
            pct = 100.0 * v["vmstate_bytes"] / max(v["ram_bytes"], 1)
            out.append(f"  guest RAM       {v['ram_bytes'] >> 20} MiB stayed in place: QEMU migrated RAM blocks of "
                       f"{v['ram_blocks_in_stream_bytes']:,} B in all (firmware; less than the guest's RAM), "
                       f"wrote at most {v['ram_bytes_copied']:,} B of RAM pages; vmstate {v['vmstate_bytes']:,} B "
                       f"({pct:.2f} % of RAM)")
            out.append(f"  blackout        {v['blackout_s']:.3f} s from stop to running again")
        if "blackout_parts" in v:
            out.append(f"                  = {v['blackout_parts']}")
    for case, msg in story["rollbacks"].items():
        out.append(f"rollback ({case}): {msg}")
    out.append(f"{'PASS' if passed else 'FAIL'}: scenario {SCENARIO} in {duration:.0f} s wall")
    return "\n".join(out)


def run(args) -> int:
    from luoagent.lab.build import build_lab

    want_json = getattr(args, "json", False)
    # the story goes to stdout, unless stdout is reserved for the JSON result
    say = (lambda s: report.echo("demo", s)) if want_json else (lambda s: print(s, flush=True))
    started = time.monotonic()
    say("luoagent lab demo: building the lab if needed (LUO kernel, Debian rootfs with QEMU 11.1, guest)")
    lab = build_lab(kernel=getattr(args, "kernel", None), kernel_src=getattr(args, "kernel_src", None),
                    progress=Progress("lab"), selftests=False,
                    kernel_version=getattr(args, "kernel_version", "7.2"))
    say(f"lab ready in {time.monotonic() - started:.0f} s: kernel {lab.kernel}")
    say("booting the lab VM: start guests a (luoagent vm start) and b (plain QEMU, adopted), "
        "live-update the kernel under them, restore, then try two rollbacks")

    def echo(line: str) -> None:
        if getattr(args, "console", False):
            report.echo("console", line)
        elif _LIVE.search(line):
            say("  | " + line.strip())

    result = lab.run([SCENARIO], echo=echo)
    sc = result.scenarios.get(SCENARIO)
    diag = [d for t in (sc.tests if sc else []) for d in t.diag] + (sc.diag if sc else [])
    # the KTAP parser attaches diag lines to results; the console has them in order too
    lines = [ln.strip().lstrip("#").strip() for ln in result.console.splitlines() if ln.strip().startswith("#")]
    story = summarize(lines or diag)
    passed = bool(result.ok)
    if want_json:
        print(json.dumps({"ok": passed, "story": story, "lab": result.to_json()}, indent=1))
    else:
        print(render(story, passed, result.duration))
        if not passed:
            print(result.summary())
            print(f"console: {result.console_log}")
    return 0 if passed else 1
