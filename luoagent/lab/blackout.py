"""Time line of each guest's blackout across a lab kexec: the host's console arrival times joined
with the kernels' boot clocks and the bench scenarios' records (bench-liveupdate: the agent's own
reboot(KEXEC) and the full-copy baseline; bench-systemd: luoagent.service + `systemctl kexec`).

Pure arithmetic over what was measured (no lab, no I/O): benchmarks/bench_liveupdate.py feeds it."""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field

#: who spends a segment. "init": what starts the agent after boot (the lab's runner here,
#: systemd on a host); "tool": the baseline's own driver (a script a user would write);
#: "systemd": the orderly shutdown of `systemctl kexec` (stopping units, systemd-shutdown)
KERNEL, QEMU, AGENT, INIT, TOOL, SYSTEMD = "kernel", "QEMU", "luoagent", "init", "tool", "systemd"

#: the kernel log line luoagent.adapters.kexec writes right before reboot(LINUX_REBOOT_CMD_KEXEC)
REBOOT_MARK = "luoagent: reboot(LINUX_REBOOT_CMD_KEXEC) now, boottime_ns="
LAST_OLD_KERNEL_LINE = "kexec_core: Starting new kernel"
RESULT_MARK = "# bench-result "
COLDSTART_MARK = "# bench-coldstart "
CLOCK_MARK = "luoagent-bench: boottime_ns="
#: the stage line of each bench scenario -> its path family (how its kexec is found on the console)
STAGE_MARKS = {"# lab-stage: bench-liveupdate ": "direct", "# lab-stage: bench-systemd ": "systemd"}
#: systemd-shutdown's lines on the console (kmsg): its first one, and its last before it forks
#: `kexec -e` (or calls reboot(RB_KEXEC) itself)
SHUTDOWN_TAG = "systemd-shutdown[1]:"
SHUTDOWN_REBOOT_LINE = "systemd-shutdown[1]: Rebooting with kexec."
_PRINTK = re.compile(r"^\[\s*(\d+\.\d+)\]\s?(.*)$")
_INIT = re.compile(r"Run (\S+) as init process")
GIB = 1 << 30
#: how far a segment may run backwards before the clocks joined for it count as disagreeing
#: (the console's arrival times are read in ms steps; printk and boot clocks drift apart slowly)
CLOCK_SLACK_S = 0.05

#: (segment, owner) in time-line order, per path; each segment's ends are named in _events
SEGMENTS = {
    "luoagent": [
        ("save", QEMU), ("prepare reboot", AGENT), ("kernel shutdown", KERNEL), ("kexec jump + decompress", KERNEL),
        ("kernel boot", KERNEL), ("init starts agent", INIT), ("agent start", AGENT), ("manifest", AGENT),
        ("wait for other VMs", AGENT), ("LUO retrieve", KERNEL), ("RAM sample check", AGENT),
        ("QEMU start", QEMU), ("vmstate load", QEMU), ("cont", QEMU),
    ],
    "baseline": [
        ("save", QEMU), ("flush to disk", KERNEL), ("kernel shutdown", KERNEL), ("kexec jump + decompress", KERNEL),
        ("kernel boot", KERNEL), ("init starts tool", INIT), ("tool", TOOL),
        ("QEMU start", QEMU), ("load RAM from disk", QEMU), ("cont", QEMU),
    ],
    # luoagent.service does the update, `systemctl kexec`, and restores at boot (bench-systemd)
    "systemd": [
        ("save", QEMU), ("until systemctl kexec", AGENT), ("orderly shutdown: stop units", SYSTEMD),
        ("orderly shutdown: systemd-shutdown", SYSTEMD), ("kexec -e + kernel shutdown", KERNEL),
        ("kexec jump + decompress", KERNEL), ("kernel boot", KERNEL),
        ("systemd starts luoagent.service", INIT), ("agent start", AGENT), ("manifest", AGENT),
        ("wait for other VMs", AGENT), ("LUO retrieve", KERNEL), ("RAM sample check", AGENT),
        ("QEMU start", QEMU), ("vmstate load", QEMU), ("cont", QEMU),
    ],
}
OWNERS = (KERNEL, QEMU, AGENT, INIT, SYSTEMD, TOOL)


