"""Unit tests for the pure logic of the update and restore workflows: kernel image checks,
VM discovery, argv rewriting for restore, RAM block parsing, fault switches, manifest lookup.

No LUO, kexec or QEMU here; the one test double is a stand-in for /dev/liveupdate's answers."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
from pathlib import Path

import pytest

from luoagent.errors import (
    InvalidName,
    KexecImageError,
    ManifestMissing,
    ManifestVersionError,
    QmpUnreachable,
    RestoreError,
    SessionAlreadyRetrieved,
    SessionNotFound,
    UpdateError,
    UsageError,
)
from luoagent import manifest as mf
from luoagent import testmode
from luoagent.adapters import kexec, procfs, qemu_ram
from luoagent.workflows import restore, update


def fake_bzimage(path, ok=True):
    data = bytearray(4096)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS" if ok else b"XXXX"
    data[0x20E:0x210] = (0x400).to_bytes(2, "little")  # kernel_version at 0x200 + 0x400
    data[0x600:0x612] = b"7.2.13 (test) #1\0\0"
    path.write_bytes(bytes(data))
    return path


def test_kernel_image_checks(tmp_path):
    good = fake_bzimage(tmp_path / "bzImage")
    assert kexec.check_image(good, None) == "7.2.13 (test) #1"
    with pytest.raises(KexecImageError, match="does not exist"):
        kexec.check_image(tmp_path / "nope", None)
    with pytest.raises(KexecImageError, match="not an x86 bzImage"):
        kexec.check_image(fake_bzimage(tmp_path / "bad", ok=False), None)
    (tmp_path / "short").write_bytes(b"HdrS")
    with pytest.raises(KexecImageError, match="not an x86 bzImage"):
        kexec.check_image(tmp_path / "short", None)
    with pytest.raises(KexecImageError, match="not a regular file"):
        kexec.check_image(tmp_path, None)
    with pytest.raises(KexecImageError, match="initrd"):
        kexec.check_image(good, tmp_path / "no-initrd")


def test_discover_from_vm_root_and_adoption(tmp_path):
    for name in ("a", "b", "not-a-vm"):
        (tmp_path / name).mkdir()
    # records as `luoagent vm start` writes them (argv without -qmp; binary under "qemu")
    (tmp_path / "a" / "vm.json").write_text(json.dumps(
        {"name": "a", "pid": 42, "qemu": "/usr/bin/qemu-system-x86_64", "qmp_socket": "/x/a.sock", "argv": ["-m", "64"]}))
    (tmp_path / "b" / "vm.json").write_text(json.dumps({"name": "b", "pid": 43}))
    targets = update.discover([], tmp_path)
    assert [t.name for t in targets] == ["a", "b"]
    assert targets[0].pid == 42 and str(targets[0].qmp_socket) == "/x/a.sock" and targets[0].argv == ["-m", "64"]
    assert targets[0].binary == "/usr/bin/qemu-system-x86_64"
    assert targets[1].qmp_socket == tmp_path / "b" / "qmp.sock"
    adopted = update.discover(["ext=/tmp/ext.sock"], tmp_path)
    assert adopted[0].adopted and str(adopted[0].qmp_socket) == "/tmp/ext.sock"
    with pytest.raises(UsageError, match="not known"):
        update.discover(["zzz"], tmp_path)
    with pytest.raises(UsageError, match="twice"):
        update.discover(["a", "a"], tmp_path)
    with pytest.raises(InvalidName):
        update.discover(["x" * 60 + "=/s"], tmp_path)
    with pytest.raises(UsageError, match="does not exist"):
        update.discover([], tmp_path / "missing")
    with pytest.raises(UsageError, match="empty"):
        (tmp_path / "empty").mkdir()
        update.discover([], tmp_path / "empty")


def test_peer_pid_of_a_unix_socket_and_unreachable(tmp_path):
    path = tmp_path / "s.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    try:
        assert procfs.peer_pid(path) == os.getpid()
    finally:
        srv.close()
    # the file is still there but nobody listens: refused
    with pytest.raises(QmpUnreachable, match="unreachable"):
        procfs.peer_pid(path)


def test_fault_switch(monkeypatch):
    monkeypatch.setenv(testmode.FAULT_ENV, "after-quiesce, quiesce:b")
    monkeypatch.setattr(testmode, "_enabled", True)
    with pytest.raises(UpdateError) as ei:
        testmode.fault("after-quiesce")
    assert ei.value.step == "after-quiesce" and ei.value.vm is None
    testmode.fault("reboot-x")
    testmode.fault("quiesce", "a")
    with pytest.raises(UpdateError) as ei:
        testmode.fault("quiesce", "b")
    assert ei.value.vm == "b" and "test only" in str(ei.value)


def test_ramblock_parsing():
    text = (
        "              Block Name    PSize              Offset               Used              Total                HVA  RO\n"
        "                    ram0    4 KiB  0x0000000000000000 0x0000000004000000 0x0000000004000000 0x00007f9e27fff000  rw\n"
        "                 pc.bios    4 KiB  0x0000000004000000 0x0000000000040000 0x0000000000040000 0x00007f9e71c00000  ro\n"
    )

    class Q:
        async def execute(self, cmd, args=None):
            assert cmd == "human-monitor-command"
            return text

    assert asyncio.run(qemu_ram.ramblocks(Q())) == {"ram0": 64 << 20, "pc.bios": 0x40000}


def test_restore_argv_rewrites_ram_and_incoming():
    argv = [
        "-machine", "pc", "-daemonize",
        "-object", "memory-backend-file,id=ram0,size=64M,mem-path=/proc/self/fd/3,share=on",
        "-object", '{"qom-type": "memory-backend-file", "id": "ram1", "size": 4096, "mem-path": "/proc/self/fd/4", "share": true}',
        "-object", "memory-backend-file,id=other,size=1M,mem-path=/dev/shm/x,,y,share=on",
        "-incoming", "tcp:0:4444",
        "-qmp", "unix:/run/luoagent/vms/a/qmp.sock,server=on,wait=off",
    ]
    out = qemu_ram.restore_argv(argv + ["-add-fd", "fd=3,set=1"], {"ram0": "/proc/self/fd/9", "ram1": "/proc/self/fd/10"})
    assert "-daemonize" not in out and "tcp:0:4444" not in out and "-add-fd" not in out
    assert out[-2:] == ["-incoming", "defer"]
    assert "memory-backend-file,id=ram0,size=64M,mem-path=/proc/self/fd/9,share=on" in out
    assert json.loads(out[out.index("-object", 4) + 1])["mem-path"] == "/proc/self/fd/10"
    # an unrelated object (with an escaped comma) is left exactly as it was
    assert "memory-backend-file,id=other,size=1M,mem-path=/dev/shm/x,,y,share=on" in out
    with pytest.raises(RestoreError, match="ram9"):
        qemu_ram.restore_argv(argv, {"ram9": "/proc/self/fd/1"})


class FakeLu:
    """Stands in for LiveUpdate's retrieve_session answers (pure logic test)."""

    def __init__(self, exc):
        self.exc = exc

    def retrieve_session(self, name):
        assert name == mf.MANIFEST_SESSION
        raise self.exc("x", errno=0)


