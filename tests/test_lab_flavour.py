"""The lab's rootfs flavours (custom init on trixie, systemd 262 on sid): pure logic, no VM.

The systemd flavour's VM checks are in tests/lab/test_systemd_lab.py."""

from __future__ import annotations

from luoagent.lab import boot, rootfs
from luoagent.lab.scenarios import resolve
from luoagent.lab.scenarios import systemd_host as sh
from luoagent.lab.scenarios import systemd_update as su

SCENARIOS = [sh.NAME, su.NAME]


def test_flavours_never_share_a_boot_chain():
    items = [boot.RunItem("scenario", n, "1G", 60, flavour=f)
             for n, f in (("a", "custom-init"), ("b", "systemd"), ("c", "systemd"), ("d", "custom-init"))]
    assert [[i.name for i in g] for _m, g in boot.group_by_memory(items)] == [["a"], ["b", "c"], ["d"]]


def test_systemd_flavour_boots_systemd_and_keeps_luo_on():
    line = boot.kernel_cmdline("", "systemd")
    assert "init=/lib/systemd/systemd" in line and "liveupdate=on" in line and "kho=on" in line
    assert f"init={rootfs.INIT_PATH}" in boot.kernel_cmdline()
    assert [i.flavour for i in resolve(SCENARIOS)] == ["systemd", "systemd"]
    assert resolve(["smoke"])[0].flavour == "custom-init"


def test_flavours_have_their_own_tree_and_the_trixie_key_is_unchanged():
    systemd = rootfs.flavour("systemd")
    assert rootfs.tree_key() == rootfs.tree_key(rootfs.flavour(None)) != rootfs.tree_key(systemd)
    assert systemd.suite == "sid" and systemd.backports is None
