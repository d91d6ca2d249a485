"""Host tier for `luoagent update`: real QEMU 11.1 VMs running the counter guest, real QMP,
real cpr-reboot saves — and rollback, since this host kernel has no LUO and no kexec.

The LUO and kexec_file_load steps are switched off with the test-only LUOAGENT_TEST_SKIP, so
the update really stops the VMs and saves their vmstate; then either a fault is injected after
quiesce, or the real reboot(LINUX_REBOOT_CMD_KEXEC) syscall fails (this kernel cannot kexec).
Every case must leave every VM running with its counter rising and nothing half-done in QEMU.
The same rollbacks with real LUO sessions run inside the lab (tests/lab/test_update_lab.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from luoagent import memfd
from luoagent.adapters import cpr, qemu_binary, qemu_ram, qmp_client
from luoagent.lab import guest

pytestmark = [pytest.mark.host, pytest.mark.timeout(600)]

RAM = 64 * 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
#: no LUO, no kexec here, and other engineers' QEMUs on this shared machine are not ours to count
HOST_SKIP = "luo,kexec-load,other-qemus"
#: this host's own kernel has no LUO and the test image is a bare header: give the landing-side
#: preflight a command line that keeps LUO on and accept the image's unread configuration
#: (tests/host/test_landing_host.py exercises those refusals)
LANDING_OK = ("--append", "console=ttyS0 liveupdate=on kho=on", "--allow-unverified-kernel")


@pytest.fixture(scope="module")
def guest_elf(tmp_path_factory) -> Path:
    return guest.build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture(scope="module")
def kernel_image(tmp_path_factory) -> Path:
    """A bzImage for --kernel. Never loaded here (kexec-load is skipped), only checked; a
    minimal x86 boot header is what the check reads."""
    path = tmp_path_factory.mktemp("kernel") / "bzImage"
    data = bytearray(8192)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    path.write_bytes(bytes(data))
    return path


@dataclass
class Vm:
    name: str
    proc: subprocess.Popen
    sock: Path
    ram_fd: int | None  # our reference to the RAM memfd (None for non-memfd RAM)

    def counter(self) -> int:
        return guest.read_state(self.ram_fd).counter


def start_vm(binary, elf, tmp: Path, name: str, kind: str = "memfd") -> Vm:
    sock = tmp / f"{name}.sock"
    base = ["-machine", "pc", "-accel", "tcg", "-m", str(RAM >> 20), "-nodefaults", "-display", "none",
            "-kernel", str(elf), "-serial", f"file:{tmp / (name + '.serial')}"]
    fd = None
    if kind == "memfd":
        fd = memfd.create(f"luoagent-test-{name}", RAM)
        argv = base + qemu_ram.ram_backend_args("ram0", RAM, fd=fd)
    elif kind == "private":  # share=off over a memfd: QEMU maps it privately
        fd = memfd.create(f"luoagent-test-{name}", RAM)
        argv = base + ["-object", f"memory-backend-file,id=ram0,size={RAM},mem-path=/proc/self/fd/{fd},share=off",
                       "-machine", "memory-backend=ram0"]
    elif kind == "anon":  # memory-backend-ram: no file at all
        argv = base + ["-object", f"memory-backend-ram,id=ram0,size={RAM}", "-machine", "memory-backend=ram0"]
    elif kind == "memfd-backend":  # QEMU's own memfd: x-ignore-shared would still copy it
        argv = base + ["-object", f"memory-backend-memfd,id=ram0,size={RAM},share=on",
                       "-machine", "memory-backend=ram0"]
    else:
        raise ValueError(kind)
    proc = qemu_binary.launch(binary, argv, pass_fds=[fd] if fd is not None else [], qmp_socket=sock,
                       log=tmp / f"{name}.log")
    vm = Vm(name, proc, sock, fd if kind == "memfd" else None)
    if kind == "memfd":
        deadline = time.monotonic() + 60
        while not (guest.read_state(fd).magic_ok and vm.counter() > 0):
            assert proc.poll() is None, (tmp / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "guest did not start counting"
            time.sleep(0.05)
    else:
        asyncio.run(_status(vm))  # QMP up
    return vm


@pytest.fixture
def vms(lab_qemu, guest_elf, tmp_path):
    started: list[Vm] = []

    def make(name, kind="memfd"):
        vm = start_vm(lab_qemu, guest_elf, tmp_path, name, kind)
        started.append(vm)
        return vm

    yield make
    for vm in started:
        qemu_binary.kill_process(vm.proc)
        if vm.ram_fd is not None:
            os.close(vm.ram_fd)


async def _status(vm: Vm) -> str:
    async with await qmp_client.Qmp.connect(vm.sock, timeout=30, process=vm.proc) as q:
        return await q.status()


async def _qemu_state(vm: Vm) -> dict:
    async with await qmp_client.Qmp.connect(vm.sock, timeout=30, process=vm.proc) as q:
        return {
            "status": await q.status(),
            "migrate": await q.execute("query-migrate"),
            "mode": (await q.execute("query-migrate-parameters")).get("mode"),
            "caps": {c["capability"]: c["state"] for c in await q.execute("query-migrate-capabilities")},
            "fdsets": await q.execute("query-fdsets"),
        }


def checkpoint_into_rescue(vm: Vm, lab_qemu: Path, rescue_dir: Path, **record_fields):
    """Stop ``vm``, save its cpr-reboot checkpoint into a memfd, quit its QEMU and write the
    rescue image restore writes for a VM it cannot bring back (the RAM then exists only in the
    image's files: ``vm.ram_fd`` is closed). Returns (PreservedVm, rescue image directory)."""
    from luoagent import manifest as mf
    from luoagent.workflows import restore

    _binary, argv = qemu_binary.qemu_cmdline(vm.proc.pid)
    vmstate = memfd.create("luoagent-test-vmstate")

    async def checkpoint():
        async with await qmp_client.Qmp.connect(vm.sock, timeout=30, process=vm.proc) as q:
            w = memfd.reopen(vmstate, os.O_WRONLY)
            try:
                await q.add_fd(w, 9)
            finally:
                os.close(w)
            stopped_ns = time.time_ns()
            await q.stop()
            await cpr.save(q, "file:/dev/fdset/9")
            saved_ns = time.time_ns()
            await q.quit()
        return stopped_ns, saved_ns

    try:
        stopped_ns, saved_ns = asyncio.run(checkpoint())
        vm.proc.wait(10)
        record = mf.PreservedVm(
            name=vm.name, binary=str(lab_qemu), argv=argv, qmp_socket=str(vm.sock),
            ram=[mf.RamRecord(id="ram0", size=RAM, token=1)],
            vmstate=mf.VmstateRecord(token=mf.VMSTATE_TOKEN, size=memfd.size(vmstate)),
            was_running=True, stopped_at_ns=stopped_ns, saved_at_ns=saved_ns, qemu_version="11.1.3",
            ram_bytes_copied=0, **record_fields,
        )
        image = restore.write_rescue(record, [vm.ram_fd], vmstate, rescue_dir)
    finally:
        os.close(vmstate)
    return record, image


def run_update(*args: str, fault: str = "", skip: str = HOST_SKIP, binary=None,
               log_format: str = "auto", landing: tuple[str, ...] = LANDING_OK) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LUOAGENT_FAULT", None)
    if fault:
        env["LUOAGENT_FAULT"] = fault
    if skip:
        env["LUOAGENT_TEST_SKIP"] = skip
    if binary:
        env["LUOAGENT_QEMU"] = str(binary)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    mode = ["--test-mode"] if fault or skip else []
    return subprocess.run([sys.executable, "-m", "luoagent", "--log-format", log_format, *mode, "update", *landing, *args],
                          capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def assert_running_and_rising(vm: Vm) -> None:
    state = asyncio.run(_qemu_state(vm))
    assert state["status"] == "running", state
    # rollback undid the cpr-reboot set-up and dropped the vmstate fdset
    assert state["mode"] == "normal" and state["caps"].get("x-ignore-shared") is False, state
    assert state["fdsets"] == [], state
    if vm.ram_fd is not None:
        c1 = vm.counter()
        deadline = time.monotonic() + 5  # a loaded host may not schedule the vCPU for a while
        while vm.counter() <= c1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.counter() > c1, f"VM {vm.name}: guest counter is not rising after rollback"


def assert_never_stopped(vm: Vm) -> None:
    state = asyncio.run(_qemu_state(vm))
    assert state["status"] == "running", state
    assert state["migrate"] == {} or "status" not in state["migrate"], f"a migration ran: {state['migrate']}"
    assert state["mode"] == "normal" and state["fdsets"] == [], state


# ---- one reporting path: --log-format json leaves only JSON lines on stderr ------------------
@pytest.mark.parametrize("fault", ["", "after-quiesce"])
def test_log_format_json_writes_only_json_lines_on_stderr(vms, kernel_image, fault):
    a = vms("a")
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", "--dry-run", "--json",
                   fault=fault, log_format="json")
    assert r.returncode == (1 if fault else 0), r.stderr
    lines = r.stderr.splitlines()
    docs = []
    for line in lines:
        try:
            docs.append(json.loads(line))
        except ValueError:
            pytest.fail(f"stderr line is not JSON: {line!r}")
    assert all(isinstance(d, dict) and d.get("event") for d in docs), docs
    steps = {(d.get("step"), d.get("state")) for d in docs}
    assert ("quiesce", "done") in steps and ("rollback", "done") in steps, steps
    assert any("TEST MODE" in d.get("message", "") for d in docs)
    if fault:
        assert any("update failed at step after-quiesce" in d.get("message", "") for d in docs), docs
    assert_running_and_rising(a)


# ---- rollback after the VMs were stopped --------------------------------------------------
def test_fault_after_quiesce_resumes_every_vm(vms, kernel_image):
    a, b = vms("a"), vms("b")
    before = {vm.name: vm.counter() for vm in (a, b)}
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", "--vm", f"b={b.sock}",
                   fault="after-quiesce")
    print(r.stderr)
    assert r.returncode == 1, r.stderr
    assert "update failed at step after-quiesce" in r.stderr
    assert "VMs a, b resumed" in r.stderr
    # the VMs really were quiesced: both saves completed with a small vmstate
    assert "quiesce done" in r.stderr and r.stderr.count("vmstate ") >= 2
    assert "Traceback" not in r.stderr
    for vm in (a, b):
        assert vm.counter() > before[vm.name]
        assert_running_and_rising(vm)


