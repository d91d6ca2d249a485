"""Security hardening (issue 13): private file modes, the manifest as untrusted input, what
restore executes and as whom, test switches that cannot reach a real host, honest figures.

Unit tier: real memfds, real files and real processes; no LUO or QEMU needed."""

from __future__ import annotations

import os
import stat
import sys

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


# ---- 5. input that crosses the kexec ------------------------------------------------------
def _doc(**vm_changes):
    doc = make_manifest("a").to_dict()
    doc["vms"][0].update(vm_changes)
    return doc


@pytest.mark.parametrize("change, match", [
    ({"pid": "12"}, "'pid' must be an integer"),
    ({"pid": 1.5}, "'pid' must be an integer"),
    ({"pid": True}, "'pid' must be an integer"),
    ({"pid": -1}, "pid -1 is out of range"),
    ({"uid": "0"}, "'uid' must be an integer"),
    ({"ram": [{"id": "ram0", "size": 1 << 20, "token": 1}, {"id": "ram0", "size": 1 << 20, "token": 2}]},
     "RAM backend id twice"),
    ({"ram": [{"id": "ram0", "size": 1 << 20, "token": 7}]}, "token 7, expected 1"),
    ({"ram": [{"id": "ram0", "size": 1 << 20, "token": 2**64}]}, "token 18446744073709551616, expected 1"),
    ({"vmstate": {"token": 0x2000, "size": 10}}, "vmstate token 0x2000"),
    ({"ram": [{"id": "../../etc/cron.d/x", "size": 1 << 20, "token": 1}]}, "not a QOM id"),
    ({"ram": [{"id": ".hidden", "size": 1 << 20, "token": 1}]}, "not a QOM id"),
    ({"qmp_socket": "/run/luoagent/vms/a/../../../etc/passwd"}, "qmp_socket .* not a normalised absolute path"),
    ({"qmp_socket": "relative/qmp.sock"}, "not a normalised absolute path"),
    ({"qmp_socket": "/run//x"}, "not a normalised absolute path"),
    ({"qmp_socket": "/" + "x" * 120}, "longer than a unix socket path"),
    ({"binary": "qemu-system-x86_64"}, "binary .* not a normalised absolute path"),
    ({"binary": "/usr/bin/../../tmp/evil"}, "binary .* not a normalised absolute path"),
    ({"name": "../etc", "session": "luoagent/vm/../etc"}, "invalid VM"),
    ({"name": "..", "session": "luoagent/vm/.."}, "invalid VM"),
])
def test_manifest_rejects_hostile_fields(change, match):
    from luoagent.errors import ManifestCorrupt

    with pytest.raises(ManifestCorrupt, match=match):
        mf.Manifest.from_dict(_doc(**change))


def test_manifest_rejects_a_non_list_of_vms_and_oversize():
    from luoagent.errors import ManifestCorrupt

    doc = make_manifest("a").to_dict()
    doc["vms"] = {"a": 1}
    with pytest.raises(ManifestCorrupt, match="'vms' must be a list"):
        mf.Manifest.from_dict(doc)
    fd = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, mf.MANIFEST_MAX_BYTES + 1)
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        with pytest.raises(ManifestCorrupt, match="more than"):
            mf.read_memfd(fd)
    finally:
        os.close(fd)


def test_manifest_memfd_must_be_sealed():
    from luoagent.errors import ManifestCorrupt

    data = make_manifest("a").to_json()
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, data)
        with pytest.raises(ManifestCorrupt, match="not sealed"):
            mf.read_memfd(fd)
    finally:
        os.close(fd)
    fd = mf.write_sealed_memfd(make_manifest("a"))
    try:
        assert mf.read_memfd(fd).vms[0].name == "a"
    finally:
        os.close(fd)


def test_manifest_new_fields_round_trip_and_old_minor_reads():
    m = make_manifest("a")
    m.vms[0].uid, m.vms[0].gid = 64055, 64056
    back = mf.Manifest.from_json(m.to_json())
    assert (back.vms[0].uid, back.vms[0].gid) == (64055, 64056)
    doc = make_manifest("a").to_dict()
    doc["schema"] = "1.0"
    for key in ("uid", "gid", "pid"):
        del doc["vms"][0][key]
    old = mf.Manifest.from_dict(doc)
    assert (old.vms[0].uid, old.vms[0].gid, old.vms[0].pid) == (0, 0, 0)


