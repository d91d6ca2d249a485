"""Unit tier for the lab's result API that every lab test file uses: `LabResult.require`
passes only a check the scenario reported ok and not skipped, and says why otherwise."""

from __future__ import annotations

import pytest

from luoagent.errors import ScenarioFailed
from luoagent.lab.boot import LabResult
from luoagent.lab import ktap
from luoagent.lab.ktap import ScenarioResult


def _result() -> LabResult:
    sc = ScenarioResult(name="s", ok=True, tests=[
        ktap.TestResult(1, "good", True), ktap.TestResult(2, "bad", False, diag=["counter went back"]),
        ktap.TestResult(3, "skipped", True, skipped=True)])
    return LabResult(ok=False, scenarios={"s": sc}, console="boot\nlast line", console_log=None, duration=1.0)


def test_require_passes_an_ok_check():
    _result().require("s", "good")


@pytest.mark.parametrize("desc, needle", [("bad", "not ok\ncounter went back"), ("skipped", "skipped: skipped")])
def test_require_fails_a_failed_or_skipped_check_with_its_reasons(desc, needle):
    with pytest.raises(ScenarioFailed, match=needle) as exc:
        _result().require("s", desc)
    assert "last line" in str(exc.value)


def test_require_names_what_is_there_when_the_check_is_missing():
    with pytest.raises(KeyError, match="good"):
        _result().require("s", "nope")
