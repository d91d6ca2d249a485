"""Lab infrastructure: the smoke scenario crosses a real kexec, and the harness can go red.

Also pure-logic checks of the KTAP parser and scenario grouping (no VM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from luoagent.errors import ScenarioFailed, UsageError
from luoagent.lab import boot
from luoagent.lab.ktap import KtapStream, to_junit
from luoagent.lab.scenarios import discover, resolve, smoke


# --- real lab VM --------------------------------------------------------------------------
@pytest.mark.lab
@pytest.mark.timeout(600)
def test_smoke_scenario_passes_across_a_real_kexec(lab):
    result = lab.run(["smoke"])
    result.assert_ok()
    sc = result.scenario("smoke")
    assert sc.test(smoke.NEW_KERNEL).ok
    assert result.boots == 2, result.tail()
    # the new kernel's own word that it came through a KHO kexec
    assert "KHO: exec from:" in result.console
    assert len(sc.stage_seconds) == 2
    print(f"smoke: {result.duration:.1f}s wall, first boot {result.timings.get('first_boot', 0):.1f}s")


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_a_failing_check_is_reported_red(lab):
    result = lab.run(["smoke"], debug={"fail": True})
    assert not result.ok
    sc = result.scenario("smoke")
    assert sc.ok is False and not sc.passed
    failed = sc.test(smoke.FAIL_ON_PURPOSE)
    assert not failed.ok
    assert any("--debug fail" in d for d in failed.diag)
    assert sc.test(smoke.NEW_KERNEL).ok  # only the sabotaged check failed
    with pytest.raises(ScenarioFailed, match="debug switch 'fail' not set"):
        result.assert_ok()
    assert "<failure" in result.junit()


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_a_stage_that_raises_fails_and_stops_its_scenario(lab):
    result = lab.run(["smoke"], debug={"raise": True})
    sc = result.scenario("smoke")
    assert not result.ok and sc.ok is False
    assert any("RuntimeError" in "\n".join(t.diag) for t in sc.failed_tests)
    assert "# lab-stage: smoke 2/2" not in result.console  # stage 2 never ran
    assert result.boots == 1


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_a_hung_stage_hits_the_hard_timeout(lab):
    result = lab.run(["smoke"], debug={"hang": True}, timeout=20)
    assert not result.ok
    assert any("timed out" in e for e in result.errors), result.errors
    sc = result.scenario("smoke")
    assert sc.ok is None and "timed out" in sc.error


# --- pure logic --------------------------------------------------------------------------
CONSOLE = """\
[    1.0] Linux version 7.2.13
KTAP version 1
1..2
# lab-boot: boot=1 hop=0 kernel=7.2.13 boot_id=a uptime=2
    KTAP version 1
    # Subtest: alpha
    # lab-stage: alpha 1/2 hop=0
    ok 1 first thing
[    3.1] luo: something from the kernel
    not ok 2 second \\# thing
    # why it failed
    # lab-stage-done: alpha 1/2 seconds=0.50
# lab-kexec: hop=0 -> 1 kernel=/lab/bzImage
    ok 3 third # SKIP not here
    1..3
not ok 1 alpha
    KTAP version 1
    # Subtest: beta
    ok 1 only
    1..1
