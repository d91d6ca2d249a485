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


def _ok(result, desc):
    t = result.scenario(sc.NAME).test(desc)
    assert t.ok, f"{desc}: " + "\n".join(t.diag) + "\n--- console tail ---\n" + result.tail(60)


def test_paused_daemon_holds_the_sessions_not_the_device(run):
    _ok(run, sc.HOLDS_SESSIONS)
    _ok(run, sc.DEVICE_NOT_HELD)


@pytest.mark.parametrize("case", ["daemon SIGKILLed after the manifest", "SIGTERM during quiesce"])
def test_killed_or_stopped_daemon_leaves_nothing_behind(run, case):
    _ok(run, sc.RECOVERED.format(case=case))
    for vm in vu.VMS:
        _ok(run, f"{case}: guest {vm} running, counter rising")
    _ok(run, vu.NO_SESSION_LEFT.format(case=case))
    _ok(run, f"after rollback ({case}): no kexec image left loaded")


def test_sigterm_rolls_back_and_exits(run):
    _ok(run, sc.SIGTERM_EXIT)


def test_update_through_the_daemon_kexecs_and_restores(run):
    _ok(run, sc.KEXECED)
    _ok(run, sc.ANNOUNCED)
    _ok(run, sc.RESTORED)
    _ok(run, sc.STATUS_AFTER_RESTORE)
    for vm in vu.VMS:
        _ok(run, vu.COUNTER_CONTINUES.format(vm=vm))
        _ok(run, vu.CANARY_OK.format(vm=vm))
