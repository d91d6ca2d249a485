"""Lab tier for `luoagent daemon` (scenario daemon-update): with real LUO sessions and a real
kexec_file_load, a daemon SIGKILLed after the manifest or SIGTERMed with a migration in flight
leaves VMs running, no session and no kexec image once recovered; then an update run by the
daemon for its client kexecs for real and a daemon started in the new boot restores both VMs
by itself (no systemd: it retrieves the sessions from /dev/liveupdate), as `status` shows.

Every check runs inside the lab VM; this file reads its KTAP results by name."""

from __future__ import annotations

import pytest

from luoagent.lab.scenarios import daemon_update as sc
from luoagent.lab.scenarios import vm_update as vu

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def run(lab):
    return lab.run([sc.NAME])



def test_paused_daemon_holds_the_sessions_not_the_device(run):
    run.require(sc.NAME, sc.HOLDS_SESSIONS)
    run.require(sc.NAME, sc.DEVICE_NOT_HELD)


@pytest.mark.parametrize("case", ["daemon SIGKILLed after the manifest", "SIGTERM during quiesce"])
def test_killed_or_stopped_daemon_leaves_nothing_behind(run, case):
    run.require(sc.NAME, sc.RECOVERED.format(case=case))
    for vm in vu.VMS:
        run.require(sc.NAME, f"{case}: guest {vm} running, counter rising")
    run.require(sc.NAME, vu.NO_SESSION_LEFT.format(case=case))
    run.require(sc.NAME, f"after rollback ({case}): no kexec image left loaded")


def test_sigterm_rolls_back_and_exits(run):
    run.require(sc.NAME, sc.SIGTERM_EXIT)


def test_update_through_the_daemon_kexecs_and_restores(run):
    run.require(sc.NAME, sc.KEXECED)
    run.require(sc.NAME, sc.ANNOUNCED)
    run.require(sc.NAME, sc.RESTORED)
    run.require(sc.NAME, sc.STATUS_AFTER_RESTORE)
    for vm in vu.VMS:
        run.require(sc.NAME, vu.COUNTER_CONTINUES.format(vm=vm))
        run.require(sc.NAME, vu.CANARY_OK.format(vm=vm))
