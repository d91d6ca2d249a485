"""Lab tier for `luoagent trace` (scenario trace): the tracer runs inside the lab VM against real LUO.

Every check runs in the VM (real 7.2 LUO kernel, a real kexec by the traced program); this file
reads the KTAP results and the traced lines the scenario printed, so a red check there is red here."""

from __future__ import annotations

import re

import pytest

from luoagent.lab.scenarios import trace_luo as sc

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1800)]

#: KTAP results the scenario reports (counted from its code: 19 in stage 1, 17 in stage 2)
EXPECTED_TESTS = 36

#: every expectation, as a regex over KTAP descriptions; each must match exactly one ok result
EXPECTED = [
    "^" + re.escape(sc.PTRACE_IN_VM) + "$",
    # stage 1: readable output of create / preserve / duplicate token / close
    r"^trace -- drop program: exit 0 passed through$",
    r"^readable: openat of /dev/liveupdate with the returned fd$",
    r"^readable: memfd_create shows the real memfd fd and its /memfd: link$",
    r"^readable: CREATE_SESSION decoded with the returned session fd and its \[luo_session\] link$",
    r"^readable: PRESERVE_FD shows session fd, memfd fd \+ link, token, result 0$",
    r"^readable: duplicate token shows = -1 EEXIST$",
    r"^readable: closing the outgoing session is flagged",
    "^" + re.escape(sc.SUMMARY_DROP) + "$",
    # stage 1: --pid on a running program, Ctrl-C detach
    r"^--pid: GET_NAME calls of a running program are traced$",
    "^" + re.escape(sc.DETACH_OK) + "$",
    "^" + re.escape(sc.DETACHED_EXIT) + "$",
    r"^--pid: GET_NAME on session fd \d+ named from its link, exit name decoded$",
    r"^--pid: attached/detached events; summary interrupted",
    # stage 1: --pid -f on luoagent update --dry-run with a counter guest from `luoagent vm start`
    rf"^luoagent vm start {sc.VM} ",
    "^" + re.escape(sc.UPDATE_EXIT) + "$",
    rf"^update: CREATE_SESSION luoagent/vm/{sc.VM} returns a session fd linked "
    rf"'anon_inode:\[luo_session\] luoagent/vm/{sc.VM}'$",
    rf"^update: PRESERVE_FD of memfds \(guest RAM, vmstate\) into luoagent/vm/{sc.VM}, result ok$",
    r"^update: summary counts match the traced calls",
    # stage 2: the trace of the program that preserved a memfd and kexec'd
    r"^a new kernel booted \(the traced program's kexec\)$",
    r"^the 7\.2 kernel links a session fd as 'anon_inode:\[luo_session\] lab/trace'$",
    r"^kexec trace: the traced pid is the program's$",
    r"^kexec trace: memfd_create 'lab-trace' = \d+ -> /memfd:lab-trace \(deleted\)$",
    r"^kexec trace: openat /dev/liveupdate = \d+$",
    r"^kexec trace: CREATE_SESSION 'lab/trace' = 0, returned session fd \d+ -> anon_inode:\[luo_session\] lab/trace$",
    rf"^kexec trace: PRESERVE_FD token {sc.TOKEN:#x} of memfd fd \d+ into session fd \d+ = 0$",
    r"^kexec trace: GET_NAME exit struct carries the session name$",
    r"^kexec trace: kexec_file_load decoded",
    r"^kexec trace: reboot\(KEXEC\) reported at entry",
    # stage 2: a traced retrieve in the new kernel
    r"^traced retrieve program: exit 0, memfd content identical across kexec$",
    r"^retrieve trace: RETRIEVE_SESSION 'lab/trace' = 0, returned fd \d+ -> anon_inode:\[luo_session\] lab/trace$",
    rf"^retrieve trace: RETRIEVE_FD of unknown token {sc.TOKEN + 1:#x} = -1 ENOENT$",
    rf"^retrieve trace: RETRIEVE_FD token {sc.TOKEN:#x} = 0, returned memfd fd \d+ -> / \(deleted\)$",
    r"^retrieve trace: FINISH on the session fd = 0$",
    r"^retrieve trace: closing the incoming session is not flagged",
    "^" + re.escape(sc.RETRIEVE_SUMMARY) + "$",
]

