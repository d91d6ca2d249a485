"""Unit tier for the landing-side preflight (workflows/landing.py) and the kernel-image reader
(adapters/kimage.py): real compressed bzImage payloads built here, real memfds, no QEMU."""

from __future__ import annotations

import gzip
import lzma
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from luoagent import memfd
from luoagent.adapters import kimage
from luoagent.errors import PreflightRefused
from luoagent.workflows import landing

GOOD_CONFIG = "CONFIG_KEXEC_HANDOVER=y\nCONFIG_LIVEUPDATE=y\nCONFIG_LIVEUPDATE_MEMFD=y\n# CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT is not set\n"
ABI = {"luo": "luo-v5", "memfd": "memfd-v2", "kho": "kho-v4"}
IDENTITY = ("7.2.13", "#1 SMP PREEMPT Tue Dec  1 14:13:48 UTC 2026")


def make_bzimage(path: Path, version: str, *, config: str | None = GOOD_CONFIG, abi: dict | None = None,
                 compress: str = "xz") -> Path:
    """An x86 bzImage as the boot protocol lays it out: setup sectors with the header (version
    string pointer at 0x20E, payload offset/length at 0x248/0x24C), then a compressed
    "vmlinux" holding an IKCONFIG blob and ABI strings the way the kernel stores them."""
    body = b"\x00" * 4096 + b"luo: LUO state is incompatible\x00"
    for s in (ABI if abi is None else abi).values():
        body += s.encode() + b"\x00" + b"\x00" * 13  # NUL-terminated, padded like .rodata
    if config is not None:
        body += b"IKCFG_ST" + gzip.compress(config.encode()) + b"IKCFG_ED"
    body += os.urandom(2048)
    payload = lzma.compress(body, format=lzma.FORMAT_XZ) if compress == "xz" else (
        gzip.compress(body) if compress == "gzip" else b"\x28\xb5\x2f\xfd" + body)
    setup_sects = 4
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = (0x20F).to_bytes(2, "little")
    head[0x248:0x24C] = (64).to_bytes(4, "little")
    head[0x24C:0x250] = len(payload).to_bytes(4, "little")
    vstr = version.encode() + b"\x00"
    head[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    head[0x400:0x400 + len(vstr)] = vstr
    path.write_bytes(bytes(head) + b"\x00" * 64 + payload)
    return path


def header(identity=IDENTITY) -> str:
    return f"{identity[0]} (root@vm) {identity[1]}"


# ---- kimage ----------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", ["xz", "gzip"])
def test_image_config_and_abi_strings_are_read_from_the_payload(tmp_path, compress):
    img = kimage.inspect(make_bzimage(tmp_path / "bzImage", header(), compress=compress))
    assert img.problem == "" and img.compression == compress
    assert img.abi == ABI
    assert img.config["LIVEUPDATE_MEMFD"] == "y" and img.config["KEXEC_HANDOVER_ENABLE_DEFAULT"] == "n"


def test_abi_strings_need_a_word_boundary_digits_and_a_nul():
    blob = (b"\x00xluo-v9\x00 luo-v\x00 luo-v7x\x00 _kho-v1\x00 luo-v5\x00"
            b" kho-v4\x00 memfd-v2\x00 memfd-v3\x00")
    img = kimage.read_vmlinux_facts(blob, Path("vmlinux"))
    assert img.abi == {"luo": "luo-v5", "kho": "kho-v4"}
    assert img.ambiguous == {"memfd": ["memfd-v2", "memfd-v3"]}


def test_image_with_unreadable_payload_says_why(tmp_path):
    img = kimage.inspect(make_bzimage(tmp_path / "bzImage", header(), compress="zstd"))
    assert "zstd" in img.problem and img.config is None and img.abi == {}


def test_config_beside_the_image(tmp_path):
    k = make_bzimage(tmp_path / "vmlinuz-7.3.4", "7.3.4 (u@h) #1", config=None)
    (tmp_path / "config-7.3.4").write_text(GOOD_CONFIG)
    v = landing.Verdict()
    cfg = landing.check_kernel(k, "7.3.4 (u@h) #1", make_bzimage(tmp_path / "run", header()), False, v,
                               identity=IDENTITY)
    assert cfg["LIVEUPDATE"] == "y" and v.problems == [], v
    assert any("config-7.3.4" in n for n in v.notes)


# ---- kernel checks ---------------------------------------------------------------------------
def test_same_abi_different_release_passes(tmp_path):
    run = make_bzimage(tmp_path / "run", header())
    new = make_bzimage(tmp_path / "new", "7.3.4 (root@vm) #1 SMP PREEMPT")
    v = landing.Verdict()
    landing.check_kernel(new, "7.3.4 (root@vm) #1 SMP PREEMPT", run, False, v, identity=IDENTITY)
    assert v.problems == [] and any("LUO ABI identical: luo-v5, memfd-v2, kho-v4" in n for n in v.notes), v


def test_abi_mismatch_is_refused_even_with_the_override(tmp_path):
    run = make_bzimage(tmp_path / "run", header())
    new = make_bzimage(tmp_path / "new", "7.4.0 (u@h) #1", abi={**ABI, "memfd": "memfd-v3"})
    for override in (False, True):
        v = landing.Verdict()
        landing.check_kernel(new, "7.4.0 (u@h) #1", run, override, v, identity=IDENTITY)
        assert len(v.problems) == 1 and "LUO ABI mismatch" in v.problems[0], v
        assert "memfd-v2" in v.problems[0] and "memfd-v3" in v.problems[0]


def test_target_without_the_memfd_handler_is_a_mismatch(tmp_path):
    run = make_bzimage(tmp_path / "run", header())
    new = make_bzimage(tmp_path / "new", "7.4.0 (u@h) #1", abi={"luo": "luo-v5", "kho": "kho-v4"})
    v = landing.Verdict()
    landing.check_kernel(new, "7.4.0 (u@h) #1", run, False, v, identity=IDENTITY)
    assert any("no memfd-vN at all" in p for p in v.problems), v


def test_unknown_running_abi_is_refused_unless_overridden(tmp_path):
    new = make_bzimage(tmp_path / "new", "7.3.4 (u@h) #1")
    not_running = make_bzimage(tmp_path / "other", "7.1.0 (u@h) #9")
    for running_image in (tmp_path / "absent", not_running):
        v = landing.Verdict()
        landing.check_kernel(new, "7.3.4 (u@h) #1", running_image, False, v, identity=IDENTITY)
        assert len(v.problems) == 1 and "--running-kernel" in v.problems[0] and "--allow-unverified-kernel" in v.problems[0], v
        v = landing.Verdict()
        landing.check_kernel(new, "7.3.4 (u@h) #1", running_image, True, v, identity=IDENTITY)
        assert v.problems == [] and any(n.startswith("UNVERIFIED") for n in v.notes), v


def test_target_lacking_luo_options_is_refused(tmp_path):
    run = make_bzimage(tmp_path / "run", header())
    new = make_bzimage(tmp_path / "new", "7.3.4 (u@h) #1",
                       config="CONFIG_KEXEC_HANDOVER=y\n# CONFIG_LIVEUPDATE is not set\n")
    v = landing.Verdict()
    landing.check_kernel(new, "7.3.4 (u@h) #1", run, True, v, identity=IDENTITY)
    [p] = v.problems
    assert "CONFIG_LIVEUPDATE=y (has n)" in p and "CONFIG_LIVEUPDATE_MEMFD=y (has unset)" in p


def test_target_without_any_config_is_refused_unless_overridden(tmp_path):
    run = make_bzimage(tmp_path / "run", header())
    new = make_bzimage(tmp_path / "new", "7.3.4 (u@h) #1", config=None)
    v = landing.Verdict()
    assert landing.check_kernel(new, "7.3.4 (u@h) #1", run, False, v, identity=IDENTITY) is None
    assert any("cannot read the configuration" in p and "config-7.3.4" in p for p in v.problems), v


def test_running_build_is_recognised_by_release_and_build_stamp():
    assert landing.is_running_build(header(), IDENTITY)
    assert not landing.is_running_build("7.2.13 (root@vm) #2 SMP PREEMPT Wed", IDENTITY)
    assert not landing.is_running_build("7.2.12 (root@vm) " + IDENTITY[1], IDENTITY)
    assert not landing.is_running_build("", IDENTITY)


# ---- command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("cmdline, config, ok", [
    ("console=ttyS0 liveupdate=on kho=on", {}, True),
    ("liveupdate=1 kho=y", {}, True),
    ("liveupdate=on", {"KEXEC_HANDOVER_ENABLE_DEFAULT": "y"}, True),
    ("liveupdate=on", {}, False),                       # KHO not on by default in this image
    ("liveupdate=on kho=on kho=off", {}, False),        # the last one wins
    ("kho=on", {}, False),
    ("liveupdate=off kho=on", {}, False),
    ("liveupdate kho=on", {}, False),
    ("liveupdate=on kho=off", {"KEXEC_HANDOVER_ENABLE_DEFAULT": "y"}, False),
])
def test_new_cmdline_must_keep_liveupdate_and_kho(cmdline, config, ok):
    v = landing.Verdict()
    landing.check_cmdline(cmdline, config, v)
    assert (v.problems == []) is ok, v


