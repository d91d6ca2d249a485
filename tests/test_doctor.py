"""`luoagent doctor`: the pure checks on synthetic inputs, the real answer on this host, and the
QEMU CPR probe against the lab's real QEMU 11.1 (host tier)."""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from luoagent.workflows import doctor

LUO_CONFIG = {"KEXEC_FILE": "y", "KEXEC_HANDOVER": "y", "LIVEUPDATE": "y", "LIVEUPDATE_MEMFD": "y"}


def run_doctor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "luoagent", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, LANG="C.UTF-8", PYTHONIOENCODING="utf-8"))


# --- pure checks ------------------------------------------------------------------------------
def test_parse_config():
    text = "# comment\nCONFIG_LIVEUPDATE=y\n# CONFIG_KEXEC_HANDOVER is not set\nCONFIG_X=\"str\"\n"
    assert doctor.parse_config(text) == {"LIVEUPDATE": "y", "X": "str"}


@pytest.mark.parametrize("release, ok", [("6.18.44-fc", False), ("6.19.0", True), ("7.2.13-amd64", True), ("5.10", False)])
def test_release(release, ok):
    assert doctor.check_release(release).ok is ok


def test_config_all_set():
    checks = doctor.check_config(LUO_CONFIG, "/proc/config.gz", set(), False)
    assert [c.name for c in checks] == ["config-kexec-file", "config-kexec-handover", "config-liveupdate",
                                        "config-liveupdate-memfd"]
    assert all(c.ok and not c.fix for c in checks)


def test_config_missing_option_says_which_and_how():
    cfg = dict(LUO_CONFIG)
    del cfg["LIVEUPDATE_MEMFD"]
    bad = [c for c in doctor.check_config(cfg, "/boot/config-x", set(), False) if not c.ok]
    assert [c.name for c in bad] == ["config-liveupdate-memfd"]
    assert "CONFIG_LIVEUPDATE_MEMFD=y" in bad[0].fix and "/boot/config-x" in bad[0].detail


def test_config_unreadable_uses_running_kernel_evidence():
    checks = {c.name: c for c in doctor.check_config(None, "nowhere", {"kexec_locate_mem_hole"}, True)}
    assert checks["config-kexec-file"].ok and checks["config-liveupdate"].ok  # device implies LUO + KHO
    assert not checks["config-liveupdate-memfd"].ok
    assert "CONFIG_IKCONFIG_PROC" in checks["config-liveupdate-memfd"].fix


@pytest.mark.parametrize(
    "cmdline, config, lu_ok, kho_ok",
    [
        ("root=/dev/vda liveupdate=on kho=on", {}, True, True),
        ("liveupdate=1 kho=y", {}, True, True),
        ("liveupdate=on", {"KEXEC_HANDOVER_ENABLE_DEFAULT": "y"}, True, True),
        ("liveupdate=on kho=off", {"KEXEC_HANDOVER_ENABLE_DEFAULT": "y"}, True, False),
        ("quiet", {}, False, False),
        ("init=/x -- liveupdate=on kho=on", {}, False, False),  # after -- it is init's, not the kernel's
    ],
)
def test_cmdline(cmdline, config, lu_ok, kho_ok):
    lu, kho = doctor.check_cmdline(doctor.cmdline_params(cmdline), config, device_exists=False)
    assert (lu.ok, kho.ok) == (lu_ok, kho_ok)
    for c in (lu, kho):
        assert c.ok or c.fix


def test_privileges():
    assert doctor.check_privileges(0, 0).ok
    assert doctor.check_privileges(1000, 1 << doctor.CAP_SYS_BOOT).ok
    bad = doctor.check_privileges(1000, 0)
    assert not bad.ok and "root" in bad.fix


def test_device_missing(tmp_path):
    c = doctor.check_device(str(tmp_path / "liveupdate"))
    assert not c.ok and "liveupdate=on" in c.fix


# --- this host ---------------------------------------------------------------------------------
def host_config() -> dict[str, str] | None:
    for p in (Path("/proc/config.gz"), Path(f"/boot/config-{platform.release()}")):
        if p.exists():
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            return doctor.parse_config(raw.decode())
    return None


def test_doctor_json_on_this_host():
    proc = run_doctor("doctor", "--json", "--no-qemu")
    doc = json.loads(proc.stdout)  # stdout is the document only; logs go to stderr
    assert set(doc) == {"ok", "checks"}
    for c in doc["checks"]:
        assert set(c) == {"name", "ok", "detail", "fix"}
        assert c["ok"] or c["fix"], f"failed check without a fix: {c}"
    checks = {c["name"]: c for c in doc["checks"]}
    has_luo = os.path.exists("/dev/liveupdate")
    assert checks["dev-liveupdate"]["ok"] is has_luo or "busy" in checks["dev-liveupdate"]["detail"].lower()
    config = host_config()
    if config is not None:  # the doctor's verdict per option equals what the config file says
        for opt in doctor.KERNEL_OPTIONS:
            name = f"config-{opt.lower().replace('_', '-')}"
            assert checks[name]["ok"] is (config.get(opt) == "y" or (opt == "LIVEUPDATE_MEMFD" and config.get(opt) == "m"))
    assert (proc.returncode == 0) is doc["ok"]
    if not has_luo:  # e.g. the 6.18 development host: plainly impossible, exit non-zero
        assert doc["ok"] is False and proc.returncode == 1


def test_doctor_human_output_on_this_host():
    proc = run_doctor("doctor", "--no-qemu")
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("live update: ")
    assert all(line[0] in "✔✘ " for line in lines[:-1])
    if not os.path.exists("/dev/liveupdate"):
        assert "✘ dev-liveupdate" in proc.stdout and "NOT possible" in lines[-1]
        assert "fix: " in proc.stdout and proc.returncode == 1


def test_doctor_reports_missing_qemu():
    proc = run_doctor("doctor", "--json", "--qemu", "/nonexistent/qemu-system-x86_64")
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert not checks["qemu"]["ok"] and "--qemu" in checks["qemu"]["fix"]
    assert proc.returncode == 1


# --- the real QEMU 11.1 from the lab rootfs ------------------------------------------------------
@pytest.mark.host
def test_doctor_probes_real_qemu_cpr(lab_qemu):
    proc = run_doctor("doctor", "--json", "--qemu", str(lab_qemu))
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["qemu"]["ok"] and "QEMU 11." in checks["qemu"]["detail"], checks["qemu"]
    assert checks["qemu-cpr-reboot"]["ok"], checks["qemu-cpr-reboot"]
    assert checks["qemu-x-ignore-shared"]["ok"], checks["qemu-x-ignore-shared"]
    # QEMU 11.1.3 opens mem-path with plain open(): /dev/fdset/N is refused (docs/facts.md)
    if "QEMU 11.1.3" in checks["qemu"]["detail"]:
        assert "does not accept /dev/fdset/N" in checks["qemu-fdset-mem-backend"]["detail"]


def test_doctor_warns_when_no_daemon_runs_and_about_restore_without_fd_store(tmp_path):
    c = doctor.check_daemon(tmp_path / "control.sock")
    assert c.ok and c.name == "agent-daemon"  # informational: never the reason an update is refused
    assert "WARNING: no luoagent daemon serves" in c.detail and "luoagent recover" in c.detail
    assert "during the restore after a kexec loses the RAM" in c.detail
    assert "does not run systemd" in c.detail and "luoagent.service" in c.fix  # this machine: no systemd
