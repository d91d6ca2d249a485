"""Pure parts of the kexec blackout benchmark: console time line, per-guest segments, medians,
the "not restored -> no figure, non-zero" rule, table/JSON shape (no figure is asserted as speed)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from luoagent.lab import blackout as bo
from luoagent.lab.scenarios import bench_liveupdate as scenario

REPO = Path(__file__).resolve().parents[1]
S = 1_000_000_000


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_liveupdate", REPO / "benchmarks" / "bench_liveupdate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def console(index: int, t0: float, *, with_mark: bool = True, result: dict | None = None) -> list[tuple[float, str]]:
    """Console of stage index+1 of a run whose kexec is seen at host time t0 (+ the next stage line).

    Old kernel: reboot mark at host t0 with boottime 100 s; "Starting new kernel" 0.01 s later.
    New kernel: clock 0 at host t0 + 2.0 (its lines arrive 0.5 s late at first, then live),
    init at its 3.0 s; the scenario's clock mark says boottime = printk + 0.05 s."""
    rows = [(t0 - 5, f"    # lab-stage: bench-liveupdate {index + 1}/9 hop={index}")] if index == 0 else [(t0 - 5, "    # run")]
    if with_mark:
        rows.append((t0, f"[  99.990000] {bo.REBOOT_MARK}{100 * S}"))
    rows.append((t0 + 0.01, "[  99.999000] kexec_core: Starting new kernel"))
    zero = t0 + 2.0
    rows += [(zero + 0.5 + 0.0, "[    0.000000] Linux version 7.2.13"),   # replayed late
             (zero + 1.0, "[    1.000000] virtio_blk virtio0: [vda]"),     # live
             (zero + 3.0, "[    3.000000] Run /sbin/luoagent-lab-init as init process"),
             (zero + 4.0, "# lab-boot: boot=2 hop=1 uptime=4.0"),
             (zero + 4.1, f"    # lab-stage: bench-liveupdate {index + 2}/9 hop={index + 1}"),
             (zero + 4.11, f"[    4.110000] {bo.CLOCK_MARK}{int(4.16 * S)}")]
    if result is not None:
        rows.append((zero + 20, "    " + bo.RESULT_MARK + json.dumps(result)))
    return rows


def luoagent_record(index: int = 0, restored: bool = True) -> dict:
    """One luoagent run, 1 VM: stop at old boottime 99.0 s, saved 0.2 s later; new boot (boottime):
    restore exec 5.05, LUO open 6.05, manifest 6.15, retrieve 6.25-6.35, QEMU 6.45-7.45, load -7.95, running 8.05."""
    real_minus_boot = 1_700_000_000 * S
    b = lambda s: int((s + 0.05) * S)  # boottime readings = printk clock + 0.05 s
    return {"index": index, "path": "luoagent", "ram_mib": 64, "vms": 1, "restored": restored,
            "old": {"clock_pair": [real_minus_boot + 50 * S, 50 * S], "index": index, "names": ["v"],
                    "vms": {"v": {"counter_before": 1, "seed": 2}}},
            "new": {"update": {"ok": True, "phases": [{"phase": "preserve-ram", "seconds": 0.5}, {"phase": "sync", "seconds": 0.1}],
                               "vms": [{"name": "v", "ram_bytes": 64 << 20, "vmstate_bytes": 300_000,
                                        "stopped_at_ns": real_minus_boot + 99 * S, "quiesce_seconds": 0.2,
                                        "ram_sample_ms_per_gib": 10.0}]},
                    "restore_exec_boot_ns": b(5.0),
                    "restore": {"ok": restored, "boot_clock_ns": {"luo_open_boot_ns": b(6.0), "manifest_retrieved_boot_ns": b(6.1)},
                                "vms": [{"name": "v", "ok": restored, "timings": {
                                    "retrieve_boot_ns": b(6.2), "retrieved_boot_ns": b(6.3), "qemu_launch_boot_ns": b(6.4),
                                    "qemu_up_boot_ns": b(7.4), "incoming_done_boot_ns": b(7.9), "running_boot_ns": b(8.0)}}]},
                    "vms": {"v": {"restored": restored, "why": "" if restored else "canary differs"}}}}


def baseline_record(index: int = 1) -> dict:
    b = lambda s: int((s + 0.05) * S)
    return {"index": index, "path": "baseline", "ram_mib": 64, "vms": 1, "restored": True,
            "old": {"index": index, "names": ["v"], "synced_boot_ns": 99_900_000_000,
                    "vms": {"v": {"stop_boot_ns": 90 * S, "saved_boot_ns": 98 * S, "stream_bytes": 64 << 20}}},
            "new": {"load_started_boot_ns": b(5.0),
                    "vms": {"v": {"restored": True, "timings": {"qemu_launch_boot_ns": b(5.1), "qemu_up_boot_ns": b(6.1),
                                                                 "incoming_done_boot_ns": b(16.1), "running_boot_ns": b(16.2)}}}}}


