"""Lab tier for a real kernel release change under running VMs (scenario kernel-change):
7.2 -> 7.3 (major upgrade) and 7.3 -> 7.2 (downgrade) through `luoagent update`/`restore` with
real kexecs, the landing-side preflight refusing with real LUO, and the RAM sample refusing a
corrupted page. Every check runs in the lab VM; this file reads its KTAP results by name."""

from __future__ import annotations

import pytest

from luoagent.lab.scenarios import kernel_change as sc

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def run(lab):
    return lab.run([sc.NAME])



def test_each_stage_runs_on_its_release(run):
    for stage, series in enumerate(sc.KERNELS):  # ctx.stage counts from 0
        matches = [t for t in run.scenario(sc.NAME).tests
                   if t.description.startswith(f"stage {stage} runs on a {series} kernel")]
        assert matches and all(t.ok for t in matches), run.tail(60)


@pytest.mark.parametrize("frm, to", [("7.2", "7.3"), ("7.3", "7.2")])
def test_vms_cross_a_release_change(run, frm, to):
    run.require(sc.NAME, sc.CROSSED.format(frm=frm, to=to))
    run.require(sc.NAME, sc.ABI_COMPARED.format(frm=frm, to=to))
    run.require(sc.NAME, sc.RESTORED.format(vm="a", to=to))
    assert f"KHO: exec from: {frm}." in run.console, run.tail(60)


def test_preflight_refusals_with_real_luo_leave_nothing_behind(run):
    run.require(sc.NAME, sc.REFUSED_CMDLINE_AND_LOSS)
    run.require(sc.NAME, sc.REFUSED_UNKNOWN_ABI)
    for case in ("command line and loss", "unknown ABI"):
        run.require(sc.NAME, sc.REFUSAL_LEFT_NOTHING.format(case=case))


def test_corrupted_ram_sample_refuses_the_vm_and_keeps_its_ram(run):
    run.require(sc.NAME, sc.SAMPLE_CORRUPT_REFUSED)
    run.require(sc.NAME, sc.SAMPLE_COST)


def test_whole_scenario_green(run):
    run.assert_ok()
    print(run.summary())