# ---- VM argv ---------------------------------------------------------------------------------
RAM_OBJ = ["-object", "memory-backend-file,id=ram0,size=64,mem-path=/proc/self/fd/3,share=on",
           "-machine", "memory-backend=ram0"]
MOUNTS = [("/run", "tmpfs"), ("/dev/shm", "tmpfs"), ("/", "ext4")]


def test_clean_argv_has_no_problems():
    argv = ["-machine", "pc", "-kernel", "/lab/guest.elf", "-serial", "file:/run/x/serial.log",
            "-pidfile", "/run/x/pid", "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
            "-drive", "file=/var/lib/vm/disk.img,if=virtio,format=raw",
            "-drive", "file=nbd://storage:10809/vm0,if=virtio", *RAM_OBJ]
    assert landing.argv_problems(argv, ["ram0"], MOUNTS) == []


@pytest.mark.parametrize("extra, needle", [
    (["-netdev", "tap,id=n0,fd=7"], "fd=7"),
    (["-netdev", "tap,id=n0,fds=7:8,vhostfds=9:10"], "fds=7:8"),
    (["-chardev", "socket,id=c0,fd=5"], "fd=5"),
    (["-add-fd", "fd=4,set=2"], "-add-fd"),
    (["-drive", "file=/dev/fdset/2,if=virtio"], "/dev/fdset/2"),
    (["-kernel", "guest.elf"], "relative path 'guest.elf'"),
    (["-drive", "file=disk.img,if=virtio"], "relative path 'disk.img'"),
    (["-drive", "file=/dev/shm/disk.img,if=virtio"], "on tmpfs"),
    (["-kernel", "/run/k/bzImage"], "on tmpfs"),
    (["-blockdev", "driver=file,node-name=f,filename=/run/d.img"], "on tmpfs"),
])
def test_uncrossable_argv_is_named(extra, needle):
    problems = landing.argv_problems(["-machine", "pc", *extra, *RAM_OBJ], ["ram0"], MOUNTS)
    assert len(problems) == 1 and needle in problems[0], problems