class TimelineError(ValueError):
    """A run's time line cannot be built from what was recorded (a mark is missing)."""


@dataclass
class Crossing:
    """One kexec as the host saw it, seconds on the host's monotonic clock (from QEMU start)."""
    #: the reboot call: luoagent's reboot mark (written right before the syscall), see crossing();
    #: under systemd, systemd-shutdown's "Rebooting with kexec." line, see systemd_crossing()
    reboot_call: float
    reboot_call_boot_ns: int    # the old kernel's CLOCK_BOOTTIME at that call
    jump: float                 # arrival of the old kernel's last line ("Starting new kernel")
    kernel_zero: float          # the new kernel's clock 0: min over its lines of (arrival - printk time)
    init_s: float               # the new kernel's clock when it ran init ("Run ... as init process")
    lines: int                  # new-kernel lines with a printk time the estimate used
    #: CLOCK_BOOTTIME minus the printk clock in the new boot (the scenario's clock mark), seconds
    boot_minus_printk: float = 0.0
    #: systemd path only: systemd-shutdown's first line (PID 1 stopped every unit and exec'd it)
    shutdown_started: float | None = None

    def host_new(self, boot_ns: int) -> float:
        """The new boot's CLOCK_BOOTTIME -> host seconds."""
        return self.kernel_zero + boot_ns / 1e9 - self.boot_minus_printk


def parse_console(rows: list[tuple[float, str]]) -> tuple[dict[int, Crossing], list[dict], list[str]]:
    """(kexec crossings by run index, bench-result records, problems) from a console with arrival times.

    Run i's kexec happens while stage i+1 (1-based "i+1/N") runs; the next stage's clock mark closes it."""
    crossings: dict[int, Crossing] = {}
    records: list[dict] = []
    problems: list[str] = []
    stage_starts: list[tuple[int, int, str]] = []  # (row index, stage number 1-based, path family)
    for n, (_t, line) in enumerate(rows):
        text = line.strip()
        mark = next((m for m in STAGE_MARKS if text.startswith(m)), None)
        if mark:
            stage_starts.append((n, int(text[len(mark):].split("/")[0]), STAGE_MARKS[mark]))
        elif text.startswith(RESULT_MARK):
            try:
                records.append(json.loads(text[len(RESULT_MARK):]))
            except ValueError:
                problems.append(f"console line {n + 1}: a bench-result line is garbled (interleaved output?)")
    jumps = [n for n, (_t, line) in enumerate(rows) if LAST_OLD_KERNEL_LINE in line]
    for k, jump in enumerate(jumps):
        before = [(n, st, fam) for n, st, fam in stage_starts if n < jump]
        if not before:
            continue  # a kexec before the benchmark's first stage
        start, stage, family = before[-1]
        # to the new boot's clock mark (written first thing by the next stage), or the next kexec
        end = jumps[k + 1] if k + 1 < len(jumps) else len(rows)
        mark = next((n for n in range(jump, end) if CLOCK_MARK in rows[n][1]), end - 1)
        try:
            crossings[stage - 1] = (systemd_crossing if family == "systemd" else crossing)(rows[start:mark + 1])
        except TimelineError as exc:
            problems.append(f"run {stage}: {exc}")
    return crossings, records, problems


def crossing(window: list[tuple[float, str]]) -> Crossing:
    """The kexec inside one stage's console window (see Crossing)."""
    jump_at = max((i for i, (_t, ln) in enumerate(window) if LAST_OLD_KERNEL_LINE in ln), default=None)
    if jump_at is None:
        raise TimelineError(f"no {LAST_OLD_KERNEL_LINE!r} line")
    marks = [(i, t, ln) for i, (t, ln) in enumerate(window[:jump_at]) if REBOOT_MARK in ln]
    if not marks:
        raise TimelineError("no reboot mark before the kexec (was the reboot made through luoagent.adapters.kexec?)")
    _i, mark_t, mark_line = marks[-1]
    try:
        mark_ns = int(mark_line.split(REBOOT_MARK, 1)[1].split()[0])
    except (IndexError, ValueError):
        raise TimelineError(f"reboot mark without a clock reading: {mark_line!r}") from None
    zero, used, init_s, delta = _new_boot(window[jump_at + 1:])
    # The console may print the mark late (a printing thread; the kexec path flushes it), so the
    # call's host time comes from the last line's arrival (flushed before the jump) minus the
    # two lines' distance on the old kernel's printk clock; without printk times, the arrival.
    jump_t = window[jump_at][0]
    pm, pj = _PRINTK.match(mark_line.strip()), _PRINTK.match(window[jump_at][1].strip())
    reboot_call = jump_t - (float(pj.group(1)) - float(pm.group(1))) if pm and pj else mark_t
    return Crossing(reboot_call=reboot_call, reboot_call_boot_ns=mark_ns, jump=jump_t,
                    kernel_zero=zero, init_s=init_s, lines=used, boot_minus_printk=delta)