def test_crossing_takes_the_earliest_kernel_clock_and_the_clock_mark():
    c = bo.crossing(console(0, 1000.0)[1:])
    # the old kernel's printk clock puts the call 9 ms before its last line (which arrived at +0.01)
    assert c.reboot_call == pytest.approx(1000.001) and c.reboot_call_boot_ns == 100 * S
    assert c.jump == pytest.approx(1000.01)
    assert c.kernel_zero == pytest.approx(1002.0)  # the live lines, not the late replay
    assert c.init_s == 3.0
    assert c.boot_minus_printk == pytest.approx(0.05)
    assert c.host_new(int(4.16 * S)) == pytest.approx(1002.0 + 4.11)


def test_crossing_without_reboot_mark_or_clock_mark_is_an_error():
    with pytest.raises(bo.TimelineError, match="reboot mark"):
        bo.crossing(console(0, 1000.0, with_mark=False)[1:])
    rows = [r for r in console(0, 1000.0)[1:] if bo.CLOCK_MARK not in r[1]]
    with pytest.raises(bo.TimelineError, match="boottime"):
        bo.crossing(rows)


def test_luoagent_segments_add_up_to_stop_to_running_and_are_owned():
    cross = bo.crossing(console(0, 1000.0)[1:])
    run = bo.run_timeline(luoagent_record(), cross)
    v = run.worst()
    seg = v.segments
    assert list(seg) == [s for s, _o in bo.SEGMENTS["luoagent"]]
    # stop: old boottime 99.0 s = host 999.001; running: new boottime 8.05 = printk 8.0 = host 1010.0
    assert v.blackout == pytest.approx(1010.0 - 999.001)
    assert seg["save"] == pytest.approx(0.2)
    assert seg["prepare reboot"] == pytest.approx(0.8)
    assert seg["kernel shutdown"] == pytest.approx(0.009)
    assert seg["kexec jump + decompress"] == pytest.approx(1.99)
    assert seg["kernel boot"] == pytest.approx(3.0)
    assert seg["init starts agent"] == pytest.approx(2.0)
    assert seg["agent start"] == pytest.approx(1.0)
    assert seg["LUO retrieve"] == pytest.approx(0.1)
    assert seg["QEMU start"] == pytest.approx(1.0)
    owners = v.by_owner("luoagent")
    assert sum(owners.values()) == pytest.approx(v.blackout)
    assert owners[bo.AGENT] == pytest.approx(0.8 + 1.0 + 0.1 + 0.1 + 0.1)
    assert run.figures["preserve_s_per_gib"] == pytest.approx(0.5 * 16)
    assert run.figures["luo_retrieve_s_per_gib"] == pytest.approx(0.1 * 16)


def test_baseline_segments_add_up():
    cross = bo.crossing(console(1, 2000.0)[1:])
    v = bo.run_timeline(baseline_record(), cross).worst()
    assert v.segments["save"] == pytest.approx(8.0)
    assert v.segments["flush to disk"] == pytest.approx(2.0)
    assert v.segments["load RAM from disk"] == pytest.approx(10.0)
    assert v.blackout == pytest.approx((2002.0 + 16.2) - (2000.001 - 10.0))
    assert sum(v.by_owner("baseline").values()) == pytest.approx(v.blackout)


def test_median_spread():
    assert bo.median_spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0, "n": 4}
    with pytest.raises(ValueError):
        bo.median_spread([])


def _rows(luo_restored: bool = True):
    plan = [{"path": "luoagent", "ram_mib": 64, "vms": 1}, {"path": "baseline", "ram_mib": 64, "vms": 1}]
    rows_in = (console(0, 1000.0, result=luoagent_record(0, luo_restored))
               + console(1, 2000.0, result=baseline_record(1))
               + [(3000.0, "    # lab-stage: bench-liveupdate 3/3 hop=2")])
    crossings, records, problems = bo.parse_console(rows_in)
    assert sorted(crossings) == [0, 1] and len(records) == 2 and not problems
    return bo.build_rows(plan, crossings, records, problems)


