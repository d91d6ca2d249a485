"""Shared pytest fixtures: QEMU 11.1 from the lab rootfs (``lab_qemu``) and the built LUO lab (``lab``).

Both FAIL (never skip) when they cannot be provided: a missing lab is a red test run, not a green one."""

from __future__ import annotations

import os
import tempfile

import pytest

# Every luoagent command a test runs gets a private run dir and VM root unless the test sets its
# own: a test run never takes the lock of, or sees, a real daemon's /run/luoagent on the machine
# (nor another test run's).
_PRIVATE = tempfile.mkdtemp(prefix="luoagent-tests-")
os.environ.setdefault("LUOAGENT_RUN_DIR", os.path.join(_PRIVATE, "run"))
os.environ.setdefault("LUOAGENT_VM_ROOT", os.path.join(_PRIVATE, "vms"))

# Lab artifacts are built once, after collection and before the first test, so a cold build
# (kernel ~5-16 min, rootfs ~1-2 min) never counts toward any single test's timeout.
_LAB_BUILDS: dict[str, object] = {}   # fixture name -> built value or the LuoAgentError it raised


def _build(name: str):
    from luoagent.report import Progress
    from luoagent.errors import LuoAgentError
    from luoagent.lab.build import build_lab, host_qemu

    if name not in _LAB_BUILDS:
        try:
            if name == "lab":
                # Kernel selftests are built on first lab.run_selftests(), so their build cannot
                # block scenarios.
                _LAB_BUILDS[name] = build_lab(progress=Progress("lab", interval=30.0), selftests=False)
            else:
                _LAB_BUILDS[name] = host_qemu(Progress("lab", interval=30.0))
        except LuoAgentError as exc:
            _LAB_BUILDS[name] = exc
    return _LAB_BUILDS[name]


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    wanted = set()
    for item in session.items:
        wanted.update(getattr(item, "fixturenames", ()))
    for name in ("lab", "lab_qemu"):
        if name in wanted:
            _build(name)
    if "lab" in wanted:
        _prebuild_other_kernels(_LAB_BUILDS["lab"], session.items)


_KERNEL_THREADS: list = []


def _prebuild_other_kernels(lab, items) -> None:
    """Build the other kernels that the collected lab tests' scenarios cross into (7.3, 7.2.12)
    in a background thread while the host tier runs, which mostly waits on guests: from an empty
    cache this takes their builds (~6 min each) off the critical path. A scenario that needs one
    meanwhile waits on the build's lock; a failed build is simply retried (and reported) by that
    scenario. pytest_sessionfinish waits for the thread, so no make outlives the session."""
    import threading
    import types

    from luoagent.errors import LuoAgentError
    from luoagent.report import Progress

    if isinstance(lab, Exception):
        return
    kernels = []
    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        for value in vars(module).values():  # the scenario modules a lab test file reads results of
            if (isinstance(value, types.ModuleType) and value.__name__.startswith("luoagent.lab.scenarios.")
                    and getattr(value, "KERNELS", None)):
                kernels.append(tuple(str(k) for k in value.KERNELS))
    series = lab.other_kernel_series(kernels)

    def build() -> None:
        for one in series:
            try:
                lab.kernel_for(one, Progress(f"lab kernel {one} (background)", interval=60.0))
            except LuoAgentError:
                pass  # the scenario that needs it builds it again and fails with the reason

    if series:
        thread = threading.Thread(target=build, name="lab-kernels", daemon=True)
        thread.start()
        _KERNEL_THREADS.append(thread)


def pytest_sessionfinish(session, exitstatus):
    for thread in _KERNEL_THREADS:
        thread.join()


@pytest.fixture(scope="session")
def lab_qemu():
    """Path to a runnable qemu-system-x86_64 11.1 on the host (the lab rootfs's QEMU via its loader).

    Session-scoped; builds the cached rootfs tree first if needed (~1-2 min, needs root and the
    Debian mirror). Use ``-accel tcg``, never kvm. Fails the test if QEMU cannot be provided."""
    value = _build("lab_qemu")
    if isinstance(value, Exception):
        pytest.fail(f"lab_qemu: cannot provide QEMU 11.1 from the lab rootfs: {value}", pytrace=False)
    return value


@pytest.fixture(scope="session")
def lab():
    """The built LUO lab (``luoagent.lab.build.Lab``); session-scoped, built once.

    API (stable; scenario and workflow tests rely on it)::

        result = lab.run(["memfd-basic", "multi"], debug={"corrupt": True}, timeout=None)
        result.ok                       # every scenario finished with only ok results
        result.assert_ok()              # raises ScenarioFailed: failures + last 50 console lines
        sc = result.scenario("memfd-basic")   # ScenarioResult; also result.scenarios[name]
        sc.passed, sc.ok, sc.error      # passed: finished ok and no failed test
        sc.tests                        # [TestResult(number, description, ok, skipped, diag)]
        sc.test("retrieved memfd has the SHA-256 it had before kexec").ok
        sc.failed_tests, sc.stage_seconds, sc.diag
        result.console, result.tail(50), result.console_log, result.boots, result.errors
        result.timings, result.duration, result.junit(), result.to_json()
        lab.run_selftests(["liveupdate"])     # the kernel's own LUO selftests (same LabResult)
        lab.kernel, lab.qemu, lab.root_image, lab.guest   # paths of the built pieces

    ``run`` takes scenario NAMEs (see ``luoagent lab list``); ``debug`` becomes ``ctx.debug``
    in the VM; ``timeout`` overrides each stage's limit (seconds); ``echo=print`` streams the
    serial console live (e.g. with ``pytest -s``). A failing scenario does
    not raise — check ``result.ok`` — but a VM that never boots raises LabBootError.

    The kernel: $LUOAGENT_LAB_KERNEL (a bzImage) if set, else lab-kernel's cached/built one.
    Built once per session right after collection (see pytest_collection_finish). Fails
    (never skips) when the lab cannot be built."""
    value = _build("lab")
    if isinstance(value, Exception):
        pytest.fail(f"lab: cannot build the LUO lab: {value}"
                    + ("" if os.environ.get("LUOAGENT_LAB_KERNEL") else
                       " (set LUOAGENT_LAB_KERNEL=/path/to/bzImage to use a prebuilt LUO kernel)"),
                    pytrace=False)
    return value