def systemd_crossing(window: list[tuple[float, str]]) -> Crossing:
    """The `systemctl kexec` inside one bench-systemd stage's console window. No luoagent code
    runs at the reboot: systemd-shutdown's own kmsg lines mark its start and its reboot call, and
    the old boot's clock marks (the scenario's, printk time + CLOCK_BOOTTIME) put the agent's
    boot clock stamps on the same printk clock; the jump line's arrival anchors that clock on
    the host's (it is flushed before the jump)."""
    jump_at = max((i for i, (_t, ln) in enumerate(window) if LAST_OLD_KERNEL_LINE in ln), default=None)
    if jump_at is None:
        raise TimelineError(f"no {LAST_OLD_KERNEL_LINE!r} line")
    old = [(t, _PRINTK.match(ln.strip())) for t, ln in window[:jump_at + 1]]
    old = [(t, float(m.group(1)), m.group(2)) for t, m in old if m]
    if not old or LAST_OLD_KERNEL_LINE not in old[-1][2]:
        raise TimelineError(f"the old kernel's {LAST_OLD_KERNEL_LINE!r} line has no printk time (printk.time=1?)")
    jump_t, jump_p = window[jump_at][0], old[-1][1]
    clock = [(p, text) for _t, p, text in old if CLOCK_MARK in text]
    if not clock:
        raise TimelineError(f"no {CLOCK_MARK!r} line with a printk time in the old boot (the scenario writes it)")
    p_mark, text = clock[-1]  # the last one: nearest the kexec (little drift between the clocks)
    try:
        old_delta = int(text.split(CLOCK_MARK, 1)[1].split()[0]) / 1e9 - p_mark
    except (IndexError, ValueError):
        raise TimelineError(f"clock mark without a reading: {text!r}") from None
    shutdown = [p for _t, p, text in old if text.startswith(SHUTDOWN_TAG)]
    rebooting = [p for _t, p, text in old if text.startswith(SHUTDOWN_REBOOT_LINE)]
    if not shutdown or not rebooting:
        raise TimelineError(f"no {SHUTDOWN_TAG!r} lines / no {SHUTDOWN_REBOOT_LINE!r} line with a printk time "
                            "before the kexec (did systemd-shutdown do it?)")
    zero, used, init_s, delta = _new_boot(window[jump_at + 1:])
    host = lambda p: jump_t - (jump_p - p)  # old printk clock -> host seconds
    return Crossing(reboot_call=host(rebooting[-1]), reboot_call_boot_ns=int(round((rebooting[-1] + old_delta) * 1e9)),
                    jump=jump_t, kernel_zero=zero, init_s=init_s, lines=used, boot_minus_printk=delta,
                    shutdown_started=host(shutdown[0]))


def _new_boot(rows: list[tuple[float, str]]) -> tuple[float, int, float, float]:
    """(the new kernel's clock 0 in host seconds, lines used, its clock at init, CLOCK_BOOTTIME
    minus its printk clock) from the console after the jump."""
    zero, used, init_s, booted, delta = None, 0, None, False, None
    for t, ln in rows:
        m = _PRINTK.match(ln.strip())
        if not m:
            booted = booted or ln.lstrip().startswith("# lab-boot:")
            continue
        stamp = float(m.group(1))
        if CLOCK_MARK in m.group(2) and delta is None:
            delta = int(m.group(2).split(CLOCK_MARK, 1)[1].split()[0]) / 1e9 - stamp
        if booted:
            continue  # after init: user space lines, printed late under load, add nothing
        used += 1
        zero = t - stamp if zero is None else min(zero, t - stamp)
        if init_s is None and _INIT.search(m.group(2)):
            init_s = stamp
    if zero is None:
        raise TimelineError("the new kernel printed no line with a printk time (printk.time=1 on its command line?)")
    if init_s is None:
        raise TimelineError("no 'Run ... as init process' line from the new kernel")
    if delta is None:
        raise TimelineError(f"no {CLOCK_MARK!r} line in the new boot (the scenario writes it first)")
    return zero, used, init_s, delta


