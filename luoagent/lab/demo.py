"""`luoagent lab demo`: build the lab if needed, run the kernel-change scenario in it and tell the
story: guests keep counting while the lab's kernel is replaced by another release and back
(7.2 -> 7.3 -> 7.2); `--scenario vm-update` tells the same-kernel story with its rollbacks.
Then (unless `--no-linux-guest`) the linux-guest scenario in the same VM: a Linux guest's disk
records, memory checksum and TCP service across a kexec.

The scenario does the work inside the lab VM (vm start, luoagent update → kexec, luoagent restore,
rollbacks); this module echoes its progress live and summarises its KTAP/diag lines."""

from __future__ import annotations

import json
import re
import time

from luoagent import report
from luoagent.report import Progress

SCENARIO = "kernel-change"
SCENARIOS = ("kernel-change", "vm-update")

# kernel-change's diag lines (luoagent/lab/scenarios/kernel_change.py)
_HOP_PHASE = re.compile(r"update (?P<hop>[\d.]+->[\d.]+): \[update\] (?P<phase>[\w-]+) done in (?P<s>[\d.]+) s")
_HOP_ABI = re.compile(r"update (?P<hop>[\d.]+->[\d.]+): \[update\]\s+LUO ABI identical: (?P<abi>.*)")
_HOP_SAMPLE = re.compile(r"update (?P<hop>[\d.]+->[\d.]+): \[update\]\s+(?P<vm>\S+): stop.*RAM sample hashed in "
                         r"(?P<ms>[\d.]+) ms \((?P<per>[\d.]+) ms/GiB\)")
_ON_RELEASE = re.compile(r"guest (?P<vm>\S+) on (?P<rel>\S+): counter (?P<before>\d+) -> (?P<after>\d+) -> "
                         r"(?P<later>\d+), blackout (?P<blackout>[\d.]+) s")
_SAMPLE_REFUSED = re.compile(r"restore on [\d.]+: \[restore\] (?P<vm>\S+): FAILED: (?P<msg>.*)")
_RELEASES = re.compile(r"releases crossed: (?P<rel>.*)")

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
_LIVE = re.compile(r"# (guest |update [\d.]+->[\d.]+: \[update\] \S+ (done|FAILED)|releases crossed|"
                   r"restore on [\d.]+: \[restore\]|update: \[update\] \S+ (done|FAILED)|update: \[update\]\s+\S+: (stop|ram0)|"
                   r"restore: \[restore\]|running: |fault after quiesce: luoagent|reboot refused: luoagent|"
                   r"kernel: KHO: exec from|lab-kexec: |restore: luoagent)|^\s*(not )?ok \d+ ")


def configure(parser) -> None:
    parser.add_argument("--console", action="store_true", help="echo the lab VM's whole serial console")
    parser.add_argument("--scenario", choices=SCENARIOS, default=SCENARIO,
                        help=f"which story: {SCENARIOS[0]} (7.2 -> 7.3 -> 7.2, default) or {SCENARIOS[1]} "
                        "(same kernel, with rollbacks)")
    parser.add_argument("--no-linux-guest", action="store_true",
                        help="skip the Linux guest's story (it adds several minutes under nested TCG)")


#: linux-guest diag lines worth telling (luoagent/lab/scenarios/linux_guest.py)
_GUEST_NOTE = re.compile(r"(Linux guest booted on the host|saved Linux guest loaded|first answer|"
                         r"Linux guest (before update|after restore)|restore: \[restore\] lg: running|disk: )")


def linux_guest_story(checks: list[tuple[bool, str]], diag_lines: list[str]) -> dict:
    """The Linux guest's results and the diag lines that tell its story (pure)."""
    notes = [ln.strip() for ln in diag_lines if _GUEST_NOTE.search(ln)]
    return {"checks": [{"ok": ok, "check": desc} for ok, desc in checks],
            "notes": [n.replace("restore: [restore] lg: ", "restore: ") for n in notes]}


def render_linux_guest(story: dict, passed: bool, duration: float) -> str:
    out = ["", "=== a Linux guest (lab kernel + static C init; virtio-blk records, virtio-net on tap0/br0) "
               "across luoagent update -> kexec -> restore ==="]
    out += [f"  {'ok    ' if c['ok'] else 'NOT OK'} {c['check']}" for c in story["checks"]]
    out += [f"  | {n}" for n in story["notes"]]
    if not story["checks"]:
        out.append("  (the linux-guest scenario reported nothing)")
    out.append(f"{'PASS' if passed else 'FAIL'}: scenario linux-guest; {duration:.0f} s wall for the whole demo run "
               "(both scenarios)")
    return "\n".join(out)


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


