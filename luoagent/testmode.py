"""Test-only switches, read from the environment in one place: injected faults (LUOAGENT_FAULT)
and skipped host steps (LUOAGENT_TEST_SKIP). Production code asks here; nothing else reads them.

Fault points: update's after-preflight, after-preserve-ram, quiesce[:VM], after-quiesce,
after-manifest, reboot; restore's restore-vm[:VM]. A bare point fires for every VM."""

from __future__ import annotations

import os

from luoagent.errors import LuoAgentError, UpdateError

FAULT_ENV = "LUOAGENT_FAULT"
SKIP_ENV = "LUOAGENT_TEST_SKIP"


def _listed(name: str) -> set[str]:
    return {x.strip() for x in os.environ.get(name, "").split(",") if x.strip()}


def skipped() -> set[str]:
    """Host steps the test tier skips (``luo``, ``kexec-load``); empty in production."""
    return _listed(SKIP_ENV)


def armed(point: str, vm: str | None = None) -> bool:
    """True if a fault is injected at ``point`` (for ``vm``, if given)."""
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
