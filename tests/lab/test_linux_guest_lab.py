"""Lab tier for a real Linux guest (scenario linux-guest): virtio-blk disk with fsync'd records,
virtio-net on a tap in a bridge, a memory region under a running checksum, carried through
`luoagent update` (real kexec) and `luoagent restore`; KTAP results read by name.

The guest boots on the host at lab build time and is resumed in the lab VM (its kernel boot
under nested TCG is far too slow, docs/lab.md); everything from there on runs in the lab VM."""

from __future__ import annotations

import pytest

from luoagent.lab.scenarios import linux_guest as sc

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def run(lab):
    return lab.run([sc.NAME])



def test_linux_guest_runs_its_workload_over_tap_and_bridge(run):
    run.require(sc.NAME, sc.GUEST_UP)


def test_linux_guest_crosses_the_kexec_without_rebooting(run):
    for desc in (sc.CROSSED, sc.NETWORK_RECREATED, sc.RESTORED, sc.NO_REBOOT, sc.SAME_ADDRESS):
        run.require(sc.NAME, desc)
    assert "KHO: exec from:" in run.console, run.tail(60)


def test_disk_records_and_memory_checksum_survive(run):
    for desc in (sc.RECORDS, sc.RECORDS_CONTINUE, sc.MEMORY_OK):
        run.require(sc.NAME, desc)


def test_whole_scenario_green(run):
    run.assert_ok()
    print(run.summary())
