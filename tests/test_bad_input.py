"""Bad-input catalogue (issue 13): table-driven, one table per CLI verb. Each bad input must
give one specific error line naming what was wrong and what to do, exit status 1 or 2, and no
traceback; inputs that name a VM are also run against a live VM in tests/host/test_bad_input_host.py,
which checks that the VM was never stopped.

Unit tier: the real CLI in-process (argparse, workflows, real files and processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from luoagent import cli, testmode

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def place(tmp_path):
    """Files the inputs refer to: a minimal bzImage header, an empty file, a hostile and a
    world-writable rescue image, an empty VM root, a VM root with one registered VM."""
    kernel = tmp_path / "bzImage"
    data = bytearray(8192)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    kernel.write_bytes(bytes(data))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "emptyroot").mkdir()
    from test_manifest import make_vm
    import dataclasses

    for name, change in (("hostile", {"ram": [{"id": "../../etc/x", "size": 1 << 20, "token": 1}]}),
                         ("writable", {})):
        d = tmp_path / name
        d.mkdir(mode=0o700)
        vm = dataclasses.asdict(make_vm("a", n_ram=1))
        vm.update(change)
        (d / "restore.json").write_text(json.dumps({"vm": vm}))
        (d / "vmstate").write_bytes(b"x")
        (d / "ram0.ram").write_bytes(b"")
    os.chmod(tmp_path / "writable" / "vmstate", 0o666)
    from luoagent.workflows import vm as vmwf

    vmwf.register_restored(name="a", pid=os.getpid(), qmp_socket=str(tmp_path / "root" / "a" / "qmp.sock"),
                           binary="/bin/true", argv=[], ram=[], log="", vm_root=tmp_path / "root")
    return tmp_path


def run_cli(argv: list[str], capsys, monkeypatch, *, test_mode=False) -> tuple[int, str, str]:
    monkeypatch.setattr(testmode, "_enabled", False)  # main() enables it for --test-mode; undone after
    monkeypatch.delenv(testmode.FAULT_ENV, raising=False)
    if test_mode:
        monkeypatch.setenv(testmode.SKIP_ENV, "luo,kexec-load")
        argv = ["--test-mode", *argv]
    else:
        monkeypatch.delenv(testmode.SKIP_ENV, raising=False)
    try:
        code = cli.main(["--log-format", "console", *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def check(code, out, err, expect_code, pattern):
    import re

    assert code == expect_code, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert re.search(pattern, out + err, re.S), f"expected /{pattern}/ in:\n{out}{err}"


def fill(argv: str, place: Path) -> list[str]:
    return [a.replace("{T}", str(place)) for a in argv.split()]


VM_CASES = [  # sizes, names, binaries, QEMU options, users, records
    ("vm start a --memory 12345", 2, r"--memory 12345 B: give at least 2M, a multiple of \d+ B"),
    ("vm start a --memory 1X", 2, r"cannot parse size '1X': use a number with an optional K/M/G/T suffix"),
    ("vm start a --memory 1M", 2, r"give at least 2M"),
    ("vm start a --memory 0", 2, r"size '0' must be greater than zero"),
    ("vm start a/b --memory 64M", 2, r"VM name 'a/b' contains '/'.*use letters, digits"),
    ("vm start " + "x" * 52 + " --memory 64M", 2, r"is 52 bytes; at most 51 fit"),
    ("vm start _x --memory 64M", 2, r"unsupported characters; start with a letter or digit"),
    ("vm start a --memory 64M --smp 0", 2, r"--smp 0: need at least one vCPU"),
    ("vm start a --memory 64M --smp x", 2, r"argument --smp: invalid int value"),
    ("vm start a --memory 64M --qemu {T}/nonexistent", 1, r"QEMU binary .*nonexistent \(the path given\) does not exist"),
    ("vm start a --memory 64M --qemu {T}/empty", 1, r"is not an executable file"),
    ("vm start a --memory 64M --qemu /bin/true", 1, r"--version failed.*is it a qemu-system binary"),
    ("vm start a --memory 64M -- -m 1G", 2, r"QEMU option -m is set by luoagent --memory; remove it from QEMU_ARGS"),
    ("vm start a --memory 64M -- -enable-kvm", 2, r"-enable-kvm: use luoagent's --accel instead"),
    ("vm start a --memory 64M --user root", 2, r"--user 'root' is root \(uid 0\); name an unprivileged user"),
    ("vm start a --memory 64M --user no-such-user-x", 2, r"no such user; give an existing user name or UID:GID"),
    ("vm start a --memory 64M --user 0:0", 2, r"is root"),
    ("vm start a", 2, r"the following arguments are required: --memory"),
    ("vm --root {T}/root stop ghost", 2, r"no VM named 'ghost' .*`luoagent vm list` shows the VMs"),
    ("vm --root {T}/root stop ..", 2, r"VM name '..' has unsupported characters"),
]

UPDATE_CASES = [  # kernel images, VM names, sockets, roots, timeouts
    ("update --kernel {T}/nonexistent", 1, r"kernel image .*nonexistent does not exist; pass --kernel PATH to a bzImage"),
    ("update --kernel /etc/passwd", 1, r"/etc/passwd is not an x86 bzImage .*pass the bzImage from"),
    ("update --kernel {T}/empty", 1, r"empty is not an x86 bzImage"),
    ("update --kernel {T}", 1, r"is not a regular file"),
    ("update --kernel {T}/bzImage --initrd {T}/nonexistent", 1, r"initrd .*nonexistent does not exist"),
    ("update --kernel {T}/bzImage --append x --reuse-cmdline", 2, r"not allowed with argument"),
    ("update --kernel {T}/bzImage --vm a/b={T}/x.sock", 2, r"VM name 'a/b' contains '/'"),
    ("update --kernel {T}/bzImage --vm-root {T}/root --vm ghost", 2, r"VM 'ghost' is not known.*`luoagent vm list`.*--vm ghost=QMP_SOCKET"),
    ("update --kernel {T}/bzImage --vm a={T}/nonexistent.sock", 1, r"VM a: QMP socket .* does not exist; is the VM running\?"),
    ("update --kernel {T}/bzImage --vm a={T}/empty", 1, r"VM a: QMP socket .*empty is unreachable .*is the VM running\?"),
    ("update --kernel {T}/bzImage --vm a={T}/x.sock --vm a={T}/y.sock", 2, r"VM 'a' named twice"),
    ("update --kernel {T}/bzImage --vm-root {T}/emptyroot", 2, r"emptyroot is empty; start VMs with `luoagent vm start`"),
    ("update --kernel {T}/bzImage --vm-root {T}/noroot", 2, r"noroot is empty; start VMs with `luoagent vm start`"),
    ("update --kernel {T}/bzImage --vm a={T}/x.sock --timeout 0", 2, r"--timeout 0: give the seconds each QEMU step may take"),
    ("update --kernel {T}/bzImage --vm a={T}/x.sock --timeout -5", 2, r"--timeout -5: give the seconds"),
]

RESTORE_CASES = [  # rescue images, manifests, timeouts
    ("restore --from-rescue {T}/nonexistent", 1, r"nonexistent is not a luoagent rescue image .*give --from-rescue the directory"),
    ("restore --from-rescue {T}/hostile", 1, r"RAM backend id '../../etc/x' is not a QOM id"),
    ("restore --from-rescue {T}/writable", 1, r"vmstate is owned by uid 0 with mode 666; only an image .*writable by nobody else"),
    ("restore --timeout 0", 2, r"--timeout 0: give the seconds"),
    ("restore", 1, r"Live Update Orchestrator|/dev/liveupdate"),  # this host kernel has no LUO
]

OTHER_CASES = [
    ("trace", 2, r"nothing to trace: use 'luoagent trace -- CMD ARGS...'"),
    ("trace --pid 1 -- true", 2, r"give either --pid PID or -- CMD ARGS..., not both"),
    ("trace -- {T}/nonexistent-cmd", 1, r"cannot start .*nonexistent-cmd.*check the path"),
    ("trace --pid 999999999", 1, r"no process with pid 999999999"),
    ("doctor --qemu {T}/nonexistent", 1, r"QEMU binary .*nonexistent \(the path given\) does not exist.*fix: install qemu-system-x86"),
    ("nosuchverb", 2, r"invalid choice: 'nosuchverb'"),
]


@pytest.mark.parametrize("argv, code, pattern", VM_CASES, ids=[c[0] for c in VM_CASES])
def test_vm_bad_input(argv, code, pattern, place, capsys, monkeypatch):
    monkeypatch.setenv("LUOAGENT_VM_ROOT", str(place / "vmroot"))
    check(*run_cli(fill(argv, place), capsys, monkeypatch), code, pattern)
    assert not (place / "vmroot").exists() or [p.name for p in (place / "vmroot").iterdir()] in ([], [".luoagent.lock"])


@pytest.mark.parametrize("argv, code, pattern", UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES])
def test_update_bad_input(argv, code, pattern, place, capsys, monkeypatch):
    monkeypatch.setenv("LUOAGENT_VM_ROOT", str(place / "vmroot"))
    check(*run_cli(fill(argv, place), capsys, monkeypatch, test_mode=True), code, pattern)


@pytest.mark.parametrize("argv, code, pattern", RESTORE_CASES, ids=[c[0] for c in RESTORE_CASES])
def test_restore_bad_input(argv, code, pattern, place, capsys, monkeypatch):
    monkeypatch.setenv("LUOAGENT_VM_ROOT", str(place / "vmroot"))
    check(*run_cli(fill(argv, place), capsys, monkeypatch), code, pattern)


@pytest.mark.parametrize("argv, code, pattern", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_doctor_trace_bad_input(argv, code, pattern, place):
    # a separate process: the tracer forks, and a fork of pytest must not run on
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUOAGENT_")}
    r = subprocess.run([sys.executable, "-m", "luoagent", "--log-format", "console", *fill(argv, place)],
                       capture_output=True, text=True, timeout=120, env=dict(env, PYTHONPATH=str(REPO)))
    check(r.returncode, r.stdout, r.stderr, code, pattern)


# ---- concurrent runs of the same verb: another real process holds the VM root's lock --------
@pytest.fixture
def lock_holder(place):
    root = place / "root"
    code = textwrap.dedent(f"""
        import sys, time
        from luoagent.workflows import vm
        with vm.agent_lock({str(root)!r}, "update"):
            print("held", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


CONCURRENT_CASES = [
    ("update --kernel {T}/bzImage --vm-root {T}/root --vm a={T}/x.sock", 2, True),
    ("restore --vm-root {T}/root", 2, False),
    ("restore --vm-root {T}/root --from-rescue {T}/writable", 2, False),
    ("vm --root {T}/root stop a", 2, False),
]


@pytest.mark.parametrize("argv, code, test_mode", CONCURRENT_CASES, ids=[c[0] for c in CONCURRENT_CASES])
def test_a_second_run_is_refused_while_one_holds_the_vm_root(argv, code, test_mode, place, lock_holder, capsys,
                                                            monkeypatch):
    verb = argv.split()[0] if not argv.startswith("vm") else "vm stop"
    check(*run_cli(fill(argv, place), capsys, monkeypatch, test_mode=test_mode), code,
          rf"another luoagent update/restore/vm start\|stop is running on VM root .* \(pid {lock_holder.pid} holds "
          rf".*\.luoagent\.lock\); wait for it to finish, then run `luoagent {verb}` again")


def test_the_catalogue_has_at_least_30_bad_inputs():
    assert len(VM_CASES + UPDATE_CASES + RESTORE_CASES + OTHER_CASES + CONCURRENT_CASES) >= 30