def parse_cold_start(rows: list[tuple[float, str]]) -> dict:
    """The in-lab cold start samples ({variant: [seconds]}) as median/spread, {} if none."""
    for _t, line in rows:
        text = line.strip()
        if text.startswith(COLDSTART_MARK):
            try:
                return {k: median_spread(v) for k, v in json.loads(text[len(COLDSTART_MARK):]).items()}
            except (ValueError, AttributeError):
                return {}
    return {}


# --- one run -> per-VM time lines --------------------------------------------------------------
@dataclass
class VmTimeline:
    name: str
    ram_bytes: int
    segments: dict[str, float]          # segment -> seconds, in SEGMENTS order
    restored: bool = True

    @property
    def blackout(self) -> float:
        return sum(self.segments.values())

    def by_owner(self, path: str) -> dict[str, float]:
        out = dict.fromkeys(OWNERS, 0.0)
        for seg, owner in SEGMENTS[path]:
            out[owner] += self.segments.get(seg, 0.0)
        return out


@dataclass
class RunTimeline:
    index: int
    path: str
    ram_mib: int
    vms_count: int
    restored: bool
    vms: list[VmTimeline] = field(default_factory=list)
    figures: dict = field(default_factory=dict)   # bytes written/read, preserve s/GiB, retrieve s/GiB

    @property
    def config(self) -> str:
        return config_name(self.ram_mib, self.vms_count)

    def worst(self) -> VmTimeline:
        """The guest that waited longest: its blackout is the run's."""
        return max(self.vms, key=lambda v: v.blackout)


def config_name(ram_mib: int, vms: int) -> str:
    size = f"{ram_mib // 1024}GiB" if ram_mib >= 1024 and ram_mib % 1024 == 0 else f"{ram_mib}MiB"
    return f"{vms}x{size}"


def _seg(pairs: list[tuple[str, float, float]]) -> dict[str, float]:
    out = {}
    for name, a, b in pairs:
        out[name] = b - a
    return out


