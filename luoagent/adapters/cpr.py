"""cpr-reboot adapter: checkpoint a QEMU's device state with x-ignore-shared (RAM stays in its
memfd) to a migration URI, load it into a QEMU started with `-incoming defer`, or undo the settings;
and what QEMU measured about the RAM it wrote (RamFigures).

Functions over a `qmp_client.Qmp`; the QEMU facts are in docs/architecture.md."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from luoagent.adapters.qmp_client import Qmp
from luoagent.errors import LuoAgentError, MigrationFailed, QmpCommandFailed, QmpUnreachable


async def configure(q: Qmp, timeout: float = 30.0) -> None:
    """Select migration mode cpr-reboot with x-ignore-shared (harmless to a running guest)."""
    await q.execute("migrate-set-parameters", {"mode": "cpr-reboot"}, timeout=timeout)
    await q.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
        timeout=timeout,
    )


async def save(q: Qmp, uri: str, timeout: float = 60.0, *, configured: bool = False,
               on_started=None) -> dict:
    """Checkpoint with mode cpr-reboot + x-ignore-shared to ``uri``; wait until completed.

    ``configured``: the caller already ran configure() (before stopping the guest, so
    the blackout does not pay for it). ``on_started``: awaited once QEMU accepted the
    migration, while it is in flight (the caller's journal / test pause point). Returns the
    final query-migrate answer; MigrationFailed with QEMU's error-desc."""
    started = time.monotonic()
    if not configured:
        await configure(q, timeout)
    await _start_migration(q, "migrate", uri, "save", timeout)
    if on_started is not None:
        await on_started()
    info = await _wait_migration(q, uri, "save", started + timeout)
    info["luoagent-elapsed-s"] = time.monotonic() - started
    return info


async def load(q: Qmp, uri: str, timeout: float = 60.0) -> dict:
    """Load a cpr-reboot checkpoint into a QEMU started with ``-incoming defer``."""
    started = time.monotonic()
    await configure(q, timeout)
    await _start_migration(q, "migrate-incoming", uri, "load", timeout)
    info = await _wait_migration(q, uri, "load", started + timeout)
    info["luoagent-elapsed-s"] = time.monotonic() - started
    return info


async def _start_migration(q: Qmp, cmd: str, uri: str, what: str, timeout: float) -> None:
    # QEMU refuses some failures synchronously (fd access mode, path, blockers); to the
    # caller they are the same thing as a migration that fails later
    args: dict[str, Any] = {"uri": uri}
    if cmd == "migrate-incoming":
        # stay alive on a bad stream so query-migrate can tell us why (QEMU >= 9.1)
        args["exit-on-error"] = False
    try:
        try:
            await q.execute(cmd, args, timeout=timeout)
        except QmpCommandFailed as exc:
            if "exit-on-error" not in (exc.desc or ""):
                raise
            await q.execute(cmd, {"uri": uri}, timeout=timeout)
    except QmpCommandFailed as exc:
        raise MigrationFailed(f"cpr-reboot {what} ({uri}) refused by QEMU: {exc.desc}") from exc


async def _wait_migration(q: Qmp, uri: str, what: str, deadline: float) -> dict:
    # Polling query-migrate needs no event subscription and sees a migration that ended
    # before we looked; a 5 ms period costs nothing next to the save itself.
    while True:
        remaining = deadline - time.monotonic()
        try:
            info = await q.execute("query-migrate", timeout=max(remaining, 1.0))
        except QmpUnreachable as exc:
            raise MigrationFailed(
                f"cpr-reboot {what} via {uri}: QEMU stopped answering ({exc}); "
                "its log says why"
            ) from exc
        state = info.get("status")
        if state == "completed":
            return dict(info)
        if state in ("failed", "cancelled"):
            raise MigrationFailed(
                f"cpr-reboot {what} ({uri}) {state}: "
                f"{info.get('error-desc', 'QEMU gave no reason')}"
            )
        if remaining <= 0:
            raise MigrationFailed(
                f"cpr-reboot {what} ({uri}) did not complete in time (status {state!r})"
            )
        await asyncio.sleep(0.005)


#: query-migrate states in which a migration is still under way and can be cancelled
ACTIVE_STATES = ("setup", "active", "pre-switchover", "device", "wait-unplug")


async def cancel_and_reset(q: Qmp, timeout: float = 2.0) -> None:
    """Undo what a save set up: cancel a migration still under way (waiting up to ``timeout``
    for it to leave the active states), then mode ``normal`` and x-ignore-shared off."""
    info = await q.execute("query-migrate")
    if info.get("status") in ACTIVE_STATES:
        with contextlib.suppress(LuoAgentError):
            await q.execute("migrate_cancel")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = await q.execute("query-migrate")
            if info.get("status") not in ("cancelling", *ACTIVE_STATES):
                break
            await asyncio.sleep(0.01)
    await q.execute("migrate-set-parameters", {"mode": "normal"})
    await q.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})


@dataclass(frozen=True)
class RamFigures:
    """What QEMU measured about RAM in a finished save (query-migrate ``ram``), and only that;
    None where this QEMU did not report a figure (never a guessed 0).

    - ``pages_bytes``: bytes of RAM page data QEMU wrote into the stream (``normal-bytes``),
      from every RAM block it migrated (firmware and ROM blocks included).
    - ``zero_pages``: pages written as a zero-page marker only (``duplicate``).
    - ``blocks_bytes``: total size of the RAM blocks QEMU migrated (``total``); blocks
      x-ignore-shared skipped are not counted.
    - ``qemu_stream_bytes``: bytes QEMU counted on the stream (``transferred``)."""

    pages_bytes: int | None
    zero_pages: int | None
    blocks_bytes: int | None
    qemu_stream_bytes: int | None

    @classmethod
    def from_query_migrate(cls, info: dict) -> "RamFigures":
        ram = info.get("ram") or {}

        def figure(key: str) -> int | None:
            value = ram.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

        return cls(figure("normal-bytes"), figure("duplicate"), figure("total"), figure("transferred"))

    def guest_ram_copied_at_most(self, stream_bytes: int) -> int:
        """Upper bound on guest RAM bytes in the stream: RAM page data can only be in the
        page bytes QEMU wrote, and never more than the stream holds."""
        return stream_bytes if self.pages_bytes is None else min(self.pages_bytes, stream_bytes)

    def no_guest_block_migrated(self, guest_block_sizes: list[int]) -> bool | None:
        """True if no guest RAM backend can have been migrated: every migrated block counts
        its full size in ``blocks_bytes``, and that total is below the smallest guest backend.
        None when QEMU did not report the total."""
        if self.blocks_bytes is None or not guest_block_sizes:
            return None
        return self.blocks_bytes < min(guest_block_sizes)
