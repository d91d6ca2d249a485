"""Tests of luoagent.adapters.qemu: pure helpers, QMP errors, and (host tier) a real QEMU 11.1.

Host-tier tests start `-machine none` QEMUs with memory-backend objects; every QEMU is killed."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from luoagent import memfd
from luoagent.adapters import cpr, procfs, qemu_binary, qemu_ram, qmp_client
from luoagent.errors import (
    QemuError,
    QemuNotFound,
    QmpCommandFailed,
    QmpUnreachable,
    UsageError,
    VmNotPreservable,
)

MIB = 1024 * 1024


# --- pure helpers -------------------------------------------------------------------------
def test_ram_backend_args_use_inherited_fd_by_default():
    assert qemu_ram.ram_backend_args("ram0", 64 * MIB, fd=7) == [
        "-object", f"memory-backend-file,id=ram0,size={64 * MIB},mem-path=/proc/self/fd/7,share=on",
        "-machine", "memory-backend=ram0",
    ]


def test_ram_backend_args_fdset_and_no_machine_option():
    args = qemu_ram.ram_backend_args("m1", 4096, fdset=3, machine_backend=False)
    assert args == ["-object", "memory-backend-file,id=m1,size=4096,mem-path=/dev/fdset/3,share=on"]
    with pytest.raises(ValueError):
        qemu_ram.ram_backend_args("m1", 4096)


@pytest.mark.parametrize("text,value", [("512M", 512 * MIB), ("2G", 2048 * MIB), ("4096", 4096),
                                        ("1k", 1024), ("1GiB", 1024 * MIB), (8192, 8192)])
def test_parse_size(text, value):
    assert qemu_ram.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12X", "-1M", "0", "1.5G"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(UsageError, match="size"):
        qemu_ram.parse_size(text)


def test_resolve_mem_path_forms():
    assert qemu_ram._resolve_mem_path("/proc/self/fd/12", []) == (12, None)
    assert qemu_ram._resolve_mem_path("/dev/fd/9", []) == (9, None)
    fdsets = [{"fdset-id": 4, "fds": [{"fd": 33}]}]
    assert qemu_ram._resolve_mem_path("/dev/fdset/4", fdsets) == (33, None)
    fd, problem = qemu_ram._resolve_mem_path("/dev/fdset/5", fdsets)
    assert fd is None and "no such fdset" in problem
    fd, problem = qemu_ram._resolve_mem_path("/dev/shm/guest-ram", [])
    assert fd is None and "not a memfd" in problem


def test_find_qemu_order(tmp_path, monkeypatch):
    fake = tmp_path / "qemu-x"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LUOAGENT_QEMU", str(fake))
    assert qemu_binary.find_qemu() == fake
    assert qemu_binary.find_qemu(str(fake)) == fake
    with pytest.raises(QemuNotFound, match="does not exist"):
        qemu_binary.find_qemu(tmp_path / "missing")
    plain = tmp_path / "plain"
    plain.write_text("")
    with pytest.raises(QemuNotFound, match="not an executable"):
        qemu_binary.find_qemu(plain)
    monkeypatch.delenv("LUOAGENT_QEMU")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QemuNotFound, match="LUOAGENT_QEMU"):
        qemu_binary.find_qemu()


def test_qemu_version_rejects_a_non_qemu(tmp_path):
    fake = tmp_path / "notqemu"
    fake.write_text("#!/bin/sh\necho hello\n")
    fake.chmod(0o755)
    with pytest.raises(QemuNotFound, match="qemu-system"):
        qemu_binary.qemu_version(fake)


def test_qmp_unreachable_for_missing_socket(tmp_path):
    sock = tmp_path / "nobody.sock"
    with pytest.raises(QmpUnreachable) as info:
        asyncio.run(qmp_client.Qmp.connect(sock, timeout=0.3))
    assert str(sock) in str(info.value) and "does not exist" in str(info.value)


def test_qmp_unreachable_when_nobody_listens(tmp_path):
    import socket

    sock = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))  # bound, never listening: connect is refused
    try:
        with pytest.raises(QmpUnreachable, match="did not answer"):
            asyncio.run(qmp_client.Qmp.connect(sock, timeout=0.3))
    finally:
        s.close()


def test_steal_fd_gets_the_same_open_file(tmp_path):
    fd = memfd.create("luoagent-steal-test", 4096)
    child = subprocess.Popen(["sleep", "30"], pass_fds=[fd])
    try:
        got = procfs.steal_fd(child.pid, fd)
        try:
            assert os.fstat(got).st_ino == os.fstat(fd).st_ino
            os.lseek(fd, 123, os.SEEK_SET)  # same open file description: shared offset
            assert os.lseek(got, 0, os.SEEK_CUR) == 123
        finally:
            os.close(got)
    finally:
        child.kill()
        child.wait()
        os.close(fd)


def test_steal_fd_missing_process_is_a_clear_error():
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(QemuError, match="pidfd_open"):
        procfs.steal_fd(child.pid, 0)


# --- host tier: a real QEMU 11.1 ------------------------------------------------------------
@pytest.mark.host
def test_probe_cpr_on_qemu_11_1(lab_qemu):
    probe = qemu_binary.probe_cpr(lab_qemu)
    assert probe.version.startswith("11.1"), probe.version
    assert probe.cpr_reboot is True
    assert probe.x_ignore_shared is True
    # QEMU 11.1.3 opens mem-path with plain open(): /dev/fdset/N does not work for RAM
    assert probe.fdset_mem_backend is False
    assert "No such file or directory" in probe.details["fdset_mem_backend_error"]
    assert probe.usable


class NoneMachine:
    """A `-machine none` QEMU with the given -object options and a QMP socket."""

    def __init__(self, binary: Path, tmp: Path, objects: list[str], pass_fds=()):
        argv = ["-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"]
        for obj in objects:
            argv += ["-object", obj]
        self.sock = tmp / "qmp.sock"
        self.proc = qemu_binary.launch(binary, argv, pass_fds=pass_fds, qmp_socket=self.sock, log=tmp / "qemu.log")

    def run(self, fn):
        async def go():
            async with await qmp_client.Qmp.connect(self.sock, timeout=20, process=self.proc) as q:
                return await fn(q)

        try:
            return asyncio.run(go())
        finally:
            qemu_binary.kill_process(self.proc)


@pytest.mark.host
def test_ram_backends_accepts_a_shared_memfd_backend(lab_qemu, tmp_path):
    fd = memfd.create("luoagent-ok-ram", 8 * MIB)
    try:
        vm = NoneMachine(lab_qemu, tmp_path, [
            f"memory-backend-file,id=ram0,size={8 * MIB},mem-path=/proc/self/fd/{fd},share=on"], [fd])
        backends = vm.run(lambda q: qemu_ram.ram_backends(vm.proc.pid, q))
    finally:
        os.close(fd)
    assert len(backends) == 1
    b = backends[0]
    assert (b.id, b.size, b.share, b.mem_path, b.qemu_fd, b.problem) == (
        "ram0", 8 * MIB, True, f"/proc/self/fd/{fd}", fd, None)
    assert b.target == "/memfd:luoagent-ok-ram (deleted)"


@pytest.mark.host
def test_ram_backends_refuses_memory_backend_ram(lab_qemu, tmp_path):
    vm = NoneMachine(lab_qemu, tmp_path, [f"memory-backend-ram,id=pcram,size={8 * MIB}"])
    with pytest.raises(VmNotPreservable) as info:
        vm.run(lambda q: qemu_ram.ram_backends(vm.proc.pid, q))
    msg = str(info.value)
    assert "'pcram'" in msg and "memory-backend-ram" in msg and "copy" in msg


@pytest.mark.host
def test_ram_backends_names_every_problem(lab_qemu, tmp_path):
    fd = memfd.create("luoagent-private-ram", 4 * MIB)
    regular = tmp_path / "ram.img"
    regular.write_bytes(b"\0" * (4 * MIB))
    try:
        vm = NoneMachine(lab_qemu, tmp_path, [
            f"memory-backend-memfd,id=mfd,size={4 * MIB},share=on",
            f"memory-backend-file,id=private,size={4 * MIB},mem-path=/proc/self/fd/{fd},share=off",
            f"memory-backend-file,id=onfile,size={4 * MIB},mem-path={regular},share=on",
        ], [fd])
        inspected = {}

        async def both(q):
            inspected.update({b.id: b for b in await qemu_ram.inspect_ram(vm.proc.pid, q)})
            return await qemu_ram.ram_backends(vm.proc.pid, q)

        with pytest.raises(VmNotPreservable) as info:
            vm.run(both)
    finally:
        os.close(fd)
    msg = str(info.value)
    assert "'mfd'" in msg and "x-ignore-shared" in msg
    assert "'private'" in msg and "share=off" in msg
    assert "'onfile'" in msg and "not a memfd" in msg
    assert all(b.problem for b in inspected.values()) and set(inspected) == {"mfd", "private", "onfile"}


@pytest.mark.host
def test_ram_backends_refuses_a_vm_without_backend(lab_qemu, tmp_path):
    vm = NoneMachine(lab_qemu, tmp_path, [])
    with pytest.raises(VmNotPreservable, match="no memory-backend"):
        vm.run(lambda q: qemu_ram.ram_backends(vm.proc.pid, q))


@pytest.mark.host
def test_execute_error_carries_qemu_error_class(lab_qemu, tmp_path):
    vm = NoneMachine(lab_qemu, tmp_path, [])

    async def bad(q):
        with pytest.raises(QmpCommandFailed) as info:
            await q.execute("qom-get", {"path": "/objects/nope", "property": "size"})
        return info.value

    err = vm.run(bad)
    assert err.command == "qom-get" and err.error_class == "DeviceNotFound" and "nope" in err.desc


@pytest.mark.host
def test_connect_fails_fast_when_qemu_exits(lab_qemu, tmp_path):
    proc = qemu_binary.launch(lab_qemu, ["-machine", "no-such-machine"], qmp_socket=tmp_path / "q.sock",
                       log=tmp_path / "q.log")
    try:
        with pytest.raises(QmpUnreachable, match="exited with status"):
            asyncio.run(qmp_client.Qmp.connect(tmp_path / "q.sock", timeout=20, process=proc))
    finally:
        qemu_binary.kill_process(proc)


@pytest.mark.host
def test_cpr_reboot_save_failures_carry_qemu_reason(lab_qemu, tmp_path):
    from luoagent.errors import MigrationFailed

    ram = memfd.create("luoagent-mf-ram", 8 * MIB)
    vmstate = memfd.create("luoagent-mf-vmstate", sealing=True)
    memfd.seal(vmstate, memfd.SEAL_GROW)  # every write past size 0 fails: a late failure
    vm = NoneMachine(lab_qemu, tmp_path, [
        f"memory-backend-file,id=ram0,size={8 * MIB},mem-path=/proc/self/fd/{ram},share=on"], [ram])

    async def go(q):
        reader = memfd.reopen(vmstate, os.O_RDONLY)
        writer = memfd.reopen(vmstate, os.O_WRONLY)
        try:
            await q.add_fd(reader, 5)
            await q.add_fd(writer, 6)
        finally:
            os.close(reader)
            os.close(writer)
        with pytest.raises(MigrationFailed, match="refused by QEMU: Failed to find file descriptor") as early:
            await cpr.save(q, "file:/dev/fdset/5", timeout=30)  # O_RDONLY cannot save
        with pytest.raises(MigrationFailed, match=r"save \(file:/dev/fdset/6\) failed: .+") as late:
            await cpr.save(q, "file:/dev/fdset/6", timeout=30)
        return early.value, late.value, await q.status()

    try:
        _early, late, status = vm.run(go)
    finally:
        os.close(ram)
        os.close(vmstate)
    assert "Input/output error" in str(late) or "Operation not permitted" in str(late), str(late)
    assert status != "postmigrate"


@pytest.mark.host
def test_cpr_reboot_load_of_garbage_is_migration_failed(lab_qemu, tmp_path):
    from luoagent.errors import MigrationFailed

    vmstate = memfd.create("luoagent-garbage-vmstate")
    os.write(vmstate, b"not a migration stream" * 10)
    argv = ["-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg", "-incoming", "defer"]
    proc = qemu_binary.launch(lab_qemu, argv, qmp_socket=tmp_path / "q.sock", log=tmp_path / "q.log")

    async def go():
        async with await qmp_client.Qmp.connect(tmp_path / "q.sock", timeout=20, process=proc) as q:
            reader = memfd.reopen(vmstate, os.O_RDONLY)
            try:
                await q.add_fd(reader, 7)
            finally:
                os.close(reader)
            with pytest.raises(MigrationFailed, match="Not a migration stream"):
                await cpr.load(q, "file:/dev/fdset/7", timeout=30)
            return await q.status()  # still alive: exit-on-error is off

    try:
        assert asyncio.run(go()) == "inmigrate"
    finally:
        qemu_binary.kill_process(proc)
        os.close(vmstate)


@pytest.mark.host
def test_second_qmp_client_times_out_with_a_reason(lab_qemu, tmp_path):
    vm = NoneMachine(lab_qemu, tmp_path, [])

    async def go(q):
        with pytest.raises(QmpUnreachable, match="no QMP greeting"):
            await qmp_client.Qmp.connect(vm.sock, timeout=1.0)
        return await q.status()

    assert vm.run(go) == "running"


@pytest.mark.host
def test_ram_backends_judges_the_file_not_its_name(lab_qemu, tmp_path):
    """LUO keeps unlinked shmem files; a memfd retrieved after kexec has no "/memfd:" name
    (it reads "/ (deleted)"), so an unlinked /dev/shm file stands in for it here."""
    shm_path = Path("/dev/shm") / f"luoagent-test-{os.getpid()}"
    shm = os.open(shm_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(shm_path)
    os.ftruncate(shm, 4 * MIB)
    disk_path = tmp_path / "deleted-ram.img"
    disk = os.open(disk_path, os.O_RDWR | os.O_CREAT, 0o600)
    os.unlink(disk_path)
    os.ftruncate(disk, 4 * MIB)
    try:
        vm = NoneMachine(lab_qemu, tmp_path, [
            f"memory-backend-file,id=shm,size={4 * MIB},mem-path=/proc/self/fd/{shm},share=on",
            f"memory-backend-file,id=disk,size={4 * MIB},mem-path=/proc/self/fd/{disk},share=on",
        ], [shm, disk])
        found = {b.id: b for b in vm.run(lambda q: qemu_ram.inspect_ram(vm.proc.pid, q))}
    finally:
        os.close(shm)
        os.close(disk)
    assert found["shm"].problem is None and found["shm"].target == f"{shm_path} (deleted)"
    if _on_tmpfs(tmp_path):  # then the "disk" file is shmem too, and LUO would take it
        assert found["disk"].problem is None
    else:
        assert "not shmem" in found["disk"].problem


def _on_tmpfs(path: Path) -> bool:
    best = ""
    fstype = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mnt, kind, *_ = line.split()
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, fstype = mnt, kind
    return fstype == "tmpfs"