def run_timeline(record: dict, cross: Crossing) -> RunTimeline:
    """Every guest's segments for one run (record: the scenario's bench-result line)."""
    path = record["path"]
    run = RunTimeline(record["index"], path, record["ram_mib"], record["vms"], bool(record.get("restored")))
    old, new = record["old"], record["new"]

    def host_old(boot_ns: int) -> float:  # old kernel's boot clock -> host seconds, anchored at the mark
        return cross.reboot_call - (cross.reboot_call_boot_ns - boot_ns) / 1e9

    host_new = cross.host_new

    init = cross.kernel_zero + cross.init_s
    common_kexec = [("kernel shutdown", cross.reboot_call, cross.jump),
                    ("kexec jump + decompress", cross.jump, cross.kernel_zero),
                    ("kernel boot", cross.kernel_zero, init)]
    if path in ("luoagent", "systemd"):
        upd = {v["name"]: v for v in new.get("update", {}).get("vms", [])}
        rst = new.get("restore", {})
        rvms = {v["name"]: v for v in rst.get("vms", [])}
        clock = rst.get("boot_clock_ns", {})
        offset = old["clock_pair"][0] - old["clock_pair"][1]  # realtime - boottime in the old boot
        if path == "systemd":
            if not rst.get("kexec_requested_ns") or cross.shutdown_started is None:
                raise TimelineError(f"run {run.index}: the restore recorded no `systemctl kexec` call "
                                    "(kexec_requested_ns) or the console no systemd-shutdown")
            if new.get("service_restarts"):
                raise TimelineError(f"run {run.index}: luoagent.service restarted {new['service_restarts']} time(s) "
                                    "in the new boot: its start is not the boot's")
            request = host_old(rst["kexec_requested_ns"] - offset)
            started = new["service_start_boot_ns"]
            before_agent = [("orderly shutdown: stop units", request, cross.shutdown_started),
                            ("orderly shutdown: systemd-shutdown", cross.shutdown_started, cross.reboot_call),
                            ("kexec -e + kernel shutdown", cross.reboot_call, cross.jump), *common_kexec[1:],
                            ("systemd starts luoagent.service", init, host_new(started))]
        else:
            started = new["restore_exec_boot_ns"]
            before_agent = [*common_kexec, ("init starts agent", init, host_new(started))]
        for name in old["names"]:
            u, r = upd.get(name), rvms.get(name)
            if not u or not r or not clock:
                raise TimelineError(f"run {run.index}: VM {name} missing from the update or restore output")
            t = r["timings"]
            need = ("retrieve_boot_ns", "retrieved_boot_ns", "qemu_launch_boot_ns", "qemu_up_boot_ns",
                    "incoming_done_boot_ns", "running_boot_ns")
            if any(k not in t for k in need):
                raise TimelineError(f"run {run.index}: VM {name}: restore recorded no {[k for k in need if k not in t]}")
            stop = host_old(u["stopped_at_ns"] - offset)
            saved = stop + u["quiesce_seconds"]
            to_reboot = (("until systemctl kexec", saved, request) if path == "systemd"
                         else ("prepare reboot", saved, cross.reboot_call))
            segs = _seg([("save", stop, saved), to_reboot, *before_agent,
                         ("agent start", host_new(started), host_new(clock["luo_open_boot_ns"])),
                         ("manifest", host_new(clock["luo_open_boot_ns"]), host_new(clock["manifest_retrieved_boot_ns"])),
                         ("wait for other VMs", host_new(clock["manifest_retrieved_boot_ns"]), host_new(t["retrieve_boot_ns"])),
                         ("LUO retrieve", host_new(t["retrieve_boot_ns"]), host_new(t["retrieved_boot_ns"])),
                         ("RAM sample check", host_new(t["retrieved_boot_ns"]), host_new(t["qemu_launch_boot_ns"])),
                         ("QEMU start", host_new(t["qemu_launch_boot_ns"]), host_new(t["qemu_up_boot_ns"])),
                         ("vmstate load", host_new(t["qemu_up_boot_ns"]), host_new(t["incoming_done_boot_ns"])),
                         ("cont", host_new(t["incoming_done_boot_ns"]), host_new(t["running_boot_ns"]))])
            if path == "systemd":
                backwards = {k: v for k, v in segs.items() if v < -CLOCK_SLACK_S}
                if backwards:  # the clocks joined here disagree: no figure from them
                    raise TimelineError(f"run {run.index}: VM {name}: segments run backwards {backwards}")
            restored = bool(new["vms"].get(name, {}).get("restored"))
            run.vms.append(VmTimeline(name, u["ram_bytes"], segs, restored))
        phases = {p.get("phase"): p.get("seconds", 0.0) for p in new.get("update", {}).get("phases", [])}
        ram = sum(v.ram_bytes for v in run.vms) or 1
        run.figures = {
            "bytes_written": sum(u.get("vmstate_bytes") or 0 for u in upd.values()),
            "bytes_read": sum(u.get("vmstate_bytes") or 0 for u in upd.values()),
            "preserve_s_per_gib": phases.get("preserve-ram", 0.0) / (ram / GIB),
            "sync_before_quiesce_s": phases.get("sync", 0.0),
            "luo_retrieve_s_per_gib": sum(v.segments["LUO retrieve"] for v in run.vms) / (ram / GIB),
            "ram_sample_ms_per_gib": statistics.mean(u.get("ram_sample_ms_per_gib") or 0.0 for u in upd.values()),
            # parallel quiesce: the phase lasts about the slowest VM's stop+save, not their sum
            "quiesce_phase_s": phases.get("quiesce", 0.0),
            "quiesce_slowest_vm_s": max(u.get("quiesce_seconds") or 0.0 for u in upd.values()),
            "quiesce_sum_s": sum(u.get("quiesce_seconds") or 0.0 for u in upd.values()),
            "stop_spread_s": (max(u["stopped_at_ns"] for u in upd.values())
                              - min(u["stopped_at_ns"] for u in upd.values())) / 1e9,
        }
        if path == "systemd":  # the "orderly shutdown": the systemctl kexec call -> the jump
            run.figures["orderly_shutdown_s"] = cross.jump - request
    else:
        for name in old["names"]:
            o, n = old["vms"].get(name, {}), new["vms"].get(name, {})
            t = n.get("timings", {})
            need = ("qemu_launch_boot_ns", "qemu_up_boot_ns", "incoming_done_boot_ns", "running_boot_ns")
            if "stop_boot_ns" not in o or any(k not in t for k in need):
                raise TimelineError(f"run {run.index}: baseline VM {name}: {n.get('why') or 'timings missing'}")
            segs = _seg([("save", host_old(o["stop_boot_ns"]), host_old(o["saved_boot_ns"])),
                         ("flush to disk", host_old(o["saved_boot_ns"]), cross.reboot_call), *common_kexec,
                         ("init starts tool", init, host_new(new["load_started_boot_ns"])),
                         ("tool", host_new(new["load_started_boot_ns"]), host_new(t["qemu_launch_boot_ns"])),
                         ("QEMU start", host_new(t["qemu_launch_boot_ns"]), host_new(t["qemu_up_boot_ns"])),
                         ("load RAM from disk", host_new(t["qemu_up_boot_ns"]), host_new(t["incoming_done_boot_ns"])),
                         ("cont", host_new(t["incoming_done_boot_ns"]), host_new(t["running_boot_ns"]))])
            run.vms.append(VmTimeline(name, record["ram_mib"] << 20, segs, bool(n.get("restored"))))
        streams = sum(old["vms"][n].get("stream_bytes", 0) for n in old["names"])
        run.figures = {"bytes_written": streams, "bytes_read": streams}
    run.restored = run.restored and len(run.vms) == record["vms"] and all(v.restored for v in run.vms)
    return run


