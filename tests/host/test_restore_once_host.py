"""Host tier: once a restored guest ran (`cont` answered), a later failure (here: its VM record
cannot be written, as with ENOSPC in /run) must not kill it, write a rescue image or offer a
retry — a second QEMU on the same disks would run the guest twice.

Real QEMU 11.1 and a real cpr-reboot checkpoint of the counter guest, loaded through
`restore_from_rescue`, which shares `start_incoming` with the post-kexec restore."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from luoagent.lab import guest
from luoagent.workflows import restore

from test_update_rollback_host import RAM, checkpoint_into_rescue, guest_elf, vms  # noqa: F401  (fixtures used by name)

pytestmark = [pytest.mark.host, pytest.mark.timeout(600)]


def test_failure_after_cont_keeps_the_guest_running_and_offers_no_retry(vms, lab_qemu, tmp_path):
    a = vms("a")
    _record, rescue_dir = checkpoint_into_rescue(a, lab_qemu, tmp_path / "rescue")
    os.close(a.ram_fd)
    a.ram_fd = None
    ram_file = Path(__import__("json").loads((rescue_dir / "restore.json").read_text())["ram_files"]["ram0"])
    # the VM record cannot be written: vm.json is a directory (bookkeeping fails after cont)
    vm_root = tmp_path / "vms"
    (vm_root / "a" / "vm.json").mkdir(parents=True)
    before = sorted(p.name for p in (tmp_path / "rescue").iterdir())

    result = restore.restore_from_rescue(rescue_dir, restore.RestoreOptions(qemu=str(lab_qemu), vm_root=vm_root,
                                                                           rescue_dir=tmp_path / "rescue",
                                                                           timeout=60))
    [v] = result["vms"]
    try:
        assert not result["ok"] and v["resumed"] is True and v["pid"] > 0, v
        assert "runs again" in v["error"] and "NOT restored again" in v["error"], v
        assert v["retry"].startswith("none:") and not v["rescue"], v
        assert sorted(p.name for p in (tmp_path / "rescue").iterdir()) == before  # no new rescue image
        # the one QEMU still runs the guest, counter rising
        os.kill(v["pid"], 0)
        fd = os.open(ram_file, os.O_RDONLY)
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            assert guest.read_state(fd).counter > c1
        finally:
            os.close(fd)
    finally:
        if v.get("pid"):
            try:
                os.kill(v["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