@pytest.mark.parametrize("argv, sock, served", [
    (["-qmp", "unix:/x/qmp.sock,server=on,wait=off"], "/x/qmp.sock", True),
    (["-qmp", "unix:/x/qmp.sock.old,server=on"], "/x/qmp.sock", False),
    (["-qmp", "unix:/y/x/qmp.sock,server=on"], "/x/qmp.sock", False),
    (["-serial", "file:/x/qmp.sock.log"], "/x/qmp.sock", False),
    (["-qmp", "unix:/x/./qmp.sock,server=on"], "/x/qmp.sock", True),
    (["-chardev", "socket,id=m0,path=/x/qmp.sock,server=on,wait=off", "-mon", "chardev=m0,mode=control"],
     "/x/qmp.sock", True),
    (["-chardev", "socket,id=m0,path=/x/qmp.sock,server=on,wait=off", "-mon", "chardev=m0,mode=readline"],
     "/x/qmp.sock", False),
])
def test_restore_matches_its_qmp_socket_as_a_path(argv, sock, served):
    assert restore._has_qmp_on(argv, sock) is served


def test_restore_never_unlinks_a_non_socket_named_as_qmp_socket(tmp_path):
    from luoagent.errors import RestoreError

    victim = tmp_path / "precious"
    victim.write_text("keep me")
    with pytest.raises(RestoreError, match="is not a socket"):
        restore._prepare_paths([], str(victim))
    assert victim.read_text() == "keep me"


def test_rescue_image_paths_come_from_its_layout_and_owner(tmp_path, open_umask):
    from luoagent.errors import RestoreError

    vmrec = make_vm("a", n_ram=1)
    vmrec.ram[0].size = 2 << 20
    ram = memfd.create("ram", 2 << 20)
    vst = memfd.create("vmstate", vmrec.vmstate.size)
    try:
        target = restore.write_rescue(vmrec, [ram], vst, tmp_path / "rescue")
    finally:
        os.close(ram)
        os.close(vst)
    os.chmod(target / "vmstate", 0o666)  # someone else could have rewritten the device state
    with pytest.raises(RestoreError, match="writable by nobody else"):
        restore.restore_from_rescue(target, restore.RestoreOptions(qemu="/bin/false", vm_root=tmp_path / "v"))


# ---- 2. trust what the kernel says -------------------------------------------------------
import shutil
import subprocess
import time

#: the system's Python (root-owned; a pyenv shim in $PATH may not be runnable by others)
PYTHON = os.path.realpath("/usr/bin/python3")