@pytest.mark.parametrize("exc, match", [(SessionNotFound, "nothing to restore"), (SessionAlreadyRetrieved, "already retrieved")])
def test_no_manifest_is_manifest_missing(exc, match):
    with pytest.raises(ManifestMissing, match=match):
        restore.retrieve_manifest(FakeLu(exc))


def test_unknown_manifest_version_via_memfd():
    fd = os.memfd_create("m", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, json.dumps({"schema": "7.1", "vms": []}).encode())
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        with pytest.raises(ManifestVersionError, match=r"7\.1.*1\.1"):
            mf.read_memfd(fd)
    finally:
        os.close(fd)


def test_demo_summary_reads_the_scenarios_diag_lines():
    from luoagent.lab import demo

    lines = [
        "update: [update] preflight done in 1.450 s",
        "restore: [restore] manifest: schema 1.0, 2 VM(s), written by kernel 7.2.13, now on 7.3.4",
        "update: [update] quiesce done in 0.461 s",
        "update: [update]   kexec now (preparation took 3.515 s)",
        "restore: [restore] a: running (pid 34), blackout 9.215 s = save 0.244 + cont 0.053",
        ("guest a: blackout 9.215 s (stop -> running, across kexec), vmstate 316302 B of 64 MiB RAM, guest RAM copied "
         "at most 204800 B (RAM page bytes QEMU wrote), RAM blocks in stream 532480 B"),
        "guest a: counter 100 before update -> 200 after restore -> 300 0.5 s later",
        "fault after quiesce: [update] quiesce done in 0.3 s",
        "fault after quiesce: luoagent update: error: update failed at step after-quiesce: x",
    ]
    story = demo.summarize(lines)
    assert story["phases"] == [{"phase": "preflight", "seconds": 1.45}, {"phase": "quiesce", "seconds": 0.461}]
    assert story["preparation_seconds"] == 3.515
    assert story["kernel"] == {"from": "7.2.13", "to": "7.3.4"}
    a = story["vms"]["a"]
    assert (a["counter_before"], a["counter_after"], a["counter_later"]) == (100, 200, 300)
    assert a["ram_bytes_copied"] == 204800 and a["vmstate_bytes"] == 316302 and a["ram_bytes"] == 64 << 20
    assert a["ram_blocks_in_stream_bytes"] == 532480
    assert a["blackout_s"] == 9.215 and a["blackout_parts"] == "save 0.244 + cont 0.053"
    assert story["rollbacks"] == {"fault after quiesce": "update failed at step after-quiesce: x"}
    text = demo.render(story, True, 82.0)
    assert "kernel 7.2.13 -> 7.3.4" in text and "RAM blocks of 532,480 B" in text and "at most 204,800 B" in text and "100 before update -> 200 after restore" in text and "PASS" in text


