"""The LUO ABI: our numbers pinned, and proven equal to the kernel's real linux/liveupdate.h.

The real header comes from Debian's linux-libc-dev 7.x (downloaded through the lab's private apt
list when not cached); abi_check.c must compile against it and must fail when one fact changes."""

from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

import pytest

from luoagent._luo_shim import ffi, lib

CSRC = Path(__file__).resolve().parent.parent / "csrc"


# --- the numbers themselves (docs/facts.md, from the 7.2 header) ------------------------------
def test_ioctl_numbers_pinned():
    assert lib.LUO_IOCTL_TYPE == 0xBA
    assert lib.LUO_IOCTL_CREATE_SESSION == 0xBA00
    assert lib.LUO_IOCTL_RETRIEVE_SESSION == 0xBA01
    assert lib.LUO_IOCTL_PRESERVE_FD == 0xBA40
    assert lib.LUO_IOCTL_RETRIEVE_FD == 0xBA41
    assert lib.LUO_IOCTL_FINISH == 0xBA42
    assert lib.LUO_IOCTL_GET_NAME == 0xBA43


def test_struct_layouts_pinned():
    assert lib.LUO_SESSION_NAME_LENGTH == 64
    assert ffi.sizeof("struct luo_session_arg") == 72
    assert [ffi.offsetof("struct luo_session_arg", f) for f in ("size", "fd", "name")] == [0, 4, 8]
    assert ffi.sizeof("struct luo_fd_arg") == 16
    assert [ffi.offsetof("struct luo_fd_arg", f) for f in ("size", "fd", "token")] == [0, 4, 8]
    assert ffi.alignof("struct luo_fd_arg") == 8
    assert ffi.sizeof("struct luo_finish_arg") == 8
    assert ffi.offsetof("struct luo_finish_arg", "reserved") == 4
    assert ffi.sizeof("struct luo_get_name_arg") == 72
    assert ffi.offsetof("struct luo_get_name_arg", "name") == 8
    assert (lib.LUO_SESSION_ARG_SIZE, lib.LUO_FD_ARG_SIZE, lib.LUO_FINISH_ARG_SIZE,
            lib.LUO_GET_NAME_ARG_SIZE) == (72, 16, 8, 72)


def test_kexec_constants_exported():
    assert lib.KEXEC_FILE_UNLOAD == 1 and lib.KEXEC_FILE_NO_INITRAMFS == 4


def test_shim_returns_negative_errno_without_a_device():
    import errno
    import os

    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert lib.luo_create_session(fd, b"x") == -errno.ENOTTY
        assert lib.luo_finish(fd) == -errno.ENOTTY
    finally:
        os.close(fd)
    assert lib.luo_preserve_fd(-1, 0, 1) == -errno.EBADF
    # the C side refuses names the kernel could not terminate, before any ioctl
    assert lib.luo_create_session(-1, b"") == -errno.EINVAL
    assert lib.luo_create_session(-1, b"a" * 64) == -errno.EINVAL


# --- proof against the real header ------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_uapi(tmp_path_factory) -> Path:
    """usr/include of linux-libc-dev >= 7 (cached .deb, else fetched via the private apt list)."""
    from luoagent.lab import debian

    cached = sorted(glob.glob(str(debian.debs_dir() / "linux-libc-dev_[7-9].*_all.deb")))
    deb = Path(cached[-1]) if cached else debian.download_debs(["linux-libc-dev"])[0]
    version = debian.deb_field(deb, "Version")
    assert int(version.split(".")[0]) >= 7, f"{deb} is {version}; need linux-libc-dev >= 7 with LUO"
    root = debian.extract_deb(deb, tmp_path_factory.mktemp("libc-dev"))
    header = root / "usr/include/linux/liveupdate.h"
    assert header.is_file(), f"{deb} ({version}) has no linux/liveupdate.h"
    return root / "usr/include"


def compile_abi_check(uapi: Path, *defines: str) -> subprocess.CompletedProcess:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is required to check the ABI"
    return subprocess.run(
        [gcc, "-fsyntax-only", "-Wall", "-Werror", f"-I{uapi}", f"-I{CSRC}", *defines,
         str(CSRC / "abi_check.c")],
        capture_output=True,
        text=True,
    )


def test_abi_matches_real_kernel_header(kernel_uapi):
    proc = compile_abi_check(kernel_uapi)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "define, complaint",
    [
        ("-DLUO_CMD_FINISH=0x44", "LUO_CMD_FINISH"),
        ("-DLUO_CMD_CREATE_SESSION=0x02", "LUO_CMD_CREATE_SESSION"),
        ("-DLUO_IOCTL_TYPE=0xBB", "LUO_IOCTL_TYPE"),
        ("-DLUO_SESSION_NAME_LENGTH=65", "LUO_SESSION_NAME_LENGTH"),
    ],
)
def test_abi_check_fails_when_one_fact_differs(kernel_uapi, define, complaint):
    proc = compile_abi_check(kernel_uapi, define)
    assert proc.returncode != 0, f"abi_check.c compiled with {define}: the check does not bite"
    assert "static assertion failed" in proc.stderr and complaint in proc.stderr, proc.stderr


def test_shim_build_runs_the_check_when_the_header_is_there(kernel_uapi, tmp_path):
    """build_shim.py with LUOAGENT_KERNEL_HEADERS compiles abi_check.c into the shim."""
    import os
    import sys

    env = dict(os.environ, LUOAGENT_KERNEL_HEADERS=str(kernel_uapi))
    script = (
        "import sys; sys.path.insert(0, %r); import build_shim as b; "
        "b.ffibuilder.compile(tmpdir=%r)" % (str(CSRC), str(tmp_path))
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = list(tmp_path.rglob("_luo_shim*.so"))
    assert built, f"no shim built in {tmp_path}"
    check = subprocess.run(
        [sys.executable, "-c",
         "import importlib.util as u, sys; s=u.spec_from_file_location('luoagent._luo_shim', %r); "
         "m=u.module_from_spec(s); s.loader.exec_module(m); print(m.lib.LUO_ABI_CHECKED)" % str(built[0])],
        capture_output=True, text=True,
    )
    assert check.stdout.strip() == "1", check.stderr