def _wait_exec(proc, name, argv0=None):
    """Wait until ``proc`` has exec'd (its /proc/PID/exe names ``name``, its argv[0] is ``argv0``)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.path.basename(os.readlink(f"/proc/{proc.pid}/exe")).startswith(name) and (
                    argv0 is None or open(f"/proc/{proc.pid}/cmdline", "rb").read().split(b"\0")[0] == argv0.encode()):
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"pid {proc.pid} never ran {name}")


def test_adopted_binary_is_the_kernels_exe_not_argv0():
    from luoagent.adapters import qemu_binary

    # argv[0] claims to be a QEMU in a directory anyone could write to
    proc = subprocess.Popen(["/tmp/evil/qemu-system-x86_64", "-c", "import time; time.sleep(30)", "-name", "a"],
                            executable=PYTHON)
    try:
        _wait_exec(proc, "python", "/tmp/evil/qemu-system-x86_64")
        binary, argv = qemu_binary.qemu_cmdline(proc.pid)
        assert binary == os.path.realpath(PYTHON)
        assert argv == ["-c", "import time; time.sleep(30)", "-name", "a"]
    finally:
        proc.kill()
        proc.wait()


def test_binary_behind_a_dynamic_loader_is_the_mapped_one(tmp_path):
    from luoagent.adapters import qemu_binary

    loader = next(p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-x86-64.so.2") if os.path.exists(p))
    fake = tmp_path / "qemu-system-x86_64"
    shutil.copy(shutil.which("sleep"), fake)
    proc = subprocess.Popen([loader, str(fake), "30"])
    try:
        _wait_exec(proc, "ld-")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                binary, argv = qemu_binary.qemu_cmdline(proc.pid)
                break
            except Exception:
                time.sleep(0.05)  # the loader has not mapped it yet
        assert binary == str(fake) and argv == ["30"]
    finally:
        proc.kill()
        proc.wait()


def test_only_a_binary_only_root_can_change_is_trusted(tmp_path):
    from luoagent.adapters import qemu_binary
    from luoagent.errors import UntrustedBinary

    assert qemu_binary.check_trusted(shutil.which("sleep")) == __import__("pathlib").Path(os.path.realpath(shutil.which("sleep")))
    d = tmp_path / "bin"
    d.mkdir(mode=0o755)
    b = d / "qemu-system-x86_64"
    shutil.copy(shutil.which("sleep"), b)
    os.chmod(b, 0o755)
    qemu_binary.check_trusted(b)
    os.chmod(b, 0o775)
    with pytest.raises(UntrustedBinary, match="mode 775"):
        qemu_binary.check_trusted(b)
    os.chmod(b, 0o755)
    os.chown(b, 65534, 65534)
    with pytest.raises(UntrustedBinary, match="owned by uid 65534"):
        qemu_binary.check_trusted(b)
    os.chown(b, 0, 0)
    os.chmod(d, 0o777)  # anyone could swap the file
    with pytest.raises(UntrustedBinary, match="mode 777"):
        qemu_binary.check_trusted(b)
    os.chmod(d, 0o755)
    link = tmp_path / "link"
    link.symlink_to(b)
    assert qemu_binary.check_trusted(link) == b
    with pytest.raises(UntrustedBinary, match="No such file"):
        qemu_binary.check_trusted(tmp_path / "missing")


def test_identity_of_a_process_is_the_kernels():
    from luoagent.adapters import procfs

    assert procfs.identity(os.getpid()) == (os.geteuid(), os.getegid())
    proc = subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "sleep", "30"])
    try:
        _wait_exec(proc, "sleep")
        assert procfs.identity(proc.pid) == (65534, 65534)
    finally:
        proc.kill()
        proc.wait()


def test_restore_runs_qemu_as_the_identity_it_had():
    vmrec = make_vm("a")
    assert restore.identity_args(vmrec, ["-machine", "pc"]) == []  # a root QEMU stays root
    vmrec.uid, vmrec.gid = 64055, 64056
    assert restore.identity_args(vmrec, ["-machine", "pc"]) == ["-run-with", "user=64055:64056"]
    # an argv that drops privileges itself keeps doing so (and is not given a second user)
    assert restore.identity_args(vmrec, ["-run-with", "async-teardown=on,user=qemu"]) == []
    assert restore.identity_args(vmrec, ["-runas", "qemu"]) == []


@pytest.mark.parametrize("user, expect", [("nobody", (65534, 65534)), ("65534:65534", (65534, 65534)),
                                          ("1000:1000", (1000, 1000))])
def test_vm_start_user_resolves(user, expect):
    assert vm.resolve_user(user) == expect


@pytest.mark.parametrize("user, match", [("root", "is root"), ("0:0", "is root"),
                                         ("no-such-user-x", "no such user")])
def test_vm_start_user_refuses(user, match, tmp_path):
    from luoagent.errors import UsageError

    with pytest.raises(UsageError, match=match):
        vm.start_vm("a", 64 << 20, [], root=tmp_path, user=user)
    assert list(tmp_path.iterdir()) == []


def test_doctor_says_which_vms_run_as_root(tmp_path):
    from luoagent.workflows import doctor

    root = tmp_path / "vms"
    procs = [subprocess.Popen([PYTHON, "-c", "import time; time.sleep(30)", "-name", "asroot"]),
             subprocess.Popen(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                               PYTHON, "-c", "import time; time.sleep(30)", "-name", "asnobody"])]
    try:
        time.sleep(0.5)
        for name, p in zip(("asroot", "asnobody"), procs):
            vm.register_restored(name=name, pid=p.pid, qmp_socket=str(root / name / "qmp.sock"), binary="/bin/true",
                                 argv=[], ram=[], log="", vm_root=root)
        c = doctor.check_vm_identities(str(root))
        assert c.ok and "asroot" in c.detail and "uid 0" in c.detail and "asnobody" not in c.detail
        assert "--user" in c.fix
        assert "advice: start VMs with `luoagent vm start --user" in doctor.render(doctor.report([c]))
        procs[0].kill()
        procs[0].wait()
        c = doctor.check_vm_identities(str(root))
        assert c.ok and c.fix == "" and "asnobody (pid" in c.detail and "uid 65534" in c.detail
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---- 3. test switches can never end in a kexec --------------------------------------------
def test_test_mode_refuses_to_reboot_when_it_cannot_tell_whether_an_image_is_loaded(monkeypatch):
    from pathlib import Path

    from luoagent import testmode
    from luoagent.adapters import kexec
    from luoagent.errors import UpdateError
    from luoagent.workflows import update

    monkeypatch.setattr(testmode, "_enabled", True)
    monkeypatch.setattr(kexec, "loaded_state", lambda: None)  # no /sys/kernel/kexec_loaded
    monkeypatch.setattr(kexec, "reboot_kexec", lambda sync=True: pytest.fail("reboot syscall made in test mode"))
    run = update._Update(update.UpdateRequest(kernel=Path("/nonexistent")))
    with pytest.raises(UpdateError, match="refusing to reboot"):
        run._reboot()


@pytest.mark.parametrize("switches", [{"LUOAGENT_TEST_SKIP": "luo,kexec-load"}, {"LUOAGENT_TEST_SKIP": "luo"},
                                      {"LUOAGENT_FAULT": "after-quiesce"}])
def test_stray_test_switches_do_not_skip_the_real_checks(tmp_path, switches):
    """Without --test-mode the variables change nothing: update still runs the doctor's host
    checks (which fail on this LUO-less kernel) before touching anything."""
    from pathlib import Path

    # its own run dir and VM root: another update on this machine must not hold their lock
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), LUOAGENT_RUN_DIR=str(tmp_path / "run"),
               LUOAGENT_VM_ROOT=str(tmp_path / "vms"), **switches)
    kernel = tmp_path / "bzImage"
    data = bytearray(8192)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    kernel.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "luoagent", "update", "--kernel", str(kernel), "--vm", "a=/nonexistent.sock"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "test switches ignored outside --test-mode" in r.stderr
    assert "cannot do a live update" in r.stderr and "TEST MODE" not in r.stderr, r.stderr


# ---- 6. no blocking work on the event loop; sync before quiesce ---------------------------
def test_rescue_write_does_not_block_the_event_loop(tmp_path):
    """While one VM's rescue image is written, the other VMs' coroutines keep running: the
    ticker must get turns before the write has finished (on the loop, it gets none)."""
    import asyncio

    vmrec = make_vm("a", n_ram=1)
    size = 64 << 20
    vmrec.ram[0].size = size
    ram = memfd.create("ram", size)
    memfd.write_pattern(ram, 0, size, 7)  # all data, no holes: a real copy
    vst = memfd.create("vmstate", vmrec.vmstate.size)

    async def main():
        done = asyncio.Event()
        ticks_during_write = 0

        async def ticker():
            nonlocal ticks_during_write
            while not done.is_set():
                ticks_during_write += 1
                await asyncio.sleep(0)

        async def writer():
            try:
                return await restore.write_rescue_async(vmrec, [ram], vst, tmp_path / "rescue")
            finally:
                done.set()

        target, _ = await asyncio.gather(writer(), ticker())
        return target, ticks_during_write

    try:
        target, ticks = asyncio.run(main())
    finally:
        os.close(ram)
        os.close(vst)
    assert (target / "ram0.ram").stat().st_size == size
    assert ticks > 1, f"the event loop ran nothing else while {size >> 20} MiB were copied"


def test_dirty_bytes_from_meminfo():
    from luoagent.adapters import kexec

    assert kexec.dirty_bytes("MemTotal: 100 kB\nDirty:  12 kB\nWriteback: 4 kB\n") == 16 * 1024
    assert kexec.dirty_bytes("Dirty: 0 kB\nWriteback: 0 kB\n") == 0
    assert kexec.dirty_bytes("MemTotal: 1 kB\n") is None
    assert isinstance(kexec.dirty_bytes(), int)  # this host's /proc/meminfo


@pytest.mark.parametrize("dirty, syncs", [(0, False), (8192, True), (None, True)])
def test_second_sync_only_when_something_is_dirty(monkeypatch, dirty, syncs):
    from pathlib import Path

    from luoagent import testmode
    from luoagent.adapters import kexec
    from luoagent.errors import RebootRefused
    from luoagent.workflows import update

    calls = []
    monkeypatch.setattr(testmode, "_enabled", False)
    monkeypatch.setattr(kexec, "dirty_bytes", lambda: dirty)

    def reboot(sync=True):
        calls.append(sync)
        raise RebootRefused("refused (test double: the syscall is not made here)")

    monkeypatch.setattr(kexec, "reboot_kexec", reboot)
    run = update._Update(update.UpdateRequest(kernel=Path("/nonexistent"), json=True))
    with pytest.raises(RebootRefused):
        run._reboot()
    assert calls == [syncs]


# ---- 4. honest figures --------------------------------------------------------------------
#: query-migrate "ram" of real QEMU 11.1.3 cpr-reboot saves of a 64 MiB guest (probed on this
#: host): share=on memory-backend-file with x-ignore-shared, and memory-backend-ram
SKIPPED_RAM = {"total": 532480, "duplicate": 80, "normal-bytes": 204800, "normal": 50, "transferred": 315606}
COPIED_RAM = {"total": 67641344, "duplicate": 16399, "normal-bytes": 471040, "normal": 115, "transferred": 729242}


def test_ram_figures_are_what_qemu_measured():
    from luoagent.adapters import cpr

    f = cpr.RamFigures.from_query_migrate({"status": "completed", "ram": SKIPPED_RAM})
    assert (f.pages_bytes, f.zero_pages, f.blocks_bytes, f.qemu_stream_bytes) == (204800, 80, 532480, 315606)
    assert f.no_guest_block_migrated([64 << 20]) is True
    assert f.guest_ram_copied_at_most(315606) == 204800
    # guest RAM that WAS migrated (a backend x-ignore-shared does not skip): never reported as 0
    f = cpr.RamFigures.from_query_migrate({"status": "completed", "ram": COPIED_RAM})
    assert f.no_guest_block_migrated([64 << 20]) is False
    assert f.guest_ram_copied_at_most(729242) == 471040
    # a QEMU that reports nothing: unknown, and the bound falls back to the stream size
    f = cpr.RamFigures.from_query_migrate({"status": "completed"})
    assert (f.pages_bytes, f.blocks_bytes) == (None, None)
    assert f.no_guest_block_migrated([64 << 20]) is None and f.guest_ram_copied_at_most(1000) == 1000


def test_ram_figures_wording_says_what_was_measured():
    from luoagent.workflows import summary

    v = {"ram_pages_written_bytes": 204800, "zero_pages_written": 80, "ram_blocks_in_stream_bytes": 532480,
         "guest_ram_bytes_copied_at_most": 204800, "no_guest_ram_block_in_stream": True}
    text = summary.ram_figures_text(v)
    assert text == ("QEMU wrote 204,800 B of RAM pages and 80 zero-page markers, from RAM blocks of 532,480 B in "
                    "all: no guest RAM block among them (each is larger than that total); so at most 204,800 B "
                    "of guest RAM went into the stream")
    v.update(no_guest_ram_block_in_stream=False)
    assert "a guest RAM block MAY be among them" in summary.ram_figures_text(v)
    v.update(ram_pages_written_bytes=None, ram_blocks_in_stream_bytes=None, no_guest_ram_block_in_stream=None)
    text = summary.ram_figures_text(v)
    assert text.startswith("QEMU did not report the RAM page bytes it wrote") and "not reported" in text
