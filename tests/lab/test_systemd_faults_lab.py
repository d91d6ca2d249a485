"""Lab tier for issue 9's fault cases 1-12 on a systemd host (scenario systemd-faults, systemd 262
as PID 1, one `systemctl kexec`): an update through the service interrupted at seven points
(daemon SIGKILLed, client SIGKILLed, SIGTERM) is undone each time; `systemctl stop luoagent`
during an update rolls back and a retried update succeeds; after the kexec the daemon restoring at boot is SIGKILLed at four
points, systemd restarts it each time, and every VM ends running exactly once.

Every check runs inside the lab VM; this file reads its KTAP results by name."""

from __future__ import annotations

import pytest

from luoagent.lab.scenarios import systemd_faults as sc

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def run(lab):
    result = lab.run([sc.NAME])
    print(f"{sc.NAME}: {result.duration:.1f} s wall, {result.boots} boots")
    return result


@pytest.mark.parametrize("case", sorted(sc.UPDATE_CASES))
def test_update_interrupted_before_the_kexec_is_undone(run, case):
    _point, how, what = sc.UPDATE_CASES[case]
    run.require(sc.NAME, sc.INTERRUPTED.format(n=case, what=what, outcome=sc.OUTCOMES[how]))
    for vm in sc.VMS:
        run.require(sc.NAME, sc.UNDONE.format(n=case, what=what, vm=vm))
    run.require(sc.NAME, sc.CLEAN.format(n=case, what=what))


def test_case8_stop_during_update_rolls_back_and_the_retry_kexecs(run):
    run.require(sc.NAME, sc.CASE8_STOPPED)
    for vm in sc.VMS:
        run.require(sc.NAME, sc.CASE8_RUNNING.format(vm=vm))
    run.require(sc.NAME, sc.CASE8_NO_IMAGE)
    run.require(sc.NAME, sc.CASE8_NO_SESSION)
    run.require(sc.NAME, sc.RETRY_OK)


@pytest.mark.parametrize("case", sorted(sc.RESTORE_CASES))
def test_daemon_sigkilled_during_the_boot_restore_is_restarted(run, case):
    run.require(sc.NAME, sc.KILLED.format(n=case, what=sc.RESTORE_CASES[case][1]))


def test_every_vm_ends_running_exactly_once_with_ram_intact(run):
    run.require(sc.NAME, sc.FINAL_RESTORED)
    for vm in sc.VMS:
        run.require(sc.NAME, sc.RUNS_ONCE.format(vm=vm))
        run.require(sc.NAME, sc.COUNTER.format(vm=vm))
        run.require(sc.NAME, sc.CANARY.format(vm=vm))
    run.require(sc.NAME, sc.NOTHING_HELD)


def test_whole_scenario_green(run):
    run.assert_ok()