def test_rows_table_json_and_ratios_shape():
    rows = _rows()
    assert [(r.config, r.path, r.ok) for r in rows] == [("1x64MiB", "luoagent", True), ("1x64MiB", "baseline", True)]
    doc = bo.to_json(rows)
    assert doc["ok"] is True and bo.exit_code(rows) == 0
    row = doc["rows"][0]
    assert set(row) >= {"config", "path", "blackout_s", "segments_s", "owners_s", "agent_share_s",
                        "agent_share_pct", "figures", "runs"}
    assert set(row["blackout_s"]) == {"median", "min", "max", "n"}
    assert json.loads(json.dumps(doc)) == doc
    [ratio] = doc["ratios"]
    assert ratio["config"] == "1x64MiB" and ratio["bytes_written"] == pytest.approx((64 << 20) / 300_000)
    text = bo.table(rows)
    assert "1x64MiB luoagent" in text and "NO FIGURE" not in text


def test_a_guest_not_restored_gives_no_figure_and_a_non_zero_exit():
    rows = _rows(luo_restored=False)
    bad = rows[0]
    assert not bad.ok and any("NOT restored" in w or "not every guest" in w for w in bad.why())
    with pytest.raises(ValueError, match="no valid figure"):
        bad.figures()
    doc = bo.to_json(rows)
    assert "blackout_s" not in doc["rows"][0] and doc["rows"][0]["why"]
    assert doc["ratios"] == [] and doc["ok"] is False
    assert bo.exit_code(rows) == 1
    line = next(ln for ln in bo.table(rows).splitlines() if "luoagent" in ln)
    assert "NO FIGURE" in line and not any(ch.isdigit() for ch in line.split("NO FIGURE")[0].replace("1x64MiB", ""))


def test_a_missing_run_or_garbled_result_line_is_a_problem_not_a_figure():
    plan = [{"path": "luoagent", "ram_mib": 64, "vms": 1}]
    rows_in = console(0, 1000.0) + [(1030.0, "    # bench-result {\"index\": 0, trunc")]
    crossings, records, problems = bo.parse_console(rows_in)
    assert problems and not records
    rows = bo.build_rows(plan, crossings, records, problems)
    assert not rows[0].ok and bo.exit_code(rows) == 1


def test_plan_interleaves_paths_and_round_trips_to_the_scenario():
    bench = _bench_module()
    plan = bench.make_plan([(64, 1), (2048, 1)], 2)
    assert len(plan) == 8
    assert [p["path"] for p in plan[:2]] == ["luoagent", "baseline"]
    assert [p["path"] for p in plan[4:6]] == ["baseline", "luoagent"]
    assert scenario.parse_plan(bench.plan_text(plan)) == plan
    assert bench.parse_configs("64x1,512x8") == [(64, 1), (512, 8)]
    with pytest.raises(SystemExit):
        bench.parse_configs("64")