def test_one_vm_failing_during_quiesce_resumes_both(vms, kernel_image):
    a, b = vms("a"), vms("b")
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", "--vm", f"b={b.sock}",
                   fault="quiesce:b")
    assert r.returncode == 1, r.stderr
    assert "at step quiesce (VM b)" in r.stderr, r.stderr
    for vm in (a, b):
        assert_running_and_rising(vm)


def test_reboot_syscall_failing_resumes_every_vm(vms, kernel_image):
    """No fault injected: the update runs to reboot(LINUX_REBOOT_CMD_KEXEC), which this
    kernel (no kexec support, no image) refuses for real."""
    a, b = vms("a"), vms("b")
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", "--vm", f"b={b.sock}", "--json")
    print(r.stderr)
    assert r.returncode == 1, r.stderr
    assert "update failed at step reboot" in r.stderr, r.stderr
    assert "VMs a, b resumed" in r.stderr
    for vm in (a, b):
        assert_running_and_rising(vm)


def test_dry_run_rolls_back_and_reports(vms, kernel_image):
    import json

    a = vms("a")
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"].startswith("dry-run") and doc["dry_run"] is True
    [v] = doc["vms"]
    assert v["name"] == "a" and v["was_running"] is True and v["ram_bytes"] == RAM
    assert 0 < v["vmstate_bytes"] < RAM // 100, v
    # what QEMU measured: the migrated RAM blocks (firmware, ROMs) total less than the guest's
    # 64 MiB block, so that block was not among them; the RAM pages it wrote bound what was copied
    assert v["no_guest_ram_block_in_stream"] is True and 0 < v["ram_blocks_in_stream_bytes"] < RAM, v
    assert 0 < v["ram_pages_written_bytes"] == v["guest_ram_bytes_copied_at_most"] < RAM // 100, v
    assert v["ram_pages_written_bytes"] <= v["vmstate_bytes"] and v["qemu_stream_bytes"] == v["vmstate_bytes"], v
    assert [p["phase"] for p in doc["phases"]] == [
        "preflight", "preserve-ram", "sync", "quiesce", "preserve-vmstate", "manifest", "rollback"]
    assert_running_and_rising(a)


