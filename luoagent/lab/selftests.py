"""Build the kernel's own LUO selftests (tools/testing/selftests/liveupdate) as static binaries
from the lab kernel's source package, and describe how the lab runner must run each one.

Nothing of their code lives in this repository: they are compiled from the same source tree as
the lab kernel, against its ``make headers`` output (O=/usr/include), at lab build time.

How they run (facts from the 7.2 sources; the runner in the lab VM relies on them):

* ``liveupdate`` — one process, no kexec: a kselftest harness suite that prints full KTAP
  (``TAP version 13``, ``1..N``, ``ok``/``not ok`` lines) and exits non-zero on any failure.
  It opens ``/dev/liveupdate`` itself and checks exclusive open, so nothing else (no agent, no
  stage-1 daemon of another test) may hold the device while it runs.
* ``luo_kexec_simple``, ``luo_multi_session``, ``luo_stress_sessions``, ``luo_stress_files`` —
  two-stage: run with ``-s 1``, then kexec (kexec_file_load, KHO), then run with ``-s 2`` in
  the new kernel (7.2 also accepts ``--stage N``; 7.3 only the short ``-s N``, so the specs
  use ``-s``). The program detects its stage from a private "state"
  session and fails if the requested stage does not match. Stage 1 preserves memfds, then
  forks a daemon (setsid, stdio closed) that keeps the session fds — and ``/dev/liveupdate`` —
  open until the kexec, and the parent exits 0. Consequently: run only ONE two-stage test per
  kexec hop, run ``liveupdate`` before stage 1 or after stage 2, and do not open
  ``/dev/liveupdate`` from the runner between stage 1 and the kexec. Their output is ``# ``
  diagnostic lines only (no KTAP plan); success is exit status 0 of each stage (stage 2 also
  prints a final "... PASSED" diagnostic). The stress tests create 2000 sessions / 500 files.

``SELFTESTS`` lists each with its argv per stage (``[[]]`` = single run, no kexec)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

from luoagent import log
from luoagent.errors import LabBuildError
from luoagent.lab.cache import Artifact, inputs_hash
from luoagent.report import Progress
from luoagent.lab.kernel import KernelBuild, build_kernel_info, compiler_identity, kernel_info

_log = log.get_logger(__name__)

SELFTEST_DIR = "tools/testing/selftests/liveupdate"
RECIPE = "selftests-recipe-2"

SELFTESTS: list[dict] = [
    {"name": "liveupdate", "stages": [[]], "kexec": False,
     "what": "/dev/liveupdate ioctl semantics: sessions, preserve, errors (KTAP, one run)"},
    {"name": "luo_kexec_simple", "stages": [["-s", "1"], ["-s", "2"]], "kexec": True,
     "what": "one memfd in one session survives a kexec with its content"},
    {"name": "luo_multi_session", "stages": [["-s", "1"], ["-s", "2"]], "kexec": True,
     "what": "empty and populated sessions, several memfds, all retrieved after kexec"},
    {"name": "luo_stress_sessions", "stages": [["-s", "1"], ["-s", "2"]], "kexec": True,
     "what": "2000 sessions across a kexec"},
    {"name": "luo_stress_files", "stages": [["-s", "1"], ["-s", "2"]], "kexec": True,
     "what": "500 memfds in one session across a kexec"},
]


def makefile_programs(makefile: Path) -> tuple[list[str], list[str]]:
    """(TEST_GEN_PROGS, TEST_GEN_PROGS_EXTENDED) named by the selftests Makefile."""
    try:
        text = makefile.read_text()
    except OSError as exc:
        raise LabBuildError(f"no LUO selftests in this kernel source ({makefile}: {exc.strerror})") from exc
    plain, extended = [], []
    for m in re.finditer(r"^TEST_GEN_PROGS(_EXTENDED)?\s*[+:]?=\s*(.+)$", text, re.M):
        (extended if m.group(1) else plain).extend(m.group(2).split())
    if not plain and not extended:
        raise LabBuildError(f"{makefile} names no test programs")
    return plain, extended


def specs_for(plain: list[str], extended: list[str]) -> list[dict]:
    """SELFTESTS entries for the programs a source tree builds; programs unknown to SELFTESTS
    are described by their Makefile role (TEST_GEN_PROGS single-run, _EXTENDED two-stage)."""
    known = {s["name"]: s for s in SELFTESTS}
    out = []
    for name in plain + extended:
        if name in known:
            out.append(dict(known[name]))
        elif name in plain:
            out.append({"name": name, "stages": [[]], "kexec": False, "what": "(not described)"})
        else:
            out.append({"name": name, "stages": [["-s", "1"], ["-s", "2"]], "kexec": True,
                        "what": "(not described; assumed two-stage like the other luo_* tests)"})
    return out


def is_static_elf(path: Path) -> bool:
    """True if ``path`` is a 64-bit ELF with no PT_INTERP (needs no dynamic loader in the VM)."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", ident, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", ident, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == 3:  # PT_INTERP
            return False
    return True


