"""Test-only switches, honoured only in explicit test mode (`luoagent --test-mode`): injected
faults (LUOAGENT_FAULT) and skipped host steps (LUOAGENT_TEST_SKIP), read here and nowhere else.

Without --test-mode the variables are ignored (a warning says so), so a stray environment cannot
inject faults into a real host. In test mode `update` never kexecs: it makes the reboot syscall
only when no kexec image is loaded, so the syscall must fail (docs/architecture.md).
Fault points: update's after-preflight, after-preserve-ram, quiesce[:VM], after-quiesce,
after-manifest, reboot; restore's restore-vm[:VM] and corrupt-ram-sample[:VM] (flips a byte of a
sampled RAM page of the retrieved memfd before the sample check). A bare point fires for every VM."""

from __future__ import annotations

import os

from luoagent.errors import LuoAgentError, UpdateError

FAULT_ENV = "LUOAGENT_FAULT"
SKIP_ENV = "LUOAGENT_TEST_SKIP"
#: the CLI flag that turns test mode on (nothing else does)
FLAG = "--test-mode"

_enabled = False


def enable() -> None:
    """Honour the test switches in this process (`luoagent --test-mode`) and say so on stderr."""
    global _enabled
    _enabled = True
    from luoagent import report

    report.echo("luoagent", f"luoagent: TEST MODE ({FLAG}): {FAULT_ENV}={os.environ.get(FAULT_ENV, '')!r} "
                f"{SKIP_ENV}={os.environ.get(SKIP_ENV, '')!r} are honoured; this run will not kexec")


def enabled() -> bool:
    return _enabled


def ignored_switches() -> list[str]:
    """Test variables set in the environment of a run that is not in test mode (to warn about)."""
    return [name for name in (FAULT_ENV, SKIP_ENV) if os.environ.get(name) and not _enabled]


def _listed(name: str) -> set[str]:
    if not _enabled:
        return set()
    return {x.strip() for x in os.environ.get(name, "").split(",") if x.strip()}


def skipped() -> set[str]:
    """Host steps the test tier skips (``luo``, ``kexec-load``, ``other-qemus``: the loss check
    lists only the VM root, not other people's QEMUs on a shared test machine); always empty
    outside test mode."""
    return _listed(SKIP_ENV)


def armed(point: str, vm: str | None = None) -> bool:
    """True if a fault is injected at ``point`` (for ``vm``, if given); never outside test mode."""
    faults = _listed(FAULT_ENV)
    return point in faults or (vm is not None and f"{point}:{vm}" in faults)


def fault(point: str, vm: str | None = None, error: type[LuoAgentError] = UpdateError) -> None:
    """Raise ``error`` if a fault is injected at ``point`` (test only)."""
    if not armed(point, vm):
        return
    message = f"fault injected at {point}{f' for VM {vm}' if vm else ''} ({FAULT_ENV}, test only)"
    if error is UpdateError:
        raise UpdateError(message, step=point, vm=vm)
    raise error(message)
