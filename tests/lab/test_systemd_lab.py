"""Lab tier for the systemd flavour (Debian sid, systemd 262 as PID 1), scenarios systemd-host and
systemd-update in one boot chain: the stage runs as a unit, the runner kexecs with `systemctl
kexec`, a bystander unit's fd-store memfd crosses that kexec through systemd's own LUO use, the
shipped luoagent.service (installed as a package would) comes up at boot by itself; then the
normal path: VMs as units → `luoagent update` → `systemctl kexec` → restored at boot, no command.

Every check runs inside the lab VM; this file reads its KTAP results by name."""

from __future__ import annotations

import pytest

from luoagent.lab import bystander as by
from luoagent.lab import host_units as hu
from luoagent.lab.scenarios import systemd_host as sh
from luoagent.lab.scenarios import systemd_update as su

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]
SCENARIOS = [sh.NAME, su.NAME]


# --- real lab VM (systemd 262 as PID 1) ---------------------------------------------------
@pytest.fixture(scope="module")
def run(lab):
    """One boot chain for every check below: 4 boots, 3 `systemctl kexec`s."""
    result = lab.run(SCENARIOS)
    print(f"{' + '.join(SCENARIOS)}: {result.duration:.1f} s wall, {result.boots} boots; timings "
          + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    return result



@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("when", [sh.BEFORE, sh.AFTER])
def test_systemd_is_pid1_and_the_stage_is_a_unit(run, name, when):
    run.require(name, sh.PID1_SYSTEMD.format(when=when))
    run.require(name, sh.STAGE_AS_UNIT.format(when=when))


def test_runner_kexecs_through_systemctl_kexec(run):
    assert "# lab-shutdown: systemctl kexec" in run.console, run.tail(60)
    # systemd-shutdown's own word that it handed the fd stores to LUO before kexec()
    assert "Preserved fd stores in LUO session 'systemd' for kexec" in run.console, run.tail(60)
    run.require(sh.NAME, "a new kernel booted since preserve (boot id changed)")


@pytest.mark.parametrize("name", SCENARIOS)
def test_bystander_fd_store_memfd_survives_the_kexec(run, name):
    run.require(name, by.PUSHED)
    run.require(name, by.KHO_EXEC)
    run.require(name, by.HANDED_BACK)
    run.require(name, by.BYTES_INTACT)


def test_shipped_units_run_as_on_a_host(run):
    run.require(sh.NAME, hu.INSTALLED)
    run.require(sh.NAME, hu.SERVICE_UP)
    run.require(sh.NAME, hu.UP_AT_BOOT)
    run.require(sh.NAME, hu.SERVICE_UP_AFTER)
    run.require(su.NAME, hu.UP_AT_BOOT)


@pytest.mark.parametrize("vm", su.VMS)
def test_vms_are_units(run, vm):
    run.require(su.NAME, su.IN_SCOPE.format(vm=vm))


def test_vm_upgrade_through_the_service_keeps_qemu_in_the_vm_scope(run):
    run.require(su.NAME, su.UPGRADED.format(vm=su.UPGRADED_VM))


def test_update_through_the_service_ends_in_systemctl_kexec(run):
    run.require(su.NAME, su.KEXECED)
    run.require(su.NAME, su.UPDATE_ACCEPTED)


def test_the_service_restores_at_boot_with_no_command(run):
    run.require(su.NAME, su.RESTORED_AT_BOOT)
    run.require(su.NAME, su.NOTHING_HELD)
    run.require(su.NAME, su.BLACKOUT)


@pytest.mark.parametrize("vm", su.VMS)
def test_guests_continue_once_with_their_ram(run, vm):
    run.require(su.NAME, su.RUNS_ONCE.format(vm=vm))
    run.require(su.NAME, su.COUNTER_CONTINUES.format(vm=vm))
    run.require(su.NAME, su.CANARY_OK.format(vm=vm))


def test_whole_chain_passes(run):
    run.assert_ok()

