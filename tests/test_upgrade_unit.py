"""Unit tier for `vm upgrade`'s pure parts: the argv of the second QEMU (qemu_argv.beside), and
launch() placing inherited fds at exact numbers (a real child process reads its own fd table)."""

from __future__ import annotations

import os

import pytest

from luoagent import memfd
from luoagent.adapters import qemu_argv, qemu_binary
from luoagent.errors import UsageError

SOCK = "/run/vms/a/qmp.sock"
BASE = ["-name", "a", "-m", "128M", "-object",
        "memory-backend-file,id=ram0,size=134217728,mem-path=/proc/self/fd/5,share=on",
        "-machine", "memory-backend=ram0", "-nodefaults", "-display", "none"]


def plan(extra, **kw):
    return qemu_argv.beside([*BASE, *extra, "-qmp", f"unix:{SOCK},server=on,wait=off"], qmp_socket=SOCK,
                            suffix="up-0123abcd", ram_fds={5}, **kw)


def test_qmp_socket_moves_to_a_temporary_name_and_back():
    p = plan([])
    assert p.qmp_socket == f"{SOCK}.up-0123abcd"
    assert p.argv[-2:] == ["-qmp", f"unix:{SOCK}.up-0123abcd,server=on,wait=off"]
    assert p.renames == [(f"{SOCK}.up-0123abcd", SOCK)]
    assert p.argv[:len(BASE)] == BASE  # flags such as -nodefaults pass through unpaired


def test_a_previous_upgrades_names_are_recognised():
    argv = [*BASE, "-pidfile", "/run/a.pid.up-ffff0000", "-qmp", f"unix:{SOCK}.up-ffff0000,server=on"]
    p = qemu_argv.beside(argv, qmp_socket=SOCK, suffix="up-0123abcd", ram_fds={5})
    assert p.renames == [("/run/a.pid.up-0123abcd", "/run/a.pid"), (f"{SOCK}.up-0123abcd", SOCK)]


def test_serial_file_is_appended_not_truncated_and_incoming_dropped():
    p = plan(["-serial", "file:/var/log/a.serial", "-incoming", "defer", "-S", "-daemonize",
              "-chardev", "file,id=c1,path=/tmp/x"])
    assert "-incoming" not in p.argv and "-S" not in p.argv and "-daemonize" not in p.argv
    i = p.argv.index("-serial")
    assert p.argv[i - 2:i + 2] == ["-chardev", "file,id=luoagent-serial0,path=/var/log/a.serial,append=on",
                                   "-serial", "chardev:luoagent-serial0"]
    assert "file,id=c1,path=/tmp/x,append=on" in p.argv


def test_machine_type_is_pinned_once():
    p = plan(["-machine", "type=pc-i440fx-11.1"], machine_type="pc-i440fx-11.1")
    assert p.argv.count("type=pc-i440fx-11.1") == 1 and p.argv[-2:] == ["-machine", "type=pc-i440fx-11.1"]


def test_adopted_qmp_over_chardev():
    argv = [*BASE, "-chardev", f"socket,id=mon0,path={SOCK},server=on,wait=off", "-mon", "chardev=mon0,mode=control"]
    p = qemu_argv.beside(argv, qmp_socket=SOCK, suffix="up-0123abcd", ram_fds={5})
    assert f"socket,id=mon0,server=on,wait=off,path={SOCK}.up-0123abcd" in p.argv


@pytest.mark.parametrize("extra, named", [
    (["-add-fd", "fd=7,set=2"], "-add-fd fd=7,set=2"),
    (["-netdev", "tap,id=n0,fd=9"], "-netdev tap,id=n0,fd=9"),
    (["-netdev", "tap,id=n0,ifname=tap0,vhost=on"], "vhost=off"),
    (["-netdev", "tap,id=n0,ifname=tap0,vhostfd=12"], "vhostfd="),
    (["-chardev", "socket,id=c0,path=/tmp/c.sock,server=on"], "-chardev socket,id=c0,path=/tmp/c.sock"),
    (["-serial", "unix:/tmp/s.sock,server=on,wait=off"], "-serial unix:/tmp/s.sock"),
    (["-object", "memory-backend-file,id=ram1,size=1M,mem-path=/proc/self/fd/8,share=on"], "fd 8"),
])
def test_what_cannot_be_handed_over_is_refused_by_name(extra, named):
    with pytest.raises(UsageError) as exc:
        plan(extra)
    assert named in str(exc.value)


def test_vm_without_its_qmp_socket_in_argv_is_refused():
    with pytest.raises(UsageError, match="is not a `-qmp unix:PATH"):
        qemu_argv.beside(BASE, qmp_socket=SOCK, suffix="up-0123abcd", ram_fds={5})


def test_temp_suffix_is_recognised():
    s = qemu_argv.temp_suffix()
    assert qemu_argv._base(f"/x.{s}") == "/x" and s != qemu_argv.temp_suffix()


def test_launch_places_fds_at_exact_numbers(tmp_path):
    """One target number free in this process, one taken (by an fd of ours): the child sees
    the memfds at both numbers, and our own fd at the taken number is untouched."""
    a, b = memfd.create("luoagent-test-a", 4096), memfd.create("luoagent-test-b", 8192)
    taken = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    free = 200
    while True:
        try:
            os.fstat(free)
            free += 1
        except OSError:
            break
    script = tmp_path / "show.sh"
    script.write_text(f"#!/bin/sh\nreadlink /proc/self/fd/{free} /proc/self/fd/{taken}\n"
                      f"stat -L -c %s /proc/self/fd/{free} /proc/self/fd/{taken}\n")
    script.chmod(0o700)
    log = tmp_path / "out"
    try:
        proc = qemu_binary.launch(script, [], log=log, fd_map={free: a, taken: b})
        proc.wait(10)
        lines = log.read_text().split()
        assert lines[0].startswith("/memfd:luoagent-test-a") and lines[2].startswith("/memfd:luoagent-test-b"), lines
        assert lines[-2:] == ["4096", "8192"], lines
        with pytest.raises(OSError):
            os.fstat(free)  # the parent's temporary placement is gone again
        assert os.readlink(f"/proc/self/fd/{taken}") == "/dev/null"
    finally:
        for fd in (a, b, taken):
            os.close(fd)
