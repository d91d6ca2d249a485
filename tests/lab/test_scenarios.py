"""The LUO lab scenarios (issue 3) run for real: memfds across real kexecs on the LUO lab kernel.

memfd-basic, multi, errors and multihop share one boot chain; large and the sabotaged
memfd-basic (debug corrupt, must go red at exactly the hash check) run on their own."""

from __future__ import annotations

import re

import pytest

from luoagent.lab.scenarios import memfd_basic

pytestmark = pytest.mark.lab

# KTAP results each scenario must report (counted from the scenario code by hand, so a
# scenario that silently stops checking something shows up here) and its stage count.
EXPECTED_TESTS = {"memfd-basic": 5, "multi": 32, "errors": 19, "multihop": 18}
EXPECTED_STAGES = {"memfd-basic": 2, "multi": 2, "errors": 2, "multihop": 4}
LARGE_TESTS = 6
LARGE_METRICS = ("fill", "hash_before", "preserve", "retrieve_session", "retrieve", "hash_after", "finish")
METRIC_RE = re.compile(r"^metric (?P<name>[\w.]+)=(?P<value>[\d.]+) (?P<unit>\S+)$")


def _metrics(sc) -> dict[str, tuple[float, str]]:
    found = {}
    for line in sc.diag:
        m = METRIC_RE.match(line.strip())
        if m:
            found[m["name"]] = (float(m["value"]), m["unit"])
    return found


@pytest.fixture(scope="module")
def core_run(lab):
    """One boot chain for the four core scenarios (each still starts in a fresh kernel)."""
    result = lab.run(list(EXPECTED_TESTS))
    print(f"\ncore scenarios: {result.duration:.1f}s wall, {result.boots} boots")
    for sc in result.scenarios.values():
        print(f"  {sc.name}: {len(sc.tests)} tests, stages {sc.stage_seconds} s")
    return result


@pytest.mark.timeout(1800)
def test_core_chain_passes_across_real_kexecs(core_run):
    core_run.assert_ok()
    assert list(core_run.scenarios) == list(EXPECTED_TESTS)
    # one boot per stage: every stage after the first of a scenario is a real kexec away
    assert core_run.boots == sum(EXPECTED_STAGES.values()), core_run.tail()
    # the kernel's own word: every boot after the first came through a KHO kexec
    counts = {int(n) for n in re.findall(r"KHO: exec from: \S+ \(count (\d+)\)", core_run.console)}
    assert counts == set(range(1, core_run.boots)), core_run.tail()


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", list(EXPECTED_TESTS))
def test_scenario_reports_every_expected_result_ok(core_run, name):
    sc = core_run.scenario(name)
    report = "\n".join(f"{'ok' if t.ok else 'not ok'} {t.number} {t.description} {t.diag}" for t in sc.tests)
    assert sc.error is None, sc.error
    assert sc.ok is True, report
    assert [t for t in sc.tests if not t.ok or t.skipped] == [], report
    assert len(sc.tests) == EXPECTED_TESTS[name], report
    assert sc.plan == EXPECTED_TESTS[name]
    assert len(sc.stage_seconds) == EXPECTED_STAGES[name]


@pytest.mark.timeout(1800)
def test_memfd_basic_checks_hash_offset_and_size(core_run):
    sc = core_run.scenario("memfd-basic")
    for desc in (memfd_basic.HASH_CHECK, "retrieved memfd keeps its file offset",
                 "retrieved memfd keeps its size"):
        assert sc.test(desc).ok


@pytest.mark.timeout(1800)
def test_errors_scenario_covers_every_refusal(core_run):
    sc = core_run.scenario("errors")
    wanted = ["LuoBusy naming the holder", "SessionExists", "TokenExists", "FileAlreadyPreserved",
              "pipe refused", "regular file refused", "/dev/null refused", "MFD_HUGETLB memfd refused",
              "empty session name refused as InvalidName", "64-byte session name refused as InvalidName",
              "never reached the kernel", "SessionNotFound", "TokenNotFound", "SessionAlreadyRetrieved"]
    descriptions = [t.description for t in sc.tests]
    for phrase in wanted:
        hits = [d for d in descriptions if phrase in d]
        assert hits and all(sc.test(d).ok for d in hits), (phrase, descriptions)


@pytest.mark.timeout(1200)
def test_large_memfd_crosses_kexec_and_reports_timings(lab):
    result = lab.run(["large"])
    sc = result.scenario("large")
    print(f"\nlarge: {result.duration:.1f}s wall, stages {sc.stage_seconds} s")
    result.assert_ok()
    assert len(sc.tests) == LARGE_TESTS and sc.passed
    metrics = _metrics(sc)
    for line in sorted(metrics.items()):
        print("  metric", *line)
    for name in LARGE_METRICS:
        value, unit = metrics[f"large.{name}"]
        assert unit == "s" and value >= 0


@pytest.mark.timeout(900)
def test_corrupted_memfd_goes_red_at_exactly_the_hash_check(lab):
    result = lab.run(["memfd-basic"], debug={"corrupt": True})
    print(f"\nmemfd-basic --debug corrupt: {result.duration:.1f}s wall")
    sc = result.scenario("memfd-basic")
    assert not result.ok and sc.ok is False and not sc.passed
    assert len(sc.tests) == EXPECTED_TESTS["memfd-basic"], sc.tests
    assert [t.description for t in sc.failed_tests] == [memfd_basic.HASH_CHECK]
    failed = sc.test(memfd_basic.HASH_CHECK)
    assert any("debug corrupt flipped byte" in d for d in failed.diag), failed.diag
    # the byte written after preserve is what the new kernel handed back
    seen = [m for d in failed.diag + sc.diag
            if (m := re.search(r"is (0x[0-9a-f]+) after kexec \(flipped value (0x[0-9a-f]+)", d))]
    assert seen and seen[0][1] == seen[0][2], failed.diag + sc.diag
    assert "debug corrupt: flipped byte" in result.console


@pytest.mark.slow
@pytest.mark.timeout(3600)  # builds the 7.3 lab kernel first if it is not cached (~10 min here)
def test_memfd_preserved_on_7_2_is_retrieved_on_7_3(lab):
    result = lab.run(["cross-version"])
    sc = result.scenario("cross-version")
    print(f"\ncross-version: {result.duration:.1f}s wall, stages {sc.stage_seconds} s")
    result.assert_ok()
    assert len(sc.tests) == 6 and sc.passed
    assert sc.test("stage 0 runs on a 7.2 kernel").ok and sc.test("stage 1 runs on a 7.3 kernel").ok
    assert sc.test("SHA-256 kept across versions").ok
    assert re.search(r"KHO: exec from: 7\.2\.\S+ \(count 1\)", result.console), result.tail()
