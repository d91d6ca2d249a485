"""Tests of `luoagent vm start|list|stop`: name rules, argument handling, and a real daemonized VM.

The host-tier test runs the CLI as a separate process so QEMU must outlive the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from luoagent import cli, log
from luoagent.adapters import qemu_binary
from luoagent.errors import InvalidName, UsageError
from luoagent.workflows import vm
from luoagent.lab import guest


@pytest.mark.parametrize("name", ["a", "web-1", "db_2.prod", "x" * 51])
def test_valid_names(name):
    assert vm.validate_name(name) == name
    assert len(vm.session_name(name).encode()) <= 63


@pytest.mark.parametrize("name,match", [("", "empty"), ("a/b", "'/'"), ("x" * 52, "at most 51"),
                                        ("-dash", "unsupported"), ("sp ace", "unsupported"),
                                        ("é" * 26, "at most 51")])
def test_invalid_names(name, match):
    with pytest.raises(InvalidName, match=match):
        vm.validate_name(name)


@pytest.mark.parametrize("arg", ["-m", "-qmp", "-incoming", "-daemonize", "-smp", "--m", "-accel", "-enable-kvm"])
def test_options_luoagent_owns_are_rejected(arg):
    with pytest.raises(UsageError, match="QEMU option"):
        vm._reject_conflicting_args(["-kernel", "x", arg, "1"])


def test_cli_splits_qemu_args_at_double_dash():
    args = cli.build_parser().parse_args(
        ["vm", "start", "a", "--memory", "1G", "--smp", "2", "--", "-machine", "pc", "--memory", "x"])
    assert (args.name, args.memory, args.smp) == ("a", "1G", 2)
    assert args.qemu_args == ["-machine", "pc", "--memory", "x"]
    args = cli.build_parser().parse_args(["vm", "start", "a", "--memory", "1G"])
    assert args.qemu_args == []


def test_daemon_request_carries_absolute_paths_and_the_resolved_qemu(tmp_path, monkeypatch):
    """The daemon has its own cwd and environment: what the client meant must travel resolved."""
    fake = tmp_path / "bin" / "qemu-system-x86_64"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LUOAGENT_QEMU", "bin/qemu-system-x86_64")
    args = cli.build_parser().parse_args(
        ["vm", "--vm-root", "vms", "start", "a", "--memory", "64M", "--vm-dir", "here/a", "--", "-kernel", "g.elf"])
    req = vm.request_from(args)
    assert req["root"] == str(tmp_path / "vms") and req["vm_dir"] == str(tmp_path / "here" / "a")
    assert req["binary"] == str(fake) and req["cwd"] == str(tmp_path) and req["memory"] == 64 << 20
    assert req["qemu_args"] == ["-kernel", "g.elf"]
    # refused before any QEMU is looked for (or any daemon asked)
    monkeypatch.setenv("LUOAGENT_QEMU", "/nonexistent/qemu")
    with pytest.raises(UsageError, match="--memory"):
        vm.request_from(cli.build_parser().parse_args(["vm", "start", "a", "--memory", "12345"]))


def test_start_rejects_bad_memory_before_touching_anything(tmp_path):
    with pytest.raises(UsageError, match="--memory"):
        vm.start_vm("a", 12345, [], root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_list_and_stop_with_no_vms(tmp_path, capsys):
    assert cli.main(["vm", "--root", str(tmp_path), "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "vms": []}
    assert cli.main(["vm", "--root", str(tmp_path), "stop", "ghost"]) == 2
    assert "no VM named 'ghost'" in capsys.readouterr().err


def _luoagent(lab_qemu, *argv, check=True):
    env = dict(os.environ, LUOAGENT_QEMU=str(lab_qemu))
    result = subprocess.run([sys.executable, "-m", "luoagent", *argv], capture_output=True, text=True,
                            env=env, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.host
@pytest.mark.timeout(180)
def test_vm_start_list_stop_daemonized_guest(lab_qemu, tmp_path):
    elf = guest.build_guest(tmp_path / "guest")
    root = tmp_path / "vms"
    pid = None
    try:
        out = _luoagent(lab_qemu, "vm", "--root", str(root), "start", "g1", "--memory", "128M", "--json",
                        "--", "-machine", "pc", "-kernel", str(elf))
        record = json.loads(out.stdout)
        pid = record["pid"]
        assert record["ok"] and record["name"] == "g1" and record["memory"] == 128 << 20
        assert record["ram"] == [{"id": "ram0", "size": 128 << 20, "fd": record["ram"][0]["fd"]}]
        # the command has exited; QEMU lives on, its RAM a memfd it holds
        assert vm.pid_alive(pid)
        assert os.readlink(f"/proc/{pid}/fd/{record['ram'][0]['fd']}") == "/memfd:luoagent-vm-g1 (deleted)"
        assert oct((root / "g1").stat().st_mode & 0o777) == "0o700"

        dup = _luoagent(lab_qemu, "vm", "--root", str(root), "start", "g1", "--memory", "128M", check=False)
        assert dup.returncode == 2 and "already running" in dup.stderr

        listed = json.loads(_luoagent(lab_qemu, "vm", "--root", str(root), "list", "--json").stdout)["vms"]
        assert [(v["name"], v["pid"], v["status"], v["session"]) for v in listed] == [
            ("g1", pid, "running", "luoagent/vm/g1")]

        deadline = time.monotonic() + 30
        serial = root / "g1" / "serial.log"
        while time.monotonic() < deadline and not guest.serial_counters(serial.read_text()):
            time.sleep(0.1)
        assert guest.serial_counters(serial.read_text()), "the guest printed nothing"

        stopped = json.loads(_luoagent(lab_qemu, "vm", "--root", str(root), "stop", "g1", "--json").stdout)
        assert stopped == {"ok": True, "name": "g1", "pid": pid, "stopped": "quit via QMP"}
        assert not vm.pid_alive(pid)
        assert not (root / "g1").exists()
    finally:
        if pid is not None and vm.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.host
@pytest.mark.timeout(120)
def test_vm_start_reports_qemu_refusal_and_cleans_up(lab_qemu, tmp_path):
    root = tmp_path / "vms"
    result = _luoagent(lab_qemu, "vm", "--root", str(root), "start", "bad", "--memory", "64M",
                       "--", "-machine", "no-such-machine", check=False)
    assert result.returncode == 1
    assert "did not come up" in result.stderr and "no-such-machine" in result.stderr
    assert not (root / "bad").exists()
    assert qemu_binary.find_qemu(lab_qemu) == lab_qemu


def test_register_restored_makes_a_vm_listable(tmp_path, capsys):
    argv = ["-name", "r1", "-m", "134217728B", "-smp", "cpus=2", "-serial", "file:/x/serial.log"]
    rec = vm.register_restored(name="r1", pid=999999999, qmp_socket=str(tmp_path / "r1" / "qmp.sock"),
                               binary="/nonexistent/qemu", argv=argv, ram=[{"id": "ram0", "size": 128 << 20}],
                               log=str(tmp_path / "r1" / "qemu.log"), vm_root=tmp_path)
    assert (rec.memory, rec.smp, rec.serial_log, rec.restored) == (128 << 20, 2, "/x/serial.log", True)
    loaded = vm.load_record("r1", tmp_path)
    assert loaded == rec
    assert cli.main(["vm", "--root", str(tmp_path), "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["vms"]
    assert (row["name"], row["status"], row["memory"]) == ("r1", "dead", 128 << 20)
    assert cli.main(["vm", "--root", str(tmp_path), "stop", "r1"]) == 0
    assert not (tmp_path / "r1").exists()


def test_records_written_by_others_are_read_leniently(tmp_path):
    log.configure("json", 0)  # an earlier cli.main() may have bound structlog to a closed capture
    (tmp_path / "o1").mkdir()
    (tmp_path / "o1" / "vm.json").write_text(json.dumps(
        {"name": "o1", "pid": 1, "binary": "/q", "qmp_socket": "/s", "ram": [{"id": "ram0", "size": 4096}]}))
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "vm.json").write_text("{not json")
    [rec] = vm.list_records(tmp_path)
    assert (rec.name, rec.qemu, rec.memory, rec.vm_dir) == ("o1", "/q", 4096, str(tmp_path / "o1"))


@pytest.mark.host
@pytest.mark.timeout(180)
def test_custom_vm_dir_and_forced_stop(lab_qemu, tmp_path):
    root, own = tmp_path / "vms", tmp_path / "mine"
    own.mkdir()
    (own / "keep.txt").write_text("the user's file")
    pid = None
    try:
        out = _luoagent(lab_qemu, "vm", "--root", str(root), "start", "c1", "--memory", "64M",
                        "--vm-dir", str(own), "--json", "--", "-machine", "none")
        pid = json.loads(out.stdout)["pid"]
        assert (root / "c1").is_symlink() and (root / "c1").resolve() == own.resolve()
        assert (own / "vm.json").is_file() and (own / "qmp.sock").exists()
        [row] = json.loads(_luoagent(lab_qemu, "vm", "--root", str(root), "list", "--json").stdout)["vms"]
        assert (row["name"], row["status"], row["vm_dir"]) == ("c1", "running", str(own))
        # freeze QEMU so QMP cannot answer: only --force gets rid of it
        os.kill(pid, signal.SIGSTOP)
        stuck = _luoagent(lab_qemu, "vm", "--root", str(root), "stop", "c1", check=False)
        assert stuck.returncode == 1 and "--force" in stuck.stderr
        forced = json.loads(_luoagent(lab_qemu, "vm", "--root", str(root), "stop", "c1", "--force", "--json").stdout)
        assert forced["stopped"] == "killed (SIGKILL)"
        assert not vm.pid_alive(pid)
        assert not (root / "c1").exists()
        assert sorted(p.name for p in own.iterdir()) == ["keep.txt"], "stop removed a file it did not create"
    finally:
        if pid is not None and vm.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_recycled_pid_is_never_signalled(tmp_path, capsys):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        vm.register_restored(name="old", pid=bystander.pid, qmp_socket=str(tmp_path / "old.sock"),
                             binary="/nonexistent/qemu", argv=["-name", "old"], ram=[], log="",
                             vm_root=tmp_path)
        assert vm.vm_status(vm.load_record("old", tmp_path)) == "dead"
        assert cli.main(["vm", "--root", str(tmp_path), "stop", "old", "--force", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["stopped"] == "already gone"
        assert bystander.poll() is None, "vm stop signalled a process that is not the VM"
    finally:
        bystander.kill()
        bystander.wait()


def test_a_pid_is_this_vm_only_if_its_qmp_socket_matches_as_a_whole_value(tmp_path):
    # a real process whose argv carries another VM's QMP socket, whose path extends this one's
    other = f"{tmp_path}/a/qmp.sock2"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-qmp", f"unix:{other},server=on,wait=off"])
    try:
        # until the exec, /proc/PID/cmdline is still pytest's
        deadline = time.monotonic() + 10
        while b"-qmp" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not vm.is_vm_process(vm.VmRecord(name="a", pid=proc.pid, qmp_socket=f"{tmp_path}/a/qmp.sock"))
        assert vm.is_vm_process(vm.VmRecord(name="a2", pid=proc.pid, qmp_socket=other))
    finally:
        proc.kill()
        proc.wait()
    assert not vm.is_vm_process(vm.VmRecord(name="a2", pid=proc.pid, qmp_socket=other))