def _static_libc_present() -> bool:
    proc = subprocess.run(["gcc", "-print-file-name=libc.a"], capture_output=True, text=True)
    return proc.returncode == 0 and Path(proc.stdout.strip()).is_file()


def build_selftests(kernel: KernelBuild | Path | None = None, *, version: str = "7.2",
                    kernel_src: Path | None = None, progress: Progress | None = None) -> Path:
    """Directory of static LUO selftest binaries plus ``selftests.json`` (the specs for them).

    ``kernel`` is a KernelBuild or a bzImage produced by build_kernel() (its build.json names
    the source and headers); without it the lab kernel for ``version``/``kernel_src`` is built
    (or taken from the cache) first. Cached under ``selftests/<key>/``."""
    progress = progress or Progress("lab selftests")
    if kernel is None:
        kernel = build_kernel_info(version, kernel_src, progress)
    elif not isinstance(kernel, KernelBuild):
        kernel = kernel_info(Path(kernel))
    src = kernel.source / SELFTEST_DIR
    plain, extended = makefile_programs(src / "Makefile")
    headers = kernel.headers
    if not (headers / "linux/liveupdate.h").is_file():
        raise LabBuildError(
            f"{headers}/linux/liveupdate.h missing: the kernel build's `make headers` did not run "
            "or this kernel has no LUO uAPI; build the lab against a kernel >= 6.19 with LUO (`luoagent lab build --kernel-src DIR`)"
        )
    key = inputs_hash(RECIPE, kernel.identity, src, headers / "linux/liveupdate.h", compiler_identity())
    art = Artifact("selftests", key)
    with art.lock():
        if art.exists():
            progress.done(f"selftests cached: {art.path}")
            return art.path
        if not _static_libc_present():
            raise LabBuildError("static glibc (libc.a) not found: install libc6-dev to link the selftests statically")
        progress.phase("build LUO selftests", note=", ".join(plain + extended))
        before = {p.name for p in src.iterdir()}
        try:
            with art.build() as tmp:
                cmd = ["make", "-C", str(src), f"OUTPUT={tmp}", f"KHDR_INCLUDES=-isystem {headers}",
                       "LDFLAGS=-static"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                (tmp / "build.log").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
                if proc.returncode != 0:
                    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                    raise LabBuildError(f"building the LUO selftests failed (make exit {proc.returncode}):\n{tail}")
                for name in plain + extended:
                    binary = tmp / name
                    if not binary.is_file():
                        raise LabBuildError(f"selftest {name} was not built (see {art.path}/build.log)")
                    if not is_static_elf(binary):
                        raise LabBuildError(f"selftest {name} is dynamically linked despite LDFLAGS=-static")
                for leftover in sorted(tmp.rglob("*"), reverse=True):  # objects, then emptied dirs
                    if leftover.is_file() and leftover.suffix in (".o", ".d"):
                        leftover.unlink()
                    elif leftover.is_dir() and not any(leftover.iterdir()):
                        leftover.rmdir()
                (tmp / "selftests.json").write_text(json.dumps(specs_for(plain, extended), indent=1) + "\n")
        finally:
            # the Makefile compiles the test objects in the source dir itself; leave it as found
            for p in src.iterdir():
                if p.name not in before and p.suffix in (".o", ".d"):
                    p.unlink()
    progress.done(f"selftests built: {art.path}")
    return art.path


def load_specs(selftests_dir: Path) -> list[dict]:
    """The selftests.json written next to the binaries by build_selftests()."""
    try:
        return json.loads((Path(selftests_dir) / "selftests.json").read_text())
    except (OSError, ValueError) as exc:
        raise LabBuildError(f"{selftests_dir}/selftests.json missing or unreadable: {exc}") from exc


def install_into(selftests_dir: Path, dest: Path) -> list[Path]:
    """Copy the binaries and selftests.json into ``dest`` (e.g. the rootfs' /opt/luo-selftests)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for spec in load_specs(selftests_dir):
        copied.append(Path(shutil.copy2(Path(selftests_dir) / spec["name"], dest / spec["name"])))
    shutil.copy2(Path(selftests_dir) / "selftests.json", dest / "selftests.json")
    return copied
