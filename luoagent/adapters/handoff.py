"""Handoff adapter: move a running guest's device state from one QEMU to a second one started
beside it on the same host, over a unix socket, with x-ignore-shared (the RAM stays in its memfd).

Functions over two `qmp_client.Qmp` connections; which process runs the guest is the caller's
policy (workflows/upgrade.py). The QEMU facts are in docs/facts.md."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from luoagent.adapters.qmp_client import Qmp
from luoagent.errors import LuoAgentError, MigrationFailed, QmpCommandFailed, QmpUnreachable

#: query-migrate states in which a migration is still under way and can be cancelled
ACTIVE_STATES = ("setup", "active", "pre-switchover", "device", "wait-unplug")

#: capabilities both sides need: RAM blocks backed by a shared named file are skipped, and
#: MIGRATION events announce each state change (the destination's "completed" is the cue to
#: start the guest there without a polling delay)
_CAPS = ("x-ignore-shared", "events")


async def _set_caps(q: Qmp, state: bool, timeout: float) -> None:
    await q.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": c, "state": state} for c in _CAPS]},
        timeout=timeout,
    )


async def receive(q_new: Qmp, uri: str, timeout: float = 10.0) -> None:
    """Make a QEMU started with ``-incoming defer`` listen on ``uri`` for the device state."""
    await q_new.execute("migrate-set-parameters", {"mode": "normal"}, timeout=timeout)
    await _set_caps(q_new, True, timeout)
    try:
        await q_new.execute("migrate-incoming", {"uri": uri, "exit-on-error": False}, timeout=timeout)
    except QmpCommandFailed as exc:
        raise MigrationFailed(f"the new QEMU refused to listen on {uri}: {exc.desc}") from exc


async def migration_parameters(q: Qmp) -> dict:
    """The settings start_send() changes, to hand back to reset() afterwards."""
    params = await q.execute("query-migrate-parameters")
    return {"mode": params.get("mode", "normal")}


async def start_send(q_old: Qmp, uri: str, timeout: float = 10.0, *, hold_before_switchover: bool = False) -> None:
    """Start sending the device state of ``q_old`` to ``uri`` (mode normal + x-ignore-shared).

    ``hold_before_switchover``: QEMU stops in state ``pre-switchover`` (guest stopped, device
    state not sent yet) until continue_switchover(); tests use it to fail a migration midway."""
    await q_old.execute("migrate-set-parameters", {"mode": "normal"}, timeout=timeout)
    await _set_caps(q_old, True, timeout)
    await q_old.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "pause-before-switchover", "state": hold_before_switchover}]}, timeout=timeout)
    try:
        await q_old.execute("migrate", {"uri": uri}, timeout=timeout)
    except QmpCommandFailed as exc:
        raise MigrationFailed(f"the old QEMU refused to migrate to {uri}: {exc.desc}") from exc


async def wait_state(q_old: Qmp, state: str, timeout: float) -> dict:
    """Poll query-migrate until the migration is in ``state``; MigrationFailed otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        info = await q_old.execute("query-migrate")
        if info.get("status") == state:
            return dict(info)
        if info.get("status") in ("failed", "cancelled", "completed") or time.monotonic() > deadline:
            raise MigrationFailed(f"the migration did not reach {state!r} (status {info.get('status')!r}: "
                                  f"{info.get('error-desc', '')})")
        await asyncio.sleep(0.005)


async def continue_switchover(q_old: Qmp) -> None:
    """Let a migration held in ``pre-switchover`` send the device state."""
    await q_old.execute("migrate-continue", {"state": "pre-switchover"})


async def wait_sent(q_old: Qmp, deadline: float, what: str = "handoff") -> dict:
    """Poll query-migrate on the sending side until ``completed``; MigrationFailed with QEMU's
    reason if it fails, is cancelled, or the deadline (time.monotonic) passes."""
    while True:
        remaining = deadline - time.monotonic()
        try:
            info = await q_old.execute("query-migrate", timeout=max(remaining, 1.0))
        except QmpUnreachable as exc:
            raise MigrationFailed(f"{what}: the old QEMU stopped answering ({exc})") from exc
        state = info.get("status")
        if state == "completed":
            return dict(info)
        if state in ("failed", "cancelled"):
            raise MigrationFailed(f"{what} {state}: {info.get('error-desc', 'QEMU gave no reason')}")
        if remaining <= 0:
            raise MigrationFailed(f"{what} did not complete in time (status {state!r})")
        await asyncio.sleep(0.005)


async def reset(q_old: Qmp, saved: dict | None = None, timeout: float = 5.0) -> None:
    """Undo what start_send() set up on the old QEMU: cancel a migration still under way
    (waiting up to ``timeout`` for it to end), capabilities off, saved parameters back."""
    info = await q_old.execute("query-migrate")
    if info.get("status") in ACTIVE_STATES:
        with contextlib.suppress(LuoAgentError):
            await q_old.execute("migrate_cancel")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await q_old.execute("query-migrate")
            if info.get("status") not in ("cancelling", *ACTIVE_STATES):
                break
            await asyncio.sleep(0.01)
    await _set_caps(q_old, False, timeout)
    with contextlib.suppress(QmpCommandFailed):  # only a QEMU that was a sender has it set
        await q_old.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "pause-before-switchover", "state": False}]})
    params: dict[str, Any] = {"mode": (saved or {}).get("mode") or "normal"}
    await q_old.execute("migrate-set-parameters", params)


def bytes_moved(info: dict) -> int:
    """Bytes QEMU put into the migration stream (query-migrate ``ram.transferred`` counts the
    whole stream: RAM blocks that were not skipped, i.e. ROMs, plus device state)."""
    return int((info.get("ram") or {}).get("transferred", 0))