def test_demo_linux_guest_story_keeps_its_checks_and_telling_lines():
    from luoagent.lab import demo

    diag = ["Linux guest booted on the host in 22.6 s and saved (36576448 bytes)",
            "update: [update] sync done in 1.688 s",
            "restore: [restore] lg: running (pid 46), blackout 70.823 s = save 1.394 + cont 0.405",
            "disk: 80 records 1..80, all valid; acknowledged before update 41, now 80"]
    story = demo.linux_guest_story([(True, "guest up"), (False, "records on disk")], diag)
    assert story["checks"] == [{"ok": True, "check": "guest up"}, {"ok": False, "check": "records on disk"}]
    assert story["notes"] == [diag[0], "restore: running (pid 46), blackout 70.823 s = save 1.394 + cont 0.405", diag[3]]
    text = demo.render_linux_guest(story, False, 600.0)
    assert "NOT OK records on disk" in text and "80 records 1..80" in text and "FAIL: scenario linux-guest" in text


def test_test_switches_are_ignored_outside_test_mode(monkeypatch):
    monkeypatch.setenv(testmode.FAULT_ENV, "after-quiesce")
    monkeypatch.setenv(testmode.SKIP_ENV, "luo,kexec-load")
    monkeypatch.setattr(testmode, "_enabled", False)
    assert not testmode.armed("after-quiesce") and testmode.skipped() == set()
    testmode.fault("after-quiesce")  # a stray variable injects nothing
    assert testmode.ignored_switches() == [testmode.FAULT_ENV, testmode.SKIP_ENV]


def test_cli_warns_that_stray_test_switches_are_ignored(monkeypatch, capsys):
    from luoagent import cli

    monkeypatch.setenv(testmode.FAULT_ENV, "after-quiesce")
    monkeypatch.setattr(testmode, "_enabled", False)
    cli.main(["--log-format", "json", "doctor", "--json", "--no-qemu"])
    err = capsys.readouterr().err
    assert "test switches ignored outside --test-mode" in err and testmode.FAULT_ENV in err


def test_test_mode_never_makes_a_kexec_that_could_succeed(monkeypatch):
    """With --test-mode and a kexec image loaded (e.g. only LUO skipped), update refuses to
    call the reboot syscall at all."""
    monkeypatch.setattr(testmode, "_enabled", True)
    monkeypatch.setattr(kexec, "loaded", lambda: True)
    monkeypatch.setattr(kexec, "reboot_kexec", lambda: pytest.fail("reboot syscall made in test mode"))
    run = update._Update(update.UpdateRequest(kernel=Path("/nonexistent")))
    run.kexec_loaded = True
    with pytest.raises(UpdateError, match="test mode.*refusing to reboot"):
        run._reboot()


def test_demo_release_story_reads_kernel_change_diag_lines():
    from luoagent.lab import demo

    lines = [
        "update 7.2->7.3: [update] preflight done in 21.500 s",
        "update 7.2->7.3: [update]   LUO ABI identical: luo-v5, memfd-v2, kho-v4",
        "update 7.2->7.3: [update]   a: stop→saved 40.1 ms, vmstate 316302 B (0.471 % of RAM), guest RAM copied 0 B; "
        "RAM sample hashed in 2.1 ms (33.6 ms/GiB)",
        "update 7.2->7.3: [update] quiesce done in 0.461 s",
        "guest a on 7.3.4: counter 100 -> 200 -> 300, blackout 11.200 s",
        "restore on 7.3: [restore] b: FAILED: RAM backend ram0: the sampled pages do not match",
        "releases crossed: 7.2.13 -> 7.3.4 -> 7.2.13",
    ]
    story = demo.summarize_releases(lines)
    assert story["releases"] == ["7.2.13", "7.3.4", "7.2.13"]
    hop = story["hops"]["7.2->7.3"]
    assert hop["phases"] == [("preflight", 21.5), ("quiesce", 0.461)] and hop["sample"] == {"a": 33.6}
    assert hop["abi"] == "luo-v5, memfd-v2, kho-v4"
    assert story["guests"] == [{"vm": "a", "release": "7.3.4", "before": 100, "after": 200, "later": 300,
                                "blackout_s": 11.2}]
    text = demo.render_releases(story, True, 200.0)
    assert "kernel releases 7.2.13 -> 7.3.4 -> 7.2.13" in text and "guest a on 7.3.4" in text
    assert "sampled pages do not match" in text and "33.6 ms/GiB" in text and "PASS" in text