def test_rollback_leaves_a_paused_vm_paused(vms, kernel_image):
    """The user paused b before the update: rollback resumes a, and only a."""
    a, b = vms("a"), vms("b")

    async def pause():
        async with await qmp_client.Qmp.connect(b.sock, timeout=30, process=b.proc) as q:
            await q.stop()

    asyncio.run(pause())
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", "--vm", f"b={b.sock}",
                   fault="after-quiesce")
    assert r.returncode == 1 and "at step after-quiesce" in r.stderr, r.stderr
    assert_running_and_rising(a)
    state = asyncio.run(_qemu_state(b))
    assert state["status"] in ("paused", "postmigrate"), state
    assert state["mode"] == "normal" and state["fdsets"] == [], state


# ---- bad input: clear message, nothing stopped --------------------------------------------
def test_missing_kernel_image(vms, tmp_path):
    a = vms("a")
    r = run_update("--kernel", str(tmp_path / "no-such-bzImage"), "--vm", f"a={a.sock}")
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert_never_stopped(a)


def test_corrupt_kernel_image(vms, tmp_path):
    a = vms("a")
    bad = tmp_path / "bzImage"
    bad.write_bytes(os.urandom(65536))
    r = run_update("--kernel", str(bad), "--vm", f"a={a.sock}")
    assert r.returncode != 0 and "not an x86 bzImage" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert_never_stopped(a)


