"""luoagent.luo without an LUO kernel: name/token validation, errno -> exception mapping, and
what happens on this host (no /dev/liveupdate, or a device that is not LUO)."""

from __future__ import annotations

import errno as E
import os
import subprocess
import sys

import pytest

from luoagent import errors
from luoagent.adapters import procfs
from luoagent.luo import DEVICE, LiveUpdate, Session, luo_error, validate_name, validate_token


# --- names --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "luoagent", "luoagent/vm/a", "x" * 63, "é" * 31 + "x"])
def test_valid_names(name):
    assert validate_name(name) == name.encode()


@pytest.mark.parametrize(
    "name, says",
    [
        ("", "empty"),
        ("a\0b", "NUL"),
        ("x" * 64, "64 bytes"),
        ("é" * 32, "64 bytes"),  # 32 characters but 64 bytes of UTF-8
        (b"bytes", "str"),
        (None, "str"),
    ],
)
def test_invalid_names(name, says):
    with pytest.raises(errors.InvalidName, match=says):
        validate_name(name)


# --- tokens -------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [0, 1, 0x1000, 2**63, 2**64 - 1])
def test_valid_tokens(token):
    assert validate_token(token) == token


@pytest.mark.parametrize("token", [-1, 2**64, 1.0, "1", None, True])
def test_invalid_tokens(token):
    with pytest.raises(errors.InvalidToken):
        validate_token(token)


def test_validation_happens_before_any_ioctl():
    """A Session over /dev/null: validation errors come first, the ioctl (ENOTTY) second."""
    fd = os.open("/dev/null", os.O_RDWR)
    s = Session(fd, "s", incoming=False)
    with s:
        with pytest.raises(errors.InvalidToken):
            s.preserve(0, -5)
        with pytest.raises(errors.UsageError, match="file descriptor"):
            s.preserve(-1, 5)
        with pytest.raises(errors.LuoIoctlError) as info:
            s.preserve(0, 5)
        assert info.value.errno == E.ENOTTY
    assert s.closed
    with pytest.raises(errors.UsageError, match="closed"):
        s.fileno()
    lu = LiveUpdate(os.open("/dev/null", os.O_RDWR), "/dev/null")
    with lu:
        with pytest.raises(errors.InvalidName):
            lu.create_session("")
        with pytest.raises(errors.LuoIoctlError, match="ENOTTY"):
            lu.create_session("fine")


# --- errno mapping: every errno of docs/facts.md's LUO list, plus the header's generic ones -----
CASES = [
    # (op, errno, incoming, expected class, words the message must contain)
    ("open", E.ENOENT, None, errors.LuoUnavailable, ["liveupdate=on", "CONFIG_LIVEUPDATE"]),
    ("open", E.ENODEV, None, errors.LuoUnavailable, ["kho=on"]),
    ("open", E.EBUSY, None, errors.LuoBusy, ["pid 4242", "qemu-agent --hold"]),
    ("open", E.EIO, None, errors.LuoStateCorrupt, ["deserialized", "dmesg"]),
    ("open", E.EACCES, None, errors.LuoError, ["root"]),
    ("create_session", E.EEXIST, False, errors.SessionExists, ["already exists"]),
    ("create_session", E.EINVAL, False, errors.LuoIoctlError, ["name"]),
    ("retrieve_session", E.ENOENT, True, errors.SessionNotFound, ["kexec", "this boot"]),
    ("retrieve_session", E.EINVAL, True, errors.SessionAlreadyRetrieved, ["already retrieved"]),
    ("preserve", E.ENOENT, False, errors.NotPreservable, ["memfd", "HUGETLB"]),
    ("preserve", E.EINVAL, False, errors.NotPreservable, ["memfd"]),
    ("preserve", E.EINVAL, True, errors.LuoIoctlError, ["retrieved after kexec"]),
    ("preserve", E.EOPNOTSUPP, False, errors.NotPreservable, ["seal"]),
    ("preserve", E.EFBIG, False, errors.NotPreservable, ["too large"]),
    ("preserve", E.EEXIST, False, errors.TokenExists, ["token"]),
    ("preserve", E.EBUSY, False, errors.FileAlreadyPreserved, ["already preserved"]),
    ("preserve", E.EBADF, False, errors.LuoIoctlError, ["not open"]),
    ("retrieve", E.ENOENT, True, errors.TokenNotFound, ["token", "this boot"]),
    ("retrieve", E.EIO, True, errors.LuoIoctlError, ["not retried"]),
    ("retrieve", E.EINVAL, False, errors.LuoIoctlError, ["created in this boot"]),
    ("finish", E.EBUSY, True, errors.SessionFinishFailed, ["retry"]),
    ("finish", E.EINVAL, False, errors.SessionFinishFailed, ["retrieved after kexec"]),
    ("get_name", E.ENOTTY, True, errors.LuoIoctlError, ["older or different"]),
    ("create_session", E.E2BIG, False, errors.LuoIoctlError, ["older than"]),
    ("create_session", E.ENOMEM, False, errors.LuoIoctlError, ["memory"]),
    ("create_session", E.ENOSPC, False, errors.LuoIoctlError, ["room"]),
    ("preserve", E.EOVERFLOW, False, errors.LuoIoctlError, ["overflow"]),
    ("create_session", E.EOPNOTSUPP, False, errors.LuoIoctlError, ["not support"]),
]