def test_argv_without_the_ram_object_cannot_be_rebuilt():
    problems = landing.argv_problems(["-m", "64"], ["ram0"], MOUNTS)
    assert len(problems) == 1 and "restore could not rebuild" in problems[0] and "ram0" in problems[0]


@pytest.mark.parametrize("argv, pinned, before", [
    (["-machine", "pc", *RAM_OBJ], ["-machine", "pc-i440fx-11.1"], "pc"),
    (["-M", "type=pc,accel=tcg", *RAM_OBJ], ["-M", "type=pc-i440fx-11.1,accel=tcg"], "pc"),
    (["-m", "64"], ["-machine", "type=pc-i440fx-11.1", "-m", "64"], "(default)"),
])
def test_machine_type_is_pinned(argv, pinned, before):
    out, old = landing.pin_machine(argv, "pc-i440fx-11.1")
    assert out[:len(pinned)] == pinned and old == before
    assert landing.machine_type(out)[2] == "pc-i440fx-11.1"


# ---- losses ----------------------------------------------------------------------------------
def test_every_qemu_and_vm_not_carried_must_be_named():
    me = os.getpid()  # a live pid to stand for a recorded VM's QEMU
    left = landing.left_behind({100}, {"a"}, [("a", 100), ("b", me), ("dead", 2 ** 22 + 7)],
                               [(100, "a"), (200, "web"), (300, "")])
    assert [(x.name, x.what) for x in left] == [("b", "VM in the VM root"), ("web", "QEMU process"),
                                                ("pid 300", "QEMU process")]
    v = landing.Verdict()
    landing.check_losses(left, ["b", "300"], v)
    [p] = v.problems
    assert "web (pid 200)" in p and "--allow-loss NAME" in p and "pid 300" not in p
    v = landing.Verdict()
    landing.check_losses(left, ["b", "web", "pid 300"], v)
    assert v.problems == [] and len(v.notes) == 3


# ---- headroom --------------------------------------------------------------------------------
def test_headroom_counts_the_holes_of_each_ram_memfd():
    size = 64 << 20
    fd = memfd.create("luoagent-test-headroom", size)
    try:
        os.pwrite(fd, b"x" * (16 << 20), 0)  # 16 MiB backed, 48 MiB of holes
        w = SimpleNamespace(name="a", target=SimpleNamespace(pid=os.getpid()),
                            backends=[SimpleNamespace(qemu_fd=fd, size=size)])
        assert landing.hole_bytes(os.getpid(), fd, size) == 48 << 20
        v = landing.Verdict()
        landing.check_headroom([w], v, available=40 << 20)
        [p] = v.problems
        assert "48 MiB" in p and "MemAvailable is 40 MiB" in p
        v = landing.Verdict()
        landing.check_headroom([w], v, available=64 << 20)
        assert v.problems == []
    finally:
        os.close(fd)


def test_refusal_lists_every_problem():
    v = landing.Verdict(problems=["one", "two"])
    with pytest.raises(PreflightRefused) as exc:
        landing.raise_if_refused(v)
    assert "2 problems" in str(exc.value) and "  - one\n  - two" in str(exc.value)
    assert exc.value.step == "preflight" and exc.value.exit_code == 1
