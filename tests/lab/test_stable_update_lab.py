"""Lab tier for a Debian stable update under running VMs (scenario stable-update): 7.2.12 ->
7.2.13 through `luoagent update`/`restore` with a real kexec; KTAP results read by name."""

from __future__ import annotations

import pytest

from luoagent.lab.scenarios import kernel_change as kc
from luoagent.lab.scenarios import stable_update as sc

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def run(lab):
    return lab.run([sc.NAME])



def test_vms_cross_a_stable_update(run):
    run.require(sc.NAME, kc.CROSSED.format(frm=sc.FROM, to=sc.TO))
    run.require(sc.NAME, kc.ABI_COMPARED.format(frm=sc.FROM, to=sc.TO))
    for vm in sc.VMS:
        run.require(sc.NAME, kc.RESTORED.format(vm=vm, to=sc.TO))
    assert "KHO: exec from: 7.2.12 " in run.console, run.tail(60)


def test_whole_scenario_green(run):
    run.assert_ok()
    print(run.summary())