def test_restore_help_imports_only_the_restore_workflow():
    """The CLI imports the module of the command it runs, not every workflow (cold start)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "luoagent", "restore", "--help"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--from-rescue" in r.stdout
    imported = {ln.split("|")[-1].strip() for ln in r.stderr.splitlines() if "|" in ln}
    # importlib.import_module (how the CLI loads a command) is not traced; what restore imports is
    assert "luoagent.workflows.ram_sample" in imported
    assert not imported & {"luoagent.workflows.trace", "luoagent.workflows.daemon", "luoagent.workflows.update",
                           "luoagent.lab.cli", "importlib.metadata"}


def test_a_run_stopped_early_counts_only_the_runs_it_reached(tmp_path):
    bench = _bench_module()
    plan = bench.make_plan([(64, 1), (512, 1)], 1)  # 4 runs; the console below reached the first one
    rows = console(0, 1000.0, result=luoagent_record(0))
    (tmp_path / "console-times.tsv").write_text("".join(f"{t:.6f}\t{line}\n" for t, line in rows))
    reached, crossings, records, problems, not_run, _rows_in = bench.load_run(tmp_path, plan)
    assert reached == plan[:1] and sorted(crossings) == [0] and not problems
    assert len(not_run) == 3 and "baseline 1x64MiB" in not_run[0]
    built = bo.build_rows(reached, crossings, records, problems)
    assert [(r.config, r.path, r.ok) for r in built] == [("1x64MiB", "luoagent", True)]


# --- the systemd path (bench-systemd: luoagent.service, systemctl kexec, restore at boot) ---------
def systemd_console(index: int, t0: float, *, result: dict | None = None, drop: str = "") -> list[tuple[float, str]]:
    """Console of bench-systemd stage index+1 whose kexec ("Starting new kernel", printk 99.9) arrives
    at host t0. Old boot: clock marks say boottime = printk + 0.02 s; systemd-shutdown starts at printk
    98.0 (arriving late) and says "Rebooting with kexec." at 99.5. New kernel as in console()."""
    rows = [(t0 - 60, f"    # lab-stage: bench-systemd {index + 1}/3 hop={index}"),
            (t0 - 59, f"[  40.000000] {bo.CLOCK_MARK}{int(40.02 * S)}"),
            (t0 - 3, f"[  96.990000] {bo.CLOCK_MARK}{int(97.01 * S)}"),
            (t0 - 1.0, "[  98.000000] systemd-shutdown[1]: Syncing filesystems and block devices."),
            (t0 - 0.9, "[  98.100000] systemd-shutdown[1]: Sending SIGTERM to remaining processes..."),
            (t0 - 0.3, "[  99.500000] systemd-shutdown[1]: Rebooting with kexec."),
            (t0, "[  99.900000] kexec_core: Starting new kernel")]
    zero = t0 + 2.0
    rows += [(zero + 0.5, "[    0.000000] Linux version 7.2.13"),
             (zero + 1.0, "[    1.000000] virtio_blk virtio0: [vda]"),
             (zero + 3.0, "[    3.000000] Run /lib/systemd/systemd as init process"),
             (zero + 9.0, "[    4.000000] systemd[1]: late user-space line"),
             (zero + 20.0, "# lab-boot: boot=2 hop=1 uptime=20.0"),
             (zero + 20.1, f"    # lab-stage: bench-systemd {index + 2}/3 hop={index + 1}"),
             (zero + 20.11, f"[   20.110000] {bo.CLOCK_MARK}{int(20.16 * S)}")]
    if result is not None:
        rows.append((zero + 40, "    " + bo.RESULT_MARK + json.dumps(result)))
    return [r for r in rows if not drop or drop not in r[1]]


def systemd_record(index: int = 0, restored: bool = True, restarts: int = 0) -> dict:
    """One systemd run, 1 VM: stop at old boottime 95.0 s, saved 0.2 s later, `systemctl kexec` called at
    96.0; new boot (boottime = printk + 0.05): luoagent.service started 5.05, then as luoagent_record."""
    rec = luoagent_record(index, restored)
    real_minus_boot = rec["old"]["clock_pair"][0] - rec["old"]["clock_pair"][1]
    b = lambda s: int((s + 0.05) * S)
    rec["path"] = "systemd"
    rec["new"]["update"]["vms"][0]["stopped_at_ns"] = real_minus_boot + 95 * S
    del rec["new"]["restore_exec_boot_ns"]
    rec["new"]["restore"]["kexec_requested_ns"] = real_minus_boot + 96 * S
    rec["new"].update(service_start_boot_ns=b(5.0), service_restarts=restarts)
    return rec


def test_systemd_crossing_anchors_the_old_clock_on_the_jump_and_finds_systemd_shutdown():
    c = bo.systemd_crossing(systemd_console(0, 1000.0)[1:])
    # old printk p -> host 1000 - (99.9 - p): arrival times of the shutdown lines themselves do not count
    assert c.jump == 1000.0
    assert c.shutdown_started == pytest.approx(1000.0 - 1.9)
    assert c.reboot_call == pytest.approx(1000.0 - 0.4)
    assert c.reboot_call_boot_ns == pytest.approx((99.5 + 0.02) * S)  # the last clock mark's offset
    assert c.kernel_zero == pytest.approx(1002.0) and c.init_s == 3.0
    assert c.boot_minus_printk == pytest.approx(0.05)


@pytest.mark.parametrize("drop, match", [("Rebooting with kexec", "systemd-shutdown"),
                                         ("systemd-shutdown[1]", "systemd-shutdown"),
                                         ("] " + bo.CLOCK_MARK + "40", None)])
def test_systemd_crossing_needs_systemd_shutdown_lines_and_an_old_clock_mark(drop, match):
    if match is None:  # one of two clock marks gone: the other still anchors the old boot
        assert bo.systemd_crossing(systemd_console(0, 1000.0, drop=drop)[1:]).reboot_call_boot_ns
        rows = [r for r in systemd_console(0, 1000.0)[1:] if not (bo.CLOCK_MARK in r[1] and r[0] < 1000.0)]
        with pytest.raises(bo.TimelineError, match="old boot"):
            bo.systemd_crossing(rows)
        return
    with pytest.raises(bo.TimelineError, match=re.escape(match)):
        bo.systemd_crossing(systemd_console(0, 1000.0, drop=drop)[1:])


def test_systemd_segments_split_the_orderly_shutdown_and_add_up():
    cross = bo.systemd_crossing(systemd_console(0, 1000.0)[1:])
    run = bo.run_timeline(systemd_record(), cross)
    v = run.worst()
    seg = v.segments
    assert list(seg) == [s for s, _o in bo.SEGMENTS["systemd"]]
    # old boottime b -> host 1000 - (99.9 - (b - 0.02)); new boottime b -> host 1002 + b - 0.05
    assert seg["save"] == pytest.approx(0.2)
    assert seg["until systemctl kexec"] == pytest.approx(0.8)
    assert seg["orderly shutdown: stop units"] == pytest.approx(98.0 - 95.98)
    assert seg["orderly shutdown: systemd-shutdown"] == pytest.approx(1.5)
    assert seg["kexec -e + kernel shutdown"] == pytest.approx(0.4)
    assert seg["kexec jump + decompress"] == pytest.approx(2.0)
    assert seg["kernel boot"] == pytest.approx(3.0)
    assert seg["systemd starts luoagent.service"] == pytest.approx(2.0)
    assert seg["agent start"] == pytest.approx(1.0)
    assert v.blackout == pytest.approx((1002.0 + 8.0) - (1000.0 - (99.9 - 94.98)))
    owners = v.by_owner("systemd")
    assert sum(owners.values()) == pytest.approx(v.blackout)
    assert owners[bo.SYSTEMD] == pytest.approx(2.02 + 1.5)
    assert owners[bo.INIT] == pytest.approx(2.0)
    assert run.figures["orderly_shutdown_s"] == pytest.approx(99.9 - 95.98)


def test_systemd_run_with_a_restarted_service_or_backwards_clocks_gives_no_figure():
    cross = bo.systemd_crossing(systemd_console(0, 1000.0)[1:])
    with pytest.raises(bo.TimelineError, match="restarted"):
        bo.run_timeline(systemd_record(restarts=1), cross)
    late = systemd_record()
    late["new"]["restore"]["kexec_requested_ns"] += 5 * S  # "called" after systemd-shutdown began
    with pytest.raises(bo.TimelineError, match="backwards"):
        bo.run_timeline(late, cross)
    no_call = systemd_record()
    no_call["new"]["restore"]["kexec_requested_ns"] = None
    with pytest.raises(bo.TimelineError, match="systemctl kexec"):
        bo.run_timeline(no_call, cross)


def _systemd_rows(restored: bool = True):
    plan = [{"path": "systemd", "ram_mib": 64, "vms": 1}, {"path": "systemd", "ram_mib": 64, "vms": 1}]
    rows_in = (systemd_console(0, 1000.0, result=systemd_record(0, restored))
               + systemd_console(1, 2000.0, result=systemd_record(1))[1:]
               + [(3000.0, "    # lab-stage: bench-systemd 3/3 hop=2")])
    crossings, records, problems = bo.parse_console(rows_in)
    assert sorted(crossings) == [0, 1] and len(records) == 2 and not problems
    assert crossings[1].shutdown_started is not None  # found through the bench-systemd stage line
    return bo.build_rows(plan, crossings, records, problems)


def test_systemd_rows_table_and_json():
    rows = _systemd_rows()
    assert [(r.config, r.path, r.ok) for r in rows] == [("1x64MiB", "systemd", True)]
    assert rows[0].figures()["blackout_s"]["n"] == 2
    doc = bo.to_json(rows)
    assert doc["ok"] is True and json.loads(json.dumps(doc)) == doc
    assert set(doc["rows"][0]["owners_s"]) == set(bo.OWNERS)
    assert "orderly_shutdown_s" in doc["rows"][0]["figures"]
    head, _rule, line = bo.table(rows).splitlines()
    assert "systemd" in head and line.split()[:2] == ["1x64MiB", "systemd"]
    assert "orderly shutdown: stop units [systemd]" in bo.segment_table(rows)


def test_systemd_guest_not_restored_gives_no_figure():
    rows = _systemd_rows(restored=False)
    assert not rows[0].ok and bo.exit_code(rows) == 1
    assert "NO FIGURE" in bo.table(rows)


def test_systemd_plan_round_trips_to_its_scenario():
    from luoagent.lab.scenarios import bench_systemd

    bench = _bench_module()
    plan = bench.make_plan(bench.SYSTEMD_CONFIGS, 2, bench.SYSTEMD_PATHS)
    assert [p["path"] for p in plan] == ["systemd"] * 4
    assert bench_systemd.parse_plan(bench.plan_text(plan)) == plan
    assert bench_systemd.FLAVOUR == "systemd" and bench.SCENARIO[bench.SYSTEMD_PATHS] == bench_systemd.NAME
    with pytest.raises(ValueError, match="systemd"):
        bench_systemd.parse_plan("luoagent:64:1")
