"""Lab tier for the systemd flavour (Debian sid, systemd 262 as PID 1): the stage runs as a unit,
the runner kexecs with `systemctl kexec`, a bystander unit's fd-store memfd crosses that kexec
through systemd's own LUO use with identical bytes, and the shipped luoagent.service, installed
as a package would, comes up at boot by itself (scenario systemd-host).

Every check runs inside the lab VM; this file reads its KTAP results by name."""

from __future__ import annotations

import pytest

from luoagent.lab import boot, rootfs
from luoagent.lab import bystander as by
from luoagent.lab import host_units as hu
from luoagent.lab.scenarios import resolve
from luoagent.lab.scenarios import systemd_host as sc

# --- pure logic (no VM) -------------------------------------------------------------------
def test_flavours_never_share_a_boot_chain():
    items = [boot.RunItem("scenario", n, "1G", 60, flavour=f)
             for n, f in (("a", "custom-init"), ("b", "systemd"), ("c", "systemd"), ("d", "custom-init"))]
    assert [[i.name for i in g] for _m, g in boot.group_by_memory(items)] == [["a"], ["b", "c"], ["d"]]


def test_systemd_flavour_boots_systemd_and_keeps_luo_on():
    line = boot.kernel_cmdline("", "systemd")
    assert "init=/lib/systemd/systemd" in line and "liveupdate=on" in line and "kho=on" in line
    assert f"init={rootfs.INIT_PATH}" in boot.kernel_cmdline()
    assert resolve([sc.NAME])[0].flavour == "systemd"
    assert resolve(["smoke"])[0].flavour == "custom-init"


def test_flavours_have_their_own_tree_and_the_trixie_key_is_unchanged():
    systemd = rootfs.flavour("systemd")
    assert rootfs.tree_key() == rootfs.tree_key(rootfs.flavour(None)) != rootfs.tree_key(systemd)
    assert systemd.suite == "sid" and systemd.backports is None


# --- real lab VM (systemd 262 as PID 1) ---------------------------------------------------


@pytest.fixture(scope="module")
def run(lab):
    """One boot chain for every check below: 2 boots, 1 systemctl kexec."""
    result = lab.run([sc.NAME])
    print(f"{sc.NAME}: {result.duration:.1f} s wall, {result.boots} boots; timings "
          + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    return result


def _ok(result, desc):
    t = result.scenario(sc.NAME).test(desc)
    assert t.ok, f"{desc}: " + "\n".join(t.diag) + "\n--- console tail ---\n" + result.tail(60)


@pytest.mark.parametrize("when", [sc.BEFORE, sc.AFTER])
@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_systemd_is_pid1_and_the_stage_is_a_unit(run, when):
    _ok(run, sc.PID1_SYSTEMD.format(when=when))
    _ok(run, sc.STAGE_AS_UNIT.format(when=when))


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_runner_kexecs_through_systemctl_kexec(run):
    assert "# lab-shutdown: systemctl kexec" in run.console, run.tail(60)
    # systemd-shutdown's own word that it handed the fd stores to LUO before kexec()
    assert "Preserved fd stores in LUO session 'systemd' for kexec" in run.console, run.tail(60)
    _ok(run, "a new kernel booted since preserve (boot id changed)")
    _ok(run, by.KHO_EXEC)


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bystander_fd_store_memfd_survives_the_kexec(run):
    _ok(run, by.PUSHED)
    _ok(run, by.HANDED_BACK)
    _ok(run, by.BYTES_INTACT)


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_shipped_units_run_as_on_a_host(run):
    _ok(run, hu.INSTALLED)
    _ok(run, hu.SERVICE_UP)
    _ok(run, hu.UP_AT_BOOT)
    _ok(run, hu.SERVICE_UP_AFTER)


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_whole_scenario_passes(run):
    run.assert_ok()
