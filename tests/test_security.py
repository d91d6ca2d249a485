"""Security hardening (issue 13): private file modes, the manifest as untrusted input, what
restore executes and as whom, test switches that cannot reach a real host, honest figures.

Unit tier: real memfds, real files and real processes; no LUO or QEMU needed."""

from __future__ import annotations

import json
import os
import stat

import pytest

from luoagent import manifest as mf
from luoagent import memfd
from luoagent.workflows import restore, vm

from test_manifest import make_manifest, make_vm


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask():
    """The most permissive ordinary umask, so only the code's own modes can make files private."""
    old = os.umask(0o022)
    yield
    os.umask(old)


# ---- 1. secrets on disk -------------------------------------------------------------------
def test_rescue_image_is_private_from_creation(tmp_path, open_umask):
    vmrec = make_vm("a", n_ram=1)
    vmrec.ram[0].size = 2 << 20
    ram = memfd.create("ram", 2 << 20)
    vst = memfd.create("vmstate", vmrec.vmstate.size)
    os.pwrite(ram, b"guest secret", 4096)
    try:
        target = restore.write_rescue(vmrec, [ram], vst, tmp_path / "rescue" / "deeper")
    finally:
        os.close(ram)
        os.close(vst)
    assert _mode(tmp_path / "rescue") == 0o700 and _mode(tmp_path / "rescue" / "deeper") == 0o700
    assert _mode(target) == 0o700
    for name in ("ram0.ram", "vmstate", "restore.json"):
        assert _mode(target / name) == 0o600, name
    assert (target / "ram0.ram").read_bytes()[4096:4108] == b"guest secret"


def test_vm_record_and_logs_are_private(tmp_path, open_umask):
    root = tmp_path / "vms"
    vm.register_restored(name="a", pid=os.getpid(), qmp_socket=str(root / "a" / "qmp.sock"),
                         binary="/bin/true", argv=["-object", "secret,id=s0,data=hunter2"],
                         ram=[{"id": "ram0", "size": 1 << 20}], log=str(root / "a" / "qemu.log"), vm_root=root)
    assert _mode(root) == 0o700 and _mode(root / "a") == 0o700
    assert _mode(root / "a" / "vm.json") == 0o600
    assert "hunter2" in (root / "a" / "vm.json").read_text()
    assert [p.name for p in (root / "a").iterdir()] == ["vm.json"]  # no temporary file left


def test_qemu_launch_log_and_files_qemu_creates_are_private(tmp_path, open_umask):
    from luoagent.adapters import qemu_binary

    log = tmp_path / "qemu.log"
    made = tmp_path / "made-by-child"
    proc = qemu_binary.launch("/bin/sh", ["-c", f"echo hi; : > {made}"], log=log)
    assert proc.wait(10) == 0
    assert _mode(log) == 0o600 and log.read_text() == "hi\n"
    assert _mode(made) == 0o600  # the child (QEMU) runs with umask 077


def test_unparsable_manifest_is_saved_private(tmp_path, monkeypatch, open_umask):
    class Session:
        def retrieve(self, token):
            fd = memfd.create("foreign", 0)
            os.write(fd, b"{not json")
            return fd

        def close(self):
            pass

    class Lu:
        def retrieve_session(self, name):
            return Session()

    monkeypatch.setattr(restore, "DEFAULT_RESCUE_DIR", tmp_path / "var" / "rescue")
    with pytest.raises(Exception, match="saved to"):
        restore.retrieve_manifest(Lu())
    [saved] = (tmp_path / "var" / "rescue").iterdir()
    assert _mode(tmp_path / "var") == 0o700 and _mode(tmp_path / "var" / "rescue") == 0o700
    assert _mode(saved) == 0o600 and saved.read_bytes() == b"{not json"
