#!/usr/bin/env python3
"""Blackout across a real kexec in the lab: luoagent (RAM kept in place) vs the full-copy baseline
(cpr-reboot without x-ignore-shared into a file, kexec, load back), split into kernel/QEMU/agent;
with --systemd, the path through luoagent.service and `systemctl kexec` on the systemd lab.

Drives the lab scenario bench-liveupdate (or bench-systemd) with a plan of runs, then joins the
console's host arrival times with the kernels' clocks (luoagent/lab/blackout.py). Prints a table
(or --json) and writes a PNG chart. A run whose guests did not really come back prints no figure
and exits 1."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from luoagent.lab import blackout  # noqa: E402

#: (RAM MiB, VMs): the RAM series with one VM, then the VM-count series at 64 MiB
FULL_CONFIGS = [(64, 1), (512, 1), (2048, 1), (64, 2), (64, 4), (64, 8)]
QUICK_CONFIGS = [(64, 1), (64, 2)]
PATHS = ("luoagent", "baseline")
#: --systemd: one path, its own scenario on the systemd flavour of the lab
SYSTEMD_PATHS = ("systemd",)
SYSTEMD_CONFIGS = [(64, 1), (64, 2)]
SCENARIO = {PATHS: "bench-liveupdate", SYSTEMD_PATHS: "bench-systemd"}


def progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_plan(configs: list[tuple[int, int]], repeat: int, paths: tuple[str, ...] = PATHS) -> list[dict]:
    """Every config x path, ``repeat`` times, interleaved so that drift in load hits both paths alike
    (the path that goes first alternates between repeats)."""
    plan = []
    all_paths = paths
    for r in range(repeat):
        paths = all_paths if r % 2 == 0 else all_paths[::-1]
        for ram, vms in configs:
            for path in paths:
                plan.append({"path": path, "ram_mib": ram, "vms": vms})
    return plan


def plan_text(plan: list[dict]) -> str:
    return ",".join(f"{p['path']}:{p['ram_mib']}:{p['vms']}" for p in plan)


def parse_configs(text: str) -> list[tuple[int, int]]:
    """"64x1,2048x1,64x8" -> [(64, 1), (2048, 1), (64, 8)] (RAM MiB x VMs)."""
    out = []
    for part in text.split(","):
        ram, _, vms = part.strip().lower().partition("x")
        if not ram.isdigit() or not vms.isdigit() or int(vms) < 1 or int(ram) < 64:
            raise SystemExit(f"--configs: {part!r} is not MIBxVMS (e.g. 512x1, RAM >= 64 MiB)")
        out.append((int(ram), int(vms)))
    return out


def read_console_times(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        t, _, text = line.partition("\t")
        try:
            rows.append((float(t), text))
        except ValueError:
            continue
    return rows


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
            "cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}


# --- chart --------------------------------------------------------------------------------------
COLORS = {blackout.KERNEL: "#4c72b0", blackout.QEMU: "#dd8452", blackout.AGENT: "#c44e52",
          blackout.INIT: "#8c8c8c", blackout.SYSTEMD: "#8172b3", blackout.TOOL: "#55a868"}
#: bar letter and curve style per path
PATH_STYLE = {"luoagent": ("L", "o-"), "baseline": ("B", "s--"), "systemd": ("S", "^:")}


def chart(rows: list[blackout.Row], path: Path) -> str:
    """Stacked blackout bars per configuration (each path: luoagent, baseline, systemd) and scaling curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is not installed (pip install -e '.[bench]')"
    good = [r for r in rows if r.ok]
    if not good:
        return "no chart: no valid row"
    fig, (bars, ram_ax, vm_ax) = plt.subplots(1, 3, figsize=(16, 5.5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    configs = list(dict.fromkeys(r.config for r in good))
    paths = [p for p in PATH_STYLE if any(r.path == p for r in good)]
    width = 0.76 / len(paths)
    labelled: set[str] = set()
    for k, which in enumerate(paths):
        offset = (k - (len(paths) - 1) / 2) * width
        bottom = [0.0] * len(configs)
        for owner in blackout.OWNERS:
            values = []
            for c in configs:
                row = next((r for r in good if r.config == c and r.path == which), None)
                values.append(row.figures()["owners_s"][owner] if row else 0.0)
            if any(values):
                bars.bar([i + offset for i in range(len(configs))], values, width, bottom=bottom,
                         color=COLORS[owner], edgecolor="white", label=None if owner in labelled else owner)
                labelled.add(owner)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, total in enumerate(bottom):
            if total:
                bars.text(i + offset, total, PATH_STYLE[which][0], ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(len(configs)), configs)
    bars.set_ylabel("guest blackout, s (median; slowest guest)")
    bars.set_title("blackout by owner: " + ", ".join(
        f"{PATH_STYLE[p][0]} = {'full-copy baseline' if p == 'baseline' else p}" for p in paths))
    bars.legend(loc="upper left", fontsize=8)
    for ax, pick, xlabel, xval in ((ram_ax, lambda r: r.vms == 1, "guest RAM, MiB (1 VM)", lambda r: r.ram_mib),
                                   (vm_ax, lambda r: r.ram_mib == 64, "VMs of 64 MiB", lambda r: r.vms)):
        for which, (_letter, style) in ((p, PATH_STYLE[p]) for p in paths):
            pts = sorted(((xval(r), r.figures()["blackout_s"]) for r in good if r.path == which and pick(r)),
                         key=lambda p: p[0])
            if pts:
                xs = [x for x, _f in pts]
                ax.errorbar(xs, [f["median"] for _x, f in pts],
                            yerr=[[f["median"] - f["min"] for _x, f in pts], [f["max"] - f["median"] for _x, f in pts]],
                            fmt=style, capsize=3, label=which)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("blackout, s (median, min-max)")
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Guest blackout across a real kexec (LUO lab, nested TCG)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


# --- cold start ---------------------------------------------------------------------------------
def cold_start(source: Path, repeat: int = 15) -> dict:
    """Host: `python -m luoagent restore` from ``source`` until it fails at its first LUO call (this
    host has no /dev/liveupdate): exec -> first LUO call, wall; plus -X importtime's total."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    walls = []
    root = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))  # never wait on the host's real VM root lock
    cpus = []
    for _ in range(repeat):
        t0, c0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        # cwd outside any checkout: `python -m` puts the cwd first on sys.path
        r = subprocess.run([sys.executable, "-m", "luoagent", "restore", "--vm-root", str(root)],
                           capture_output=True, text=True, env=env, cwd=root)
        walls.append(time.monotonic() - t0)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime)  # less sensitive to load than wall
        if "liveupdate" not in r.stderr:
            raise SystemExit(f"cold start from {source}: restore did not stop at /dev/liveupdate: {r.stderr[-500:]}")
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "luoagent", "restore", "--help"],
                       capture_output=True, text=True, env=env, cwd=root)
    top = 0
    for line in r.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and not parts[2].startswith("  ") and parts[1].strip().isdigit():
            top += int(parts[1])  # cumulative time of each top-level import
    return {"source": str(source), "exec_to_luo_call_s": blackout.median_spread(walls),
            "cpu_s": blackout.median_spread(cpus), "importtime_top_us": top}


def load_run(run_dir: Path, plan: list[dict]):
    """(plan actually reached, crossings, records, problems, not run, console rows) of one run directory."""
    from luoagent.lab.boot import CONSOLE_TIMES

    rows_in = read_console_times(run_dir / CONSOLE_TIMES)
    crossings, records, problems = blackout.parse_console(rows_in)
    not_run = []
    if not any("# lab-done:" in ln for _t, ln in rows_in):
        # a run stopped before its end: only the runs it reached count; say which never ran
        last = max((r.get("index", -1) for r in records), default=-1)
        not_run = [f"run {i}: {p['path']} {blackout.config_name(p['ram_mib'], p['vms'])} (the lab run was stopped first)"
                   for i, p in enumerate(plan) if i > last]
        plan = plan[:last + 1]
    return plan, crossings, records, problems, not_run, rows_in


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration and path (default 3)")
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK_CONFIGS} once each")
    ap.add_argument("--systemd", action="store_true",
                    help="the systemd path instead: luoagent.service, `systemctl kexec`, restore at boot, on the "
                    f"lab's systemd flavour (default configs {SYSTEMD_CONFIGS})")
    ap.add_argument("--configs", help="MIBxVMS list, e.g. 64x1,512x1 (default: the full matrix)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON document")
    ap.add_argument("--chart", default="bench_liveupdate.png", help="PNG chart path (default ./bench_liveupdate.png)")
    ap.add_argument("--kernel", help="LUO bzImage for the lab (default: build / reuse the lab's)")
    ap.add_argument("--console", action="store_true", help="echo the lab VM's console to stderr")
    ap.add_argument("--from-console", metavar="DIR", action="append", default=[],
                    help="no lab run: analyse a run's directory (console-times.tsv, plan.json); repeatable: "
                    "the runs of every directory are pooled")
    ap.add_argument("--cold-start", metavar="SOURCE", action="append", default=[],
                    help="also measure the agent's host cold start from this source tree (repeatable)")
    args = ap.parse_args()
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    paths = SYSTEMD_PATHS if args.systemd else PATHS
    quick, full = (SYSTEMD_CONFIGS, SYSTEMD_CONFIGS) if args.systemd else (QUICK_CONFIGS, FULL_CONFIGS)
    configs = quick if args.quick else parse_configs(args.configs) if args.configs else full
    repeat = 1 if args.quick else args.repeat
    plan = make_plan(configs, repeat, paths)
    host_before = machine()
    started = time.monotonic()
    lab_ok, lab_summary = True, ""
    if args.from_console:
        run_dirs = [Path(d) for d in args.from_console]
    else:
        from luoagent.lab.build import build_lab
        from luoagent.report import Progress

        progress(f"{len(plan)} runs ({len(plan)} kexecs): {plan_text(plan)}")
        lab = build_lab(kernel=args.kernel, progress=Progress("lab"), selftests=False)
        echo = (lambda ln: print(ln, file=sys.stderr)) if args.console else None
        result = lab.run([SCENARIO[paths]], debug={"plan": plan_text(plan)}, progress=Progress("lab"), echo=echo)
        run_dirs = [result.console_log.parent]
        (run_dirs[0] / "plan.json").write_text(json.dumps(plan))
        lab_ok, lab_summary = result.ok, result.summary()
        progress(f"lab run {'ok' if result.ok else 'FAILED'} in {result.duration:.0f} s; console {result.console_log}")
    pooled_plan, crossings, records, problems, not_run, lab_cold = [], {}, [], [], [], {}
    for run_dir in run_dirs:
        # a directory without plan.json: the same --quick/--configs/--repeat as its run
        dir_plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").exists() else plan
        p_, c_, r_, pr_, nr_, rows_in = load_run(run_dir, dir_plan)
        offset = len(pooled_plan)  # runs of later directories follow: their indexes shift
        pooled_plan += p_
        crossings.update({i + offset: c for i, c in c_.items()})
        records += [{**r, "index": r["index"] + offset} for r in r_ if isinstance(r.get("index"), int)]
        problems += [f"{run_dir.name}: {x}" for x in pr_]
        not_run += [f"{run_dir.name}: {x}" for x in nr_]
        lab_cold = lab_cold or blackout.parse_cold_start(rows_in)
    plan = pooled_plan
    for line in not_run:
        progress(f"not run: {line}")
    rows = blackout.build_rows(plan, crossings, records, problems)
    for p in problems:
        progress(f"problem: {p}")
    chart_note = chart(rows, Path(args.chart))
    cold = [cold_start(Path(s)) for s in args.cold_start]
    doc = {"lab_cold_start_s": lab_cold, "machine": {"before": host_before, "after": machine()}, "plan": plan,
           "run_dirs": [str(d) for d in run_dirs],
           "wall_s": round(time.monotonic() - started, 1), "lab_ok": lab_ok, **blackout.to_json(rows),
           "cold_start": cold, "problems": problems, "not_run": not_run, "chart": chart_note}
    # an incomplete matrix is not a pass either: what did not run is listed, with no figure
    code = blackout.exit_code(rows) or (0 if lab_ok and not not_run else 1)
    if args.json:
        progress(chart_note)  # stdout holds the JSON alone
        print(json.dumps(doc, indent=1))
    else:
        print(blackout.table(rows))
        print()
        print(blackout.ratio_table(rows))
        print()
        print(blackout.segment_table(rows))
        print()
        for r in rows:
            if r.ok and r.path in ("luoagent", "systemd"):
                f = r.figures()["figures"]
                if r.path == "systemd":
                    print(f"{r.config} systemd: orderly shutdown (systemctl kexec call -> 'Starting new kernel') "
                          f"{f['orderly_shutdown_s']:.3f} s")
                label = r.config if r.path == "luoagent" else f"{r.config} {r.path}"
                print(f"{label}: preserve {f['preserve_s_per_gib']:.3f} s/GiB (outside the blackout), "
                      f"LUO retrieve {f['luo_retrieve_s_per_gib']:.3f} s/GiB, RAM sample {f['ram_sample_ms_per_gib']:.1f} ms/GiB; "
                      f"quiesce phase {f['quiesce_phase_s']:.3f} s (slowest VM {f['quiesce_slowest_vm_s']:.3f} s, "
                      f"sum {f['quiesce_sum_s']:.3f} s), stops spread over {f['stop_spread_s']:.3f} s")
        for name, f in lab_cold.items():
            print(f"lab cold start ({name}): exec -> first LUO call {f['median']:.2f} s ({f['min']:.2f}-{f['max']:.2f})")
        for c in cold:
            e = c["exec_to_luo_call_s"]
            print(f"host cold start {c['source']}: exec -> first LUO call {e['median']:.3f} s "
                  f"({e['min']:.3f}-{e['max']:.3f}), CPU {c['cpu_s']['median']:.3f} s, "
                  f"statement imports {c['importtime_top_us'] / 1000:.0f} ms")
        print(f"\n{chart_note}")
        print(f"load: {doc['machine']['before']['uptime']} (before) / {doc['machine']['after']['uptime']} (after)")
        print(f"wall time {doc['wall_s']:.0f} s, {len(plan)} kexecs; console {', '.join(map(str, run_dirs))}")
    if not lab_ok:
        progress("the lab run failed:\n" + lab_summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