#: lines `luoagent trace` printed in the VM (the scenario shows them as KTAP diagnostics)
TRACED_LINES = [
    r"\[\d+\] ioctl\(\d+</dev/liveupdate>, LUO_CREATE_SESSION, 0x[0-9a-f]+ \{size=72, fd=-?\d+, "
    r"name=\"lab/trace\"\}\) = 0 -> \{fd=\d+<anon_inode:\[luo_session\] lab/trace>\}",
    rf"\[\d+\] ioctl\(\d+<anon_inode:\[luo_session\] lab/trace>, LUO_PRESERVE_FD, 0x[0-9a-f]+ \{{size=16, "
    rf"fd=\d+</memfd:lab-trace \(deleted\)>, token={sc.TOKEN:#x}\}}\) = 0",
    r"\[\d+\] reboot\(cmd=\"0x45584543\", cmd_name=\"KEXEC\"\) = \? \(entered\)",
    r"\[\d+\] ioctl\(\d+</dev/liveupdate>, LUO_RETRIEVE_SESSION, .*\) = 0 -> \{fd=\d+<anon_inode:\[luo_session\] lab/trace>\}",
    rf"\[\d+\] ioctl\(\d+<anon_inode:\[luo_session\] lab/trace>, LUO_RETRIEVE_FD, 0x[0-9a-f]+ \{{size=16, fd=-1, "
    rf"token={sc.TOKEN:#x}\}}\) = 0 -> \{{fd=\d+</ \(deleted\)>\}}",
    r"\[\d+\] ioctl\(\d+<anon_inode:\[luo_session\] lab/trace>, LUO_FINISH, .*\) = 0",
    r"--- summary: sessions created 0, retrieved 1, finished 1; fds preserved 0, retrieved 1; LUO calls 4; "
    r"outgoing sessions closed 0; errors: ENOENT 1; exit code 0",
    r"\[\d+\] \+\+\+ detached",
    rf"\[\d+\] close\(\d+<anon_inode:\[luo_session\] luoagent/vm/{sc.VM}>\) = 0 .*!! outgoing session "
    rf"'luoagent/vm/{sc.VM}' closed: its 2 preserved file\(s\) are unpreserved",
]


@pytest.fixture(scope="module")
def run(lab):
    result = lab.run([sc.NAME])
    s = result.scenario(sc.NAME)
    print(f"\ntrace scenario: {result.duration:.1f}s wall, {result.boots} boots, stages {s.stage_seconds} s")
    return result


def _report(result) -> str:
    s = result.scenario(sc.NAME)
    return "\n".join(f"{'ok' if t.ok else 'not ok'} {t.number} {t.description} {t.diag}" for t in s.tests) \
        + "\n--- console tail ---\n" + result.tail(60)


def test_trace_scenario_passes_across_a_real_kexec(run):
    s = run.scenario(sc.NAME)
    assert s.error is None, s.error
    assert s.passed, _report(run)
    assert [t for t in s.tests if not t.ok or t.skipped] == [], _report(run)
    assert len(s.tests) == EXPECTED_TESTS == s.plan, _report(run)
    # two stages, the second one a real kexec away (the traced program kexec'd itself)
    assert s.stages_started == 2 and run.boots == 2, _report(run)
    assert re.search(r"KHO: exec from: \S+ \(count 1\)", run.console), run.tail(60)


@pytest.mark.parametrize("pattern", EXPECTED)
def test_expected_check_present_and_ok(run, pattern):
    s = run.scenario(sc.NAME)
    found = [t for t in s.tests if re.search(pattern, t.description)]
    assert len(found) == 1, f"{pattern!r} matched {[t.description for t in found]}\n" + _report(run)
    assert found[0].ok, f"{found[0].description}: {found[0].diag}"


@pytest.mark.parametrize("pattern", TRACED_LINES)
def test_traced_output_line_in_console(run, pattern):
    s = run.scenario(sc.NAME)
    assert any(re.search(pattern, line) for line in s.diag), \
        f"no traced line matches {pattern!r}\n" + "\n".join(s.diag[-80:])