# --- aggregation --------------------------------------------------------------------------------
def median_spread(values: list[float]) -> dict:
    """{"median", "min", "max", "n"}; an empty list is an error (no figure from no measurement)."""
    if not values:
        raise ValueError("no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class Row:
    """One configuration and path over its repeats. ``ok`` False: no figure may be shown."""
    config: str
    path: str
    ram_mib: int
    vms: int
    runs: list[RunTimeline] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and not self.problems and all(r.restored for r in self.runs)

    def figures(self) -> dict:
        """Medians over repeats of the worst guest's blackout, its segments and owners, and the figures."""
        if not self.ok:
            raise ValueError(f"row {self.config} {self.path} has no valid figure: {'; '.join(self.why())}")
        worst = [r.worst() for r in self.runs]
        out = {"blackout_s": median_spread([w.blackout for w in worst]),
               "segments_s": {s: statistics.median(w.segments[s] for w in worst) for s, _o in SEGMENTS[self.path]},
               "owners_s": {o: statistics.median(w.by_owner(self.path)[o] for w in worst) for o in OWNERS}}
        out["agent_share_s"] = out["owners_s"][AGENT]
        out["agent_share_pct"] = 100.0 * out["agent_share_s"] / out["blackout_s"]["median"]
        keys = sorted({k for r in self.runs for k in r.figures})
        out["figures"] = {k: statistics.median(r.figures[k] for r in self.runs if k in r.figures) for k in keys}
        return out

    def why(self) -> list[str]:
        out = list(self.problems)
        if not self.runs:
            out.append("no run recorded")
        for r in self.runs:
            for v in r.vms:
                if not v.restored:
                    out.append(f"run {r.index}: guest {v.name} NOT restored")
            if not r.restored and all(v.restored for v in r.vms):
                out.append(f"run {r.index}: not every guest came back")
        return out


def build_rows(plan: list[dict], crossings: dict[int, Crossing], records: list[dict],
               problems: list[str] = ()) -> list[Row]:
    """Rows in plan order (first appearance of each config+path); every planned run must be there."""
    rows: dict[tuple, Row] = {}
    by_index = {r.get("index"): r for r in records}
    for i, run in enumerate(plan):
        key = (run["ram_mib"], run["vms"], run["path"])
        row = rows.setdefault(key, Row(config_name(run["ram_mib"], run["vms"]), run["path"], run["ram_mib"], run["vms"]))
        rec = by_index.get(i)
        if rec is None:
            row.problems.append(f"run {i}: no result (the stage failed or its line was lost)")
            continue
        if not rec.get("restored"):
            row.problems.append(f"run {i}: not every guest was restored")
        if i not in crossings:
            row.problems.append(f"run {i}: its kexec was not found on the console")
            continue
        try:
            row.runs.append(run_timeline(rec, crossings[i]))
        except (TimelineError, KeyError, TypeError) as exc:
            row.problems.append(f"run {i}: {type(exc).__name__}: {exc}")
    return list(rows.values())


def ratios(rows: list[Row]) -> list[dict]:
    """baseline / luoagent per configuration where both rows are valid."""
    by = {(r.config, r.path): r for r in rows}
    out = []
    for r in rows:
        if r.path != "luoagent" or (r.config, "baseline") not in by:
            continue
        b = by[(r.config, "baseline")]
        if not (r.ok and b.ok):
            continue
        fl, fb = r.figures(), b.figures()
        out.append({"config": r.config,
                    "blackout": fb["blackout_s"]["median"] / fl["blackout_s"]["median"],
                    "bytes_written": fb["figures"]["bytes_written"] / max(fl["figures"]["bytes_written"], 1),
                    "bytes_read": fb["figures"]["bytes_read"] / max(fl["figures"]["bytes_read"], 1)})
    return out


def exit_code(rows: list[Row]) -> int:
    """Non-zero when any row has no valid figure (a guest not really restored, a mark missing)."""
    return 0 if rows and all(r.ok for r in rows) else 1


# --- output -------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    head = (f"{'config':>9} {'path':8} {'blackout s (min-max)':>24} {'kernel':>7} {'QEMU':>7} {'agent':>7}"
            f" {'init':>6} {'systemd':>7} {'tool':>6} {'agent %':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if not r.ok:
            lines.append(f"{r.config:>9} {r.path:8} NO FIGURE: {'; '.join(r.why())[:160]}")
            continue
        f = r.figures()
        b, o = f["blackout_s"], f["owners_s"]
        lines.append(f"{r.config:>9} {r.path:8} {b['median']:9.3f} ({b['min']:.3f}-{b['max']:.3f})"
                     f" {o[KERNEL]:7.3f} {o[QEMU]:7.3f} {o[AGENT]:7.3f} {o[INIT]:6.3f} {o[SYSTEMD]:7.3f} {o[TOOL]:6.3f}"
                     f" {f['agent_share_pct']:6.1f}%")
    return "\n".join(lines)


def segment_table(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if not r.ok:
            continue
        f = r.figures()
        parts = ", ".join(f"{s} [{o}] {f['segments_s'][s]:.3f}" for s, o in SEGMENTS[r.path])
        lines.append(f"{r.config} {r.path}: {parts}")
    return "\n".join(lines)


def ratio_table(rows: list[Row]) -> str:
    lines = [f"{'config':>9} {'blackout b/l':>13} {'bytes written b/l':>18} {'bytes read b/l':>15}"]
    for q in ratios(rows):
        lines.append(f"{q['config']:>9} {q['blackout']:12.1f}x {q['bytes_written']:17.0f}x {q['bytes_read']:14.0f}x")
    return "\n".join(lines)


def to_json(rows: list[Row]) -> dict:
    out = []
    for r in rows:
        d = {"config": r.config, "path": r.path, "ram_mib": r.ram_mib, "vms": r.vms, "ok": r.ok}
        if r.ok:
            d.update(r.figures())
            d["runs"] = [{"index": run.index, "worst_vm": run.worst().name, "blackout_s": run.worst().blackout,
                          "segments_s": run.worst().segments, "figures": run.figures,
                          "vms": {v.name: v.blackout for v in run.vms}} for run in r.runs]
        else:
            d["why"] = r.why()  # no figure for a row that did not restore
        out.append(d)
    return {"rows": out, "ratios": ratios(rows), "ok": exit_code(rows) == 0}
