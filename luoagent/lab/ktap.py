"""Parses the lab runner's KTAP from a serial console stream (kernel messages interleaved) into results.

Also renders results as JUnit XML for CI. Lines are fed one at a time so the host can act live."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from xml.sax.saxutils import escape, quoteattr

_RESULT = re.compile(r"^(?P<indent>\s*)(?P<status>not ok|ok) (?P<num>\d+)(?: (?P<desc>.*?))?"
                     r"(?:\s+#\s*(?P<directive>SKIP|TODO)\b\s*(?P<reason>.*))?\s*$")
_SUBTEST = re.compile(r"^\s+# Subtest: (?P<name>\S+)")
_PLAN = re.compile(r"^(?P<indent>\s*)1\.\.(?P<n>\d+)\s*$")
_DIAG = re.compile(r"^(?P<indent>\s*)# ?(?P<text>.*)$")
_MARKER = re.compile(r"^\s*# (?P<kind>lab-[a-z-]+):\s*(?P<rest>.*)$")


@dataclass
class TestResult:
    number: int
    description: str
    ok: bool
    skipped: bool = False
    diag: list[str] = field(default_factory=list)


@dataclass
class ScenarioResult:
    name: str
    number: int = 0
    ok: bool | None = None           # None: the scenario never finished
    plan: int | None = None
    tests: list[TestResult] = field(default_factory=list)
    stages_done: int = 0             # stages that returned to the runner
    stages_started: int = 0          # includes stages that kexec'd by themselves
    stage_seconds: list[float] = field(default_factory=list)
    diag: list[str] = field(default_factory=list)
    error: str | None = None         # why it did not finish (VM died, timeout)

    @property
    def passed(self) -> bool:
        # A skipped check proved nothing, so it never counts as a pass.
        return bool(self.ok) and all(t.ok and not t.skipped for t in self.tests)

    @property
    def failed_tests(self) -> list[TestResult]:
        return [t for t in self.tests if not t.ok or t.skipped]

    def test(self, description: str) -> TestResult:
        """The result whose description is ``description`` (KeyError lists what there is)."""
        for t in self.tests:
            if t.description == description:
                return t
        raise KeyError(f"no test {description!r} in scenario {self.name}; have: "
                       + "; ".join(t.description for t in self.tests))


@dataclass
class Marker:
    kind: str        # lab-boot, lab-stage, lab-stage-done, lab-kexec, lab-done, lab-error
    rest: str


class KtapStream:
    """Feed console lines; collects scenarios and returns lab markers so the caller can time them."""

    def __init__(self) -> None:
        self.scenarios: list[ScenarioResult] = []
        self.plan: int | None = None
        self.current: ScenarioResult | None = None
        self.last_test: TestResult | None = None
        self.done = False
        self.errors: list[str] = []

    def feed(self, line: str) -> Marker | None:
        line = line.rstrip("\r\n")
        m = _MARKER.match(line)
        if m:
            marker = Marker(m["kind"], m["rest"])
            if marker.kind == "lab-done":
                self.done = True
            elif marker.kind == "lab-error":
                self.errors.append(marker.rest)
            elif marker.kind == "lab-stage" and self.current is not None:
                self.current.stages_started += 1
            elif marker.kind == "lab-stage-done" and self.current is not None:
                self.current.stages_done += 1
                sec = re.search(r"seconds=([\d.]+)", marker.rest)
                if sec:
                    self.current.stage_seconds.append(float(sec[1]))
            return marker
        m = _SUBTEST.match(line)
        if m:
            self.current = ScenarioResult(name=m["name"])
            self.scenarios.append(self.current)
            self.last_test = None
            return None
        m = _RESULT.match(line)
        if m:
            ok = m["status"] == "ok"
            if m["indent"] and self.current is not None:
                t = TestResult(int(m["num"]), (m["desc"] or "").replace("\\#", "#"), ok,
                               skipped=m["directive"] == "SKIP")
                self.current.tests.append(t)
                self.last_test = t
            elif not m["indent"]:
                name = (m["desc"] or "").strip()
                target = self.current if self.current is not None and self.current.name == name else None
                if target is None:
                    target = next((s for s in self.scenarios if s.name == name), None)
                if target is not None:
                    target.ok = ok
                    target.number = int(m["num"])
                self.current = None
                self.last_test = None
            return None
        m = _PLAN.match(line)
        if m:
            if m["indent"] and self.current is not None:
                self.current.plan = int(m["n"])
            elif not m["indent"]:
                self.plan = int(m["n"])
            return None
        m = _DIAG.match(line)
        if m and line.lstrip().startswith("#") and self.current is not None:
            if self.last_test is not None and not self.last_test.ok:
                self.last_test.diag.append(m["text"])
            else:
                self.current.diag.append(m["text"])
        return None


def to_junit(scenarios: list[ScenarioResult], suite: str = "luoagent-lab") -> str:
    """JUnit XML: one testsuite per scenario, one testcase per KTAP result."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', f"<testsuites name={quoteattr(suite)}>"]
    for sc in scenarios:
        failures = sum(1 for t in sc.tests if not t.ok) + (1 if sc.error or sc.ok is False and
                                                            not sc.failed_tests else 0)
        skipped = sum(1 for t in sc.tests if t.skipped)
        out.append(f'  <testsuite name={quoteattr(sc.name)} tests="{len(sc.tests)}" '
                   f'failures="{failures}" skipped="{skipped}" time="{sum(sc.stage_seconds):.2f}">')
        for t in sc.tests:
            out.append(f"    <testcase classname={quoteattr('lab.' + sc.name)} name={quoteattr(t.description)}>")
            if t.skipped:
                out.append("      <skipped/>")
            elif not t.ok:
                out.append(f"      <failure message={quoteattr(t.description)}>{escape(chr(10).join(t.diag))}</failure>")
            out.append("    </testcase>")
        if sc.error or (sc.ok is False and not sc.failed_tests):
            out.append(f"    <testcase classname={quoteattr('lab.' + sc.name)} name=\"scenario completes\">")
            out.append(f"      <failure message={quoteattr(sc.error or 'scenario reported not ok')}>"
                       f"{escape(chr(10).join(sc.diag[-50:]))}</failure>")
            out.append("    </testcase>")
        out.append("  </testsuite>")
    out.append("</testsuites>")
    return "\n".join(out) + "\n"