ok 2 beta
# lab-done: boots=2 kexecs=1
"""


def test_ktap_stream_parses_runner_output_between_kernel_lines():
    k = KtapStream()
    markers = [m.kind for line in CONSOLE.splitlines() if (m := k.feed(line))]
    assert markers == ["lab-boot", "lab-stage", "lab-stage-done", "lab-kexec", "lab-done"]
    assert k.plan == 2 and k.done
    alpha, beta = k.scenarios
    assert (alpha.name, alpha.ok, alpha.plan, alpha.stage_seconds) == ("alpha", False, 3, [0.5])
    assert [(t.number, t.ok, t.skipped) for t in alpha.tests] == [(1, True, False), (2, False, False), (3, True, True)]
    assert alpha.test("second # thing").diag == ["why it failed"]
    assert beta.passed and beta.number == 2
    alpha.tests[1].ok = True  # with the failure gone, the SKIP alone still keeps alpha from passing
    alpha.ok = True
    assert not alpha.passed and [t.number for t in alpha.failed_tests] == [3]
    alpha.tests[1].ok, alpha.ok = False, False
    xml = to_junit(k.scenarios)
    assert xml.count("<testcase") == 4 and xml.count("<failure") == 1 and "<skipped/>" in xml


def test_merge_marks_unfinished_and_miscounted_scenarios():
    k = KtapStream()
    for line in CONSOLE.splitlines()[:12]:  # stops inside alpha
        k.feed(line)
    items = [boot.RunItem("scenario", "alpha", "1G", 5.0), boot.RunItem("scenario", "beta", "1G", 5.0)]
    result = boot.merge(items, [(k, CONSOLE.splitlines()[:12], ["timed out after 9s"], {})], None, 1.0)
    assert not result.ok
    assert result.scenario("alpha").error == "timed out after 9s"
    assert "never started" in result.scenario("beta").error


def test_scenarios_group_by_memory_in_order():
    items = [boot.RunItem("scenario", n, m, 1.0) for n, m in (("a", "1G"), ("b", "1G"), ("c", "3G"), ("d", "1G"))]
    assert [(m, [i.name for i in g]) for m, g in boot.group_by_memory(items)] == [
        ("1G", ["a", "b"]), ("3G", ["c"]), ("1G", ["d"])]


def test_registry_finds_smoke_and_rejects_unknown_names():
    found, broken = discover()
    assert "smoke" in found, broken
    assert resolve(["smoke"])[0].module.endswith(".smoke")
    with pytest.raises(UsageError, match="unknown lab scenario 'nope'.*smoke"):
        resolve(["nope"])


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_a_kernel_crash_mid_stage_is_reported_with_the_console_tail(lab):
    result = lab.run(["smoke"], debug={"panic": True})
    assert not result.ok
    sc = result.scenario("smoke")
    assert sc.ok is None and "stopped before the runner finished" in sc.error
    with pytest.raises(ScenarioFailed, match="(?s)Kernel panic.*sysrq"):
        result.assert_ok()


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_cli_lab_run_reports_json_and_junit(lab, tmp_path):
    import json
    import subprocess
    import sys

    junit = tmp_path / "lab.xml"
    proc = subprocess.run([sys.executable, "-m", "luoagent", "lab", "run", "smoke", "--kernel", str(lab.kernel),
                           "--debug", "fail", "--junit", str(junit), "--json"],
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 1, proc.stderr[-3000:]  # --debug fail: the run must be red
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["boots"] == 2
    (sc,) = doc["scenarios"]
    assert [t["ok"] for t in sc["tests"]].count(False) == 1
    xml = junit.read_text()
    assert xml.count("<failure") == 1 and smoke.FAIL_ON_PURPOSE in xml


def test_cli_lab_list_json_names_every_scenario():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "luoagent", "lab", "list", "--json"],
                          capture_output=True, text=True, timeout=60)
    doc = json.loads(proc.stdout)
    names = {s["name"] for s in doc["scenarios"]}
    assert "smoke" in names
    assert proc.returncode == (1 if doc["broken"] else 0)


def test_debug_switches_parse_to_ctx_debug():
    from luoagent.lab.cli import parse_debug

    assert parse_debug(["corrupt", "size=0x10", "mode=fast"]) == {"corrupt": True, "size": 16, "mode": "fast"}
    with pytest.raises(UsageError, match="bad --debug"):
        parse_debug(["=x"])


@pytest.mark.host
def test_host_qemu_wrapper_runs_qemu_11_1_from_the_rootfs(lab_qemu):
    import subprocess

    out = subprocess.run([str(lab_qemu), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "QEMU emulator version 11.1" in out.stdout
    # the wrapper must not depend on a QEMU installed on the host
    assert "ld-linux" in lab_qemu.read_text() and "/rootfs-tree/" in lab_qemu.read_text()


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_kernel_selftests_run_in_the_lab_beside_our_ktap(lab):
    result = lab.run_selftests(["liveupdate", "luo_kexec_simple"])
    result.assert_ok()
    single = result.scenario("liveupdate")
    # the kselftest harness's own results become ours, one per kernel test case
    assert sum(1 for t in single.tests if t.description.startswith("liveupdate: liveupdate_device.")) >= 10
    two_stage = result.scenario("luo_kexec_simple")
    from luoagent.lab.selftests import SELFTESTS

    spec = next(s for s in SELFTESTS if s["name"] == "luo_kexec_simple")
    assert [t.description for t in two_stage.tests] == [
        " ".join(["selftests/luo_kexec_simple", *args, "exit=0"]) for args in spec["stages"]]
    assert "SIMPLE KEXEC TEST PASSED" in result.console
    assert result.boots == 3


# --- StageContext (pure logic: the runner's side is faked with lists) ---------------------
def _ctx(debug=None):
    from luoagent.lab.stage import PersistentState, StageContext

    lines, results, saves = [], [], []
    state = PersistentState({}, lambda: saves.append(1))

    def record(passed):
        results.append(passed)
        return len(results)

    ctx = StageContext(scenario="t", stage=0, stages=2, hop=0, boot_id="b", state=state, debug=debug or {},
                       emit=lines.append, record=record, kexec=lambda: None, save=lambda: saves.append(1))
    return ctx, lines, results, saves


def test_stage_context_reports_ktap_lines_and_counts():
    ctx, lines, results, _ = _ctx()
    assert ctx.check(True, "fine") is True
    assert ctx.check(False, "bad # thing\nsecond line", "why\nexactly") is False
    ctx.skip("later", "not here")
    assert lines == ["ok 1 fine", "not ok 2 bad \\# thing second line", "# why", "# exactly",
                     "ok 3 later # SKIP not here"]
    assert results == [True, False, True] and ctx.failures == 1


def test_expect_raises_checks_type_errno_and_message():
    from luoagent.errors import LuoError, SessionExists

    ctx, lines, _, _ = _ctx()

    def boom():
        raise SessionExists("session 'x' exists", errno=17)

    assert isinstance(ctx.expect_raises(SessionExists, boom, "eexist", errno=17, match="exists"), SessionExists)
    assert ctx.expect_raises(SessionExists, boom, "wrong errno", errno=2) is None
    assert ctx.expect_raises(SessionExists, lambda: 5, "nothing raised") is None
    assert ctx.expect_raises(KeyError, boom, "wrong type") is None
    assert ctx.expect_raises((KeyError, LuoError), boom, "tuple ok") is not None
    status = [ln.split(" ", 2)[:2] for ln in lines if not ln.startswith("#")]
    assert [s[0] for s in status] == ["ok", "not", "not", "not", "ok"]
    assert any("errno 17, expected 2" in ln for ln in lines)
    assert any("nothing was raised (returned 5)" in ln for ln in lines)


def test_persistent_state_saves_on_every_top_level_change():
    ctx, _, _, saves = _ctx()
    ctx.state["a"] = 1
    ctx.state.setdefault("b", {})["x"] = 2   # nested: saved by setdefault's insert, then by ctx.save()
    ctx.state.update(c=3)
    del ctx.state["a"]
    ctx.save()
    assert dict(ctx.state) == {"b": {"x": 2}, "c": 3}
    assert len(saves) == 5


def test_run_all_orders_scenarios_by_memory_size():
    from luoagent.lab.cli import _memory_bytes

    assert [_memory_bytes(m) for m in ("1G", "512M", "3g", "2048")] == [1 << 30, 512 << 20, 3 << 30, 2048 << 20]
    assert sorted(["3G", "1G", "512M", "1G"], key=_memory_bytes) == ["512M", "1G", "1G", "3G"]


# --- the lab from an installed wheel, and its JSON progress ---------------------------------------
REPO = Path(__file__).resolve().parents[2]


def _json_lines(text: str) -> list[dict]:
    docs = []
    for line in text.splitlines():
        try:
            docs.append(json.loads(line))
        except ValueError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
    return docs


def _lab_build(luoagent: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([*luoagent, "--log-format", "json", "lab", "build", "--no-selftests", "--json"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


@pytest.mark.lab
@pytest.mark.timeout(900)
def test_lab_build_with_json_log_format_writes_only_json_on_stderr(lab, tmp_path):
    out = _lab_build([sys.executable, "-m", "luoagent"], tmp_path)  # warm: the fixture built it
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["kernel"] == str(lab.kernel)
    docs = _json_lines(out.stderr)
    assert docs and all(d.get("event") for d in docs), out.stderr


@pytest.mark.lab
@pytest.mark.timeout(1500)
def test_lab_build_runs_from_an_installed_wheel(lab, tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    [wheel] = wheels.glob("luoagent-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], check=True, capture_output=True, timeout=600)
    site = Path(subprocess.run([str(venv / "bin/python"), "-c", "import luoagent, os; print(os.path.dirname(luoagent.__file__))"],
                               check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip())
    assert site.is_relative_to(venv), site  # the wheel's copy, not this checkout

    out = _lab_build([str(venv / "bin/luoagent")], tmp_path)
    assert out.returncode == 0, out.stderr
    built = json.loads(out.stdout)
    assert built["kernel"] == str(lab.kernel) and Path(built["shim"]).is_file()
    _json_lines(out.stderr)

    # without its package data the installed lab says what it lacks, no traceback
    shutil.rmtree(site / "lab" / "kernel-configs")
    broken = _lab_build([str(venv / "bin/luoagent")], tmp_path)
    assert broken.returncode == 1, broken.stderr
    assert "kernel config fragment luo.config is missing" in broken.stderr, broken.stderr
    assert "Traceback" not in broken.stderr
