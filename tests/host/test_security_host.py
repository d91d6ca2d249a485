"""Host tier for identity (issue 13): a QEMU started with `vm start --user` runs unprivileged,
`update` records the identity the kernel reports, and a restored QEMU runs as that identity
again (-run-with user=) with the guest continuing — real QEMU 11.1, real counter guest.

LUO and kexec_file_load are skipped in explicit --test-mode (this host kernel has no LUO); the
same restore path across a real kexec runs in the lab (vm-update: VM a runs as nobody)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from luoagent.adapters import procfs
from luoagent.lab import guest

from test_update_rollback_host import HOST_SKIP, LANDING_OK, REPO, RAM, checkpoint_into_rescue, guest_elf, kernel_image, run_update, vms  # noqa: F401

pytestmark = [pytest.mark.host, pytest.mark.timeout(600)]
NOBODY = (65534, 65534)


def _cli(lab_qemu, *argv, test_mode=False):
    env = dict(os.environ, LUOAGENT_QEMU=str(lab_qemu), PYTHONPATH=str(REPO))
    env.pop("LUOAGENT_FAULT", None)
    mode = []
    if test_mode:
        env["LUOAGENT_TEST_SKIP"] = HOST_SKIP
        mode = ["--test-mode"]
    return subprocess.run([sys.executable, "-m", "luoagent", *mode, *argv], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def _serial_counter(path: Path) -> int:
    counters = guest.serial_counters(path.read_text()) if path.exists() else []
    return counters[-1] if counters else -1


def test_vm_start_user_and_update_keep_the_qemu_unprivileged(lab_qemu, guest_elf, kernel_image, tmp_path):  # noqa: F811
    root = tmp_path / "vms"
    r = _cli(lab_qemu, "vm", "--root", str(root), "start", "g", "--memory", "64M", "--user", "nobody", "--json",
             "--", "-machine", "pc", "-kernel", str(guest_elf))
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    pid = record["pid"]
    try:
        assert procfs.identity(pid) == NOBODY
        assert ["-run-with", "user=65534:65534"] == record["argv"][record["argv"].index("-run-with"):][:2]
        listed = json.loads(_cli(lab_qemu, "vm", "--root", str(root), "list", "--json").stdout)["vms"]
        assert [(v["name"], v["uid"], v["status"]) for v in listed] == [("g", 65534, "running")]
        doc = json.loads(_cli(lab_qemu, "doctor", "--no-qemu", "--json", "--vm-root", str(root)).stdout)
        [check] = [c for c in doc["checks"] if c["name"] == "vm-identity"]
        assert check["ok"] and "no VM runs as root" in check["detail"], check

        # the dry run stops it, saves its vmstate, records who it runs as, then resumes it
        r = _cli(lab_qemu, "update", "--dry-run", "--json", "--kernel", str(kernel_image), *LANDING_OK, "--vm-root", str(root),
                 test_mode=True)
        assert r.returncode == 0, r.stderr
        [v] = json.loads(r.stdout)["vms"]
        assert (v["uid"], v["gid"]) == NOBODY and v["was_running"], v
        serial = Path(record["serial_log"])
        c1 = _serial_counter(serial)
        deadline = time.monotonic() + 30
        while _serial_counter(serial) <= c1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _serial_counter(serial) > c1, "the guest did not continue after the dry run"
        assert procfs.identity(pid) == NOBODY
    finally:
        if procfs.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_restore_runs_qemu_as_the_recorded_identity(vms, lab_qemu, tmp_path):  # noqa: F811
    """A QEMU that ran as nobody comes back as nobody, guest continuing from its checkpoint
    (rescue-image path: the same start_incoming a post-kexec restore uses)."""
    from luoagent.workflows import restore

    a = vms("a")
    _record, rescue_dir = checkpoint_into_rescue(a, lab_qemu, tmp_path / "rescue", uid=NOBODY[0], gid=NOBODY[1])
    at_stop = guest.read_state(a.ram_fd).counter
    os.close(a.ram_fd)
    a.ram_fd = None
    result = restore.restore_from_rescue(rescue_dir, restore.RestoreOptions(qemu=str(lab_qemu), vm_root=tmp_path / "v"))
    [v] = result["vms"]
    try:
        assert result["ok"] and v["status"] == "running", result
        assert procfs.identity(v["pid"]) == NOBODY and (v["uid"], v["gid"]) == NOBODY
        fd = os.open(rescue_dir / "ram0.ram", os.O_RDONLY)
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            assert c1 >= at_stop and guest.read_state(fd).counter > c1
        finally:
            os.close(fd)
    finally:
        if v.get("pid") and procfs.pid_alive(v["pid"]):
            os.kill(v["pid"], signal.SIGKILL)
