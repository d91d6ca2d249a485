"""Lab tier for the main job: `luoagent update` → real kexec → `luoagent restore` with two VMs,
then rollbacks with real LUO sessions and the manifest errors (scenario vm-update).

Every check runs inside the lab VM (real LUO kernel, nested QEMU 11.1); this file reads its
KTAP results by name, so a red check inside the lab is a red test here."""

from __future__ import annotations

import re

import pytest

from luoagent.lab.scenarios import vm_update as sc

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def run(lab):
    return lab.run(["vm-update"])



def test_update_kexecs_and_restore_brings_two_vms_back(run):
    run.require(sc.NAME, sc.UPDATE_KEXECED)
    run.require(sc.NAME, sc.RESTORE_OK)
    assert "KHO: exec from:" in run.console


@pytest.mark.parametrize("vm", sc.VMS)
def test_guest_continues_with_ram_in_place(run, vm):
    for desc in (sc.COUNTER_CONTINUES, sc.COUNTER_RISING, sc.CANARY_OK, sc.VMSTATE_SMALL, sc.RAM_NOT_COPIED,
                 sc.SAME_IDENTITY):
        run.require(sc.NAME, desc.format(vm=vm))
    # the blackout is reported (stop -> running across the kexec)
    assert re.search(rf"guest {vm}: blackout \d+\.\d+ s", run.console), run.tail(60)


def test_restored_vms_are_listed(run):
    run.require(sc.NAME, sc.LISTED)


@pytest.mark.parametrize("case, desc", [("dry run", sc.DRY_RUN),
                                        ("fault after quiesce", sc.ROLLBACK_FAULT),
                                        ("reboot refused", sc.ROLLBACK_REBOOT)])
def test_rollback_inside_the_lab_leaves_vms_running_and_no_session(run, case, desc):
    run.require(sc.NAME, desc)
    for vm in sc.VMS:
        run.require(sc.NAME, f"{case}: guest {vm} running, counter rising")
    run.require(sc.NAME, sc.NO_SESSION_LEFT.format(case=case))
    run.require(sc.NAME, f"after rollback ({case}): no kexec image left loaded")


def test_manifest_errors(run):
    run.require(sc.NAME, sc.VERSION_ERROR)
    run.require(sc.NAME, sc.MISSING_ERROR)


def test_whole_scenario_green(run):
    run.assert_ok()
    print(run.summary())


# ---- a VM that restore cannot bring back loses nothing -------------------------------------
@pytest.fixture(scope="module")
def rescue_run(lab):
    return lab.run(["vm-update"], debug={"restore_fault": True})


def test_failed_restore_writes_a_rescue_image_that_restores(rescue_run):
    """VM b's restore fails on purpose (test-only fault) after its memfds were retrieved: it is
    written out as a cpr-reboot image, `restore --from-rescue` brings it back with its counter
    and canary intact, and a later update refuses its file-backed RAM before touching anything."""
    for desc in (sc.RESCUE_WRITTEN, sc.RESCUE_RESTORED, sc.RESCUE_NOT_PRESERVABLE):
        rescue_run.require(sc.NAME, desc)
    for vm in sc.VMS:
        for desc in (sc.COUNTER_CONTINUES, sc.COUNTER_RISING, sc.CANARY_OK):
            rescue_run.require(sc.NAME, desc.format(vm=vm))
        rescue_run.require(sc.NAME, f"after the refused update: guest {vm} running, counter rising")
    rescue_run.assert_ok()