def summarize_releases(diag_lines: list[str]) -> dict:
    """The kernel-change story: per hop its phases, ABI and sample cost; per guest and release
    its counter and blackout; the corrupted-sample refusal; the releases crossed (pure)."""
    story: dict = {"hops": {}, "guests": [], "refused": {}, "releases": []}
    for line in diag_lines:
        if m := _HOP_PHASE.search(line):
            story["hops"].setdefault(m["hop"], {"phases": []})["phases"].append((m["phase"], float(m["s"])))
        elif m := _HOP_ABI.search(line):
            story["hops"].setdefault(m["hop"], {"phases": []})["abi"] = m["abi"].strip()
        elif m := _HOP_SAMPLE.search(line):
            story["hops"].setdefault(m["hop"], {"phases": []}).setdefault("sample", {})[m["vm"]] = float(m["per"])
        elif m := _ON_RELEASE.search(line):
            story["guests"].append({"vm": m["vm"], "release": m["rel"], "before": int(m["before"]),
                                    "after": int(m["after"]), "later": int(m["later"]),
                                    "blackout_s": float(m["blackout"])})
        elif m := _SAMPLE_REFUSED.search(line):
            story["refused"][m["vm"]] = m["msg"]
        elif m := _RELEASES.search(line):
            story["releases"] = [r.strip() for r in m["rel"].split("->")]
    return story


def render_releases(story: dict, passed: bool, duration: float) -> str:
    rel = " -> ".join(story["releases"]) or "?"
    out = ["", f"=== luoagent live update demo: running VMs carried across kernel releases {rel} ==="]
    for hop, h in story["hops"].items():
        phases = ", ".join(f"{p} {s * 1000:.0f} ms" for p, s in h["phases"])
        out.append(f"update {hop}: {phases}")
        if "abi" in h:
            out.append(f"  landing-side preflight: LUO ABI identical ({h['abi']})")
        for vm, per in h.get("sample", {}).items():
            out.append(f"  {vm}: RAM sample hashed after stop, {per:.1f} ms/GiB")
    for g in story["guests"]:
        out.append(f"guest {g['vm']} on {g['release']}: counter {g['before']:,} before update -> {g['after']:,} "
                   f"after restore -> {g['later']:,} 0.5 s later; blackout {g['blackout_s']:.3f} s")
    for vm, msg in story["refused"].items():
        out.append(f"guest {vm} (one sampled RAM page corrupted on purpose): {msg}")
    out.append(f"{'PASS' if passed else 'FAIL'}: scenario kernel-change in {duration:.0f} s wall")
    return "\n".join(out)


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
    out.append(f"{'PASS' if passed else 'FAIL'}: scenario vm-update in {duration:.0f} s wall")
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
    scenario = getattr(args, "scenario", SCENARIO)
    if scenario == "kernel-change":
        say("booting the lab VM: start guests a and b on 7.2, update them into the 7.3 kernel, restore "
            "(b's RAM sample corrupted on purpose: refused), then carry a back to 7.2")
    else:
        say("booting the lab VM: start guests a (luoagent vm start) and b (plain QEMU, adopted), "
            "live-update the kernel under them, restore, then try two rollbacks")

    def echo(line: str) -> None:
        if getattr(args, "console", False):
            report.echo("console", line)
        elif _LIVE.search(line):
            say("  | " + line.strip())

    with_guest = not getattr(args, "no_linux_guest", False)
    if with_guest:
        say("then, in the same lab VM: a Linux guest (booted on the host, resumed there) across one more update")
    result = lab.run([scenario, *(["linux-guest"] if with_guest else [])], echo=echo)
    sc = result.scenarios.get(scenario)
    diag = [d for t in (sc.tests if sc else []) for d in t.diag] + (sc.diag if sc else [])
    # the KTAP parser attaches diag lines to results; the console has them in order too
    lines = [ln.strip().lstrip("#").strip() for ln in result.console.splitlines() if ln.strip().startswith("#")]
    # the main story ends where the Linux guest's scenario begins (its VM "lg" is not one of it)
    lines = lines[:next((i for i, ln in enumerate(lines) if ln == "Subtest: linux-guest"), len(lines))]
    story = (summarize_releases if scenario == "kernel-change" else summarize)(lines or diag)
    passed = bool(result.ok)
    guest_story = None
    if with_guest:
        lg = result.scenarios.get("linux-guest")
        guest_story = linux_guest_story([(t.ok, t.description) for t in (lg.tests if lg else [])],
                                        [d for t in (lg.tests if lg else []) for d in t.diag] + (lg.diag if lg else []))
    if want_json:
        print(json.dumps({"ok": passed, "story": story, "linux_guest": guest_story, "lab": result.to_json()}, indent=1))
    else:
        print((render_releases if scenario == "kernel-change" else render)(story, bool(sc and sc.passed),
                                                                            result.duration))
        if guest_story is not None:
            lg = result.scenarios.get("linux-guest")
            print(render_linux_guest(guest_story, bool(lg and lg.passed), result.duration))
        if not passed:
            print(result.summary())
            print(f"console: {result.console_log}")
    return 0 if passed else 1