@pytest.mark.parametrize("op, err, incoming, cls, words", CASES, ids=lambda v: E.errorcode.get(v, None) if isinstance(v, int) and not isinstance(v, bool) else None)
def test_errno_mapping(op, err, incoming, cls, words):
    exc = luo_error(
        op, err, name="luoagent/vm/a", token=7, fd=9, incoming=incoming,
        holders=lambda: [procfs.Holder(4242, 3, "qemu-agent --hold")],
    )
    assert type(exc) is cls
    assert isinstance(exc, errors.LuoError) and exc.errno == err
    msg = str(exc)
    assert E.errorcode[err] in msg
    for word in words:
        assert word in msg, f"{word!r} missing from: {msg}"


def test_busy_without_visible_holder_says_so():
    msg = str(luo_error("open", E.EBUSY, holders=lambda: []))
    assert "no holder visible" in msg


def test_messages_name_the_subject():
    assert "'luoagent/vm/a'" in str(luo_error("create_session", E.EEXIST, name="luoagent/vm/a"))
    assert "token 77" in str(luo_error("retrieve", E.ENOENT, name="s", token=77, incoming=True))
    assert "fd 12" in str(luo_error("preserve", E.ENOENT, name="s", token=1, fd=12, incoming=False))


# --- this host --------------------------------------------------------------------------------
def test_open_missing_device_is_unavailable(tmp_path):
    with pytest.raises(errors.LuoUnavailable) as info:
        LiveUpdate.open(str(tmp_path / "liveupdate"))
    assert "liveupdate=on" in str(info.value) and str(tmp_path) in str(info.value)


def test_open_on_this_host():
    if not os.path.exists(DEVICE):  # e.g. this 6.18 development host
        with pytest.raises(errors.LuoUnavailable):
            LiveUpdate.open()
        return
    try:
        LiveUpdate.open().close()
    except errors.LuoBusy as exc:  # someone else holds it; the message must say who
        assert "pid" in str(exc) or "no holder visible" in str(exc)


def test_holders_finds_this_process(tmp_path):
    path = tmp_path / "held"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    try:
        found = procfs.holders(str(path))
    finally:
        os.close(fd)
    assert any(h.pid == os.getpid() and h.fd == fd and "python" in h.cmdline for h in found)


def test_argv_keeps_arguments_apart():
    # '' and 'a b' are what joining with spaces would lose
    args = [sys.executable, "-c", "import time; print(flush=True); time.sleep(30)", "", "a b"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # its exec has finished: mid-exec the kernel shows no arguments yet
        assert procfs.argv(proc.pid) == args
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with pytest.raises(OSError):
        procfs.argv(proc.pid)  # reaped: gone from /proc


# --- kexec adapter (never reboots: only loads that must fail, and read-only queries) ----------
def test_kexec_load_missing_image(tmp_path):
    from luoagent.adapters import kexec

    with pytest.raises(errors.KexecImageError, match="cannot open kernel image"):
        kexec.load(tmp_path / "bzImage")
    (tmp_path / "bzImage").write_bytes(b"x")
    with pytest.raises(errors.KexecImageError, match="cannot open initrd"):
        kexec.load(tmp_path / "bzImage", tmp_path / "initrd.img", "console=ttyS0")


def test_kexec_load_rejects_garbage_image(tmp_path):
    """A random blob is never a kernel: the kernel refuses it (ENOEXEC) or cannot load at all
    (ENOSYS without CONFIG_KEXEC_FILE, EPERM without privilege); the reason is in the message."""
    from luoagent.adapters import kexec

    blob = tmp_path / "garbage"
    blob.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(errors.KexecImageError) as info:
        kexec.load(blob, None, "console=ttyS0")
    msg = str(info.value)
    assert any(name in msg for name in ("ENOEXEC", "ENOSYS", "EPERM", "EINVAL", "EKEYREJECTED")), msg
    assert str(blob) in msg


def test_kexec_queries():
    from luoagent.adapters import kexec

    assert kexec.current_cmdline() == open("/proc/cmdline").read().strip()
    assert isinstance(kexec.loaded(), bool)
