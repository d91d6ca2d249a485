"""Test-only switches, honoured only in explicit test mode (`luoagent --test-mode`): injected
faults (LUOAGENT_FAULT) and skipped host steps (LUOAGENT_TEST_SKIP), read here and nowhere else.

Without --test-mode the variables are ignored (a warning says so), so a stray environment cannot
inject faults into a real host. In test mode `update` never kexecs: it makes the reboot syscall
only when no kexec image is loaded, so the syscall must fail (docs/architecture.md).
Fault points: update's after-preflight, after-preserve-ram, quiesce[:VM], after-quiesce,
after-manifest, reboot; restore's restore-vm[:VM] and corrupt-ram-sample[:VM] (flips a byte of a
sampled RAM page of the retrieved memfd before the sample check); `vm upgrade`'s upgrade-start-new[:VM] (the
new QEMU gets an option it refuses), upgrade-before-migrate[:VM], upgrade-migrate[:VM] (the
migration is held before switchover, guest stopped, and the new QEMU is SIGKILLed there),
upgrade-hold[:VM] (held there up to 30 s, for a signal sent to luoagent midway), upgrade-after-switch[:VM] (the new
QEMU is SIGKILLed once it holds the whole device state). A bare point fires for every VM.
Pause points (LUOAGENT_PAUSE=POINT[:VM], for tests that kill the agent there with a real
signal): after-preflight, preserve-ram[:VM], quiesce-migrating[:VM] (migration in flight),
after-quiesce, after-manifest; the restore's restore-after-manifest (manifest read, journal open),
restore-after-retrieve[:VM] (its memfds retrieved, no QEMU yet), restore-after-qemu-start[:VM]
(QEMU answers QMP, vmstate not loaded) and restore-after-cont[:VM] (cont answered, session not
finished); LUOAGENT_PAUSE_SECONDS bounds the wait (default: forever)."""

from __future__ import annotations

import asyncio
import os

from luoagent.errors import LuoAgentError, UpdateError

FAULT_ENV = "LUOAGENT_FAULT"
SKIP_ENV = "LUOAGENT_TEST_SKIP"
PAUSE_ENV = "LUOAGENT_PAUSE"
PAUSE_SECONDS_ENV = "LUOAGENT_PAUSE_SECONDS"
#: the line a paused run prints on stderr (tests wait for it before sending the signal)
PAUSED_BANNER = "TEST MODE: paused at"
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
    return [name for name in (FAULT_ENV, SKIP_ENV, PAUSE_ENV) if os.environ.get(name) and not _enabled]


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


#: the pause point this process is waiting at ("" when none), for `luoagent status`
paused_at = ""


async def pause(point: str, vm: str | None = None) -> None:
    """Wait at ``point`` if LUOAGENT_PAUSE names it (test only), so a test can send a real
    signal to a process that is exactly there. Cancellable (SIGTERM rollback still works)."""
    global paused_at
    if not (point in _listed(PAUSE_ENV) or (vm is not None and f"{point}:{vm}" in _listed(PAUSE_ENV))):
        return
    from luoagent import report

    where = f"{point}{f':{vm}' if vm else ''}"
    paused_at = where
    report.echo("luoagent", f"{PAUSED_BANNER} {where} (pid {os.getpid()})")
    seconds = float(os.environ.get(PAUSE_SECONDS_ENV) or 0) or 365 * 86400.0
    try:
        await asyncio.sleep(seconds)
    finally:
        paused_at = ""
