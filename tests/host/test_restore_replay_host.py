"""Host tier: what a restarted restore does with the QEMU an interrupted one left behind, with
real QEMU 11.1 counter guests (no LUO needed for this part): a QEMU whose guest never ran is
SIGKILLed before the VM is started again; one found running is adopted, never killed; a
journaled pid that now names another process (start time differs) is left alone.

The whole resumed restore (sessions from the fd store, finish, FDSTOREREMOVE) needs LUO and
systemd: that proof is the systemd lab's."""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from luoagent import manifest as mf
from luoagent.adapters import procfs, qmp_client
from luoagent.workflows import restore, restore_journal

from test_update_rollback_host import RAM, guest_elf, vms  # noqa: F401  (fixtures used by name)

pytestmark = [pytest.mark.host, pytest.mark.timeout(600)]


def _preserved(name: str, sock) -> mf.PreservedVm:
    return mf.PreservedVm(name=name, binary="", argv=[], qmp_socket=str(sock),
                          ram=[mf.RamRecord(id="ram0", size=RAM, token=1)],
                          vmstate=mf.VmstateRecord(token=mf.VMSTATE_TOKEN, size=1), was_running=True,
                          stopped_at_ns=0, saved_at_ns=0, qemu_version="11.1.3", ram_bytes_copied=0)


def _job(tmp_path) -> restore.RestoreJob:
    return restore.RestoreJob(restore.RestoreOptions(vm_root=tmp_path / "vms", timeout=30), restore.SessionSource())


def test_a_qemu_whose_guest_never_ran_is_killed_a_running_one_adopted(vms, tmp_path):
    a, b = vms("a"), vms("b")

    async def stop_b():
        async with await qmp_client.Qmp.connect(b.sock, timeout=30, process=b.proc) as q:
            await q.stop()  # b's QEMU as an interrupted restore leaves it: up, guest not running

    asyncio.run(stop_b())
    job = _job(tmp_path)
    entry_a = {"step": "qemu-started", "pid": a.proc.pid, "pid_start": procfs.start_time(a.proc.pid)}
    entry_b = {"step": "qemu-started", "pid": b.proc.pid, "pid_start": procfs.start_time(b.proc.pid)}
    assert restore_journal.next_action(entry_b) == restore_journal.RESTART

    assert asyncio.run(job._stop_leftover(_preserved("b", b.sock), entry_b)) == restore_journal.START
    assert b.proc.wait(15) is not None  # SIGKILLed: the VM may now be started again

    # a's guest runs (it resumed after all): adopted, never killed
    assert asyncio.run(job._stop_leftover(_preserved("a", a.sock), entry_a)) == restore_journal.ADOPT
    time.sleep(0.5)
    assert a.proc.poll() is None


def test_a_journaled_pid_that_names_another_process_now_is_left_alone(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        entry = {"step": "qemu-started", "pid": other.pid, "pid_start": procfs.start_time(other.pid) + 1}
        gone_sock = tmp_path / "qmp.sock"  # no QEMU serves it
        assert asyncio.run(_job(tmp_path)._stop_leftover(_preserved("c", gone_sock), entry)) == restore_journal.START
        time.sleep(0.3)
        assert other.poll() is None  # the pid was reused by another process: not ours to kill
    finally:
        other.kill()
        other.wait()