@pytest.mark.parametrize("kind, message", [("private", "share=off"), ("anon", "memory-backend-ram"),
                                           ("memfd-backend", "memory-backend-memfd")])
def test_vm_with_unpreservable_ram(vms, kernel_image, kind, message):
    good, bad = vms("good"), vms("bad", kind)
    r = run_update("--kernel", str(kernel_image), "--vm", f"good={good.sock}", "--vm", f"bad={bad.sock}")
    assert r.returncode != 0, r.stderr
    assert "VM bad" in r.stderr and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert_never_stopped(good)
    assert_never_stopped(bad)


def test_unreachable_qmp_socket(vms, kernel_image, tmp_path):
    good = vms("good")
    r = run_update("--kernel", str(kernel_image), "--vm", f"good={good.sock}", "--vm", f"gone={tmp_path / 'none.sock'}")
    assert r.returncode != 0 and "VM gone" in r.stderr and "does not exist" in r.stderr, r.stderr
    # a socket file nobody listens on (QEMU died): connection refused
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    r = run_update("--kernel", str(kernel_image), "--vm", f"good={good.sock}", "--vm", f"dead={stale}")
    assert r.returncode != 0 and "VM dead" in r.stderr and "unreachable" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert_never_stopped(good)


def test_without_test_switches_the_host_says_what_is_missing(vms, kernel_image):
    """On this kernel (no LUO) a real update must stop at preflight with the reason."""
    a = vms("a")
    r = run_update("--kernel", str(kernel_image), "--vm", f"a={a.sock}", skip="")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "Live Update Orchestrator" in r.stderr or "liveupdate" in r.stderr, r.stderr
    assert_never_stopped(a)


def test_restore_on_a_host_without_luo_is_clear():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "luoagent", "restore"], capture_output=True, text=True, env=env,
                       timeout=60, cwd=REPO)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "Live Update Orchestrator" in r.stderr, r.stderr


# ---- a VM restore cannot bring back loses nothing: its rescue image loads in a plain QEMU ----
def test_rescue_image_is_a_cpr_reboot_checkpoint_a_plain_qemu_loads(vms, lab_qemu, tmp_path):
    """What restore writes when a VM cannot be restored (RAM files + vmstate + restore.json),
    produced from a real running guest, then loaded by `restore --from-rescue` (a plain QEMU
    with its RAM in the files) — the guest must continue, canary intact."""
    import signal

    from luoagent.workflows import restore

    a = vms("a")
    seed = 0x5EED
    memfd.write_pattern(a.ram_fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, seed)
    record, rescue_dir = checkpoint_into_rescue(a, lab_qemu, tmp_path / "rescue")
    at_stop = guest.read_state(a.ram_fd)
    meta = __import__("json").loads((rescue_dir / "restore.json").read_text())
    ram_file = Path(meta["ram_files"]["ram0"])
    assert ram_file.stat().st_size == RAM and (rescue_dir / "vmstate").stat().st_size == record.vmstate.size
    # from here on the RAM exists only in the rescue image's file
    os.close(a.ram_fd)
    a.ram_fd = None

    opts = restore.RestoreOptions(qemu=str(lab_qemu), vm_root=tmp_path / "vms", timeout=60)
    result = restore.restore_from_rescue(rescue_dir, opts)
    [v] = result["vms"]
    try:
        assert result["ok"] and v["status"] == "running", result
        fd = os.open(ram_file, os.O_RDONLY)
        try:
            c1 = guest.read_state(fd).counter
            time.sleep(0.5)
            c2 = guest.read_state(fd).counter
            assert c1 >= at_stop.counter and c2 > c1, (at_stop.counter, c1, c2)
            assert memfd.verify_pattern(fd, guest.CANARY_OFFSET, guest.CANARY_SIZE, seed)
        finally:
            os.close(fd)
        assert (tmp_path / "vms" / "a" / "vm.json").is_file()  # registered for `luoagent vm list`
    finally:
        if v.get("pid"):
            try:
                os.kill(v["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
