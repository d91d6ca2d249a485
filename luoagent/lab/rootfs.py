"""The lab's Debian root filesystems: cached trees (debootstrap + QEMU 11.1) and their ext4 images.

Two flavours: trixie with the lab's own init as PID 1 (default), and sid with systemd 262 as
PID 1; also the per-run "run disk" (agent code, shim, kernel, parameters) built in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from luoagent.report import Progress
from luoagent.errors import LabBuildError
from luoagent.lab import cache, debian, resources

SUITE = "trixie"
PACKAGE_ROOT = resources.PACKAGE_DIR  # .../luoagent
RECIPE_DIR = resources.VM_IMAGES
INIT_SOURCE = resources.INIT_SCRIPT
#: where the init lives inside the rootfs image (the kernel's init= points here)
INIT_PATH = "/sbin/luoagent-lab-init"
#: mount point of the run disk inside the VM (created in the tree)
RUN_MOUNT = "/lab"
#: bump to force a rebuild of every tree when the build steps below change meaning
TREE_RECIPE_VERSION = "1"
#: the systemd flavour: where its stage launcher and unit live inside the image
SYSTEMD_STAGE_PATH = "/usr/lib/luoagent-lab/stage"
SYSTEMD_STAGE_UNIT = "luoagent-lab-stage.service"
#: the systemd flavour's unit that mounts the run disk on /lab early (before local-fs.target)
SYSTEMD_RUN_DISK_UNIT = "luoagent-lab-run-disk.service"
#: units a lab boot never needs; masked (-> /dev/null) in the image so systemd boots fast. The
#: serial getty would fight the runner for ttyS0; logins, timers, network, kernel modules (no
#: kmod here), first-boot and catalog work only cost boot time under TCG. journald, sysusers,
#: tmpfiles, sysctl and remount-fs stay: a host has them.
SYSTEMD_MASKED = (
    "getty@tty1.service", "serial-getty@ttyS0.service", "getty.target", "autovt@.service",
    "systemd-logind.service", "systemd-logind-varlink.socket", "systemd-user-sessions.service",
    "timers.target", "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
    "e2scrub_all.timer", "fstrim.timer", "systemd-tmpfiles-clean.timer", "man-db.timer",
    "systemd-networkd.service", "systemd-networkd.socket", "systemd-networkd-wait-online.service",
    "systemd-networkd-varlink.socket", "systemd-networkd-varlink-metrics.socket",
    "systemd-resolved.service", "systemd-timesyncd.service", "systemd-hostnamed.socket",
    "modprobe@.service", "kmod-static-nodes.service", "systemd-firstboot.service",
    "systemd-hwdb-update.service", "ldconfig.service", "systemd-journal-catalog-update.service",
    "systemd-machine-id-commit.service", "systemd-update-done.service", "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service", "systemd-pstore.service", "systemd-random-seed.service",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-hibernate-clear.service",
    "systemd-ask-password-wall.path", "systemd-ask-password-console.path", "systemd-ask-password.socket",
    "systemd-creds.socket", "systemd-factory-reset.socket", "systemd-mute-console.socket",
    "systemd-sysext.socket", "systemd-sysinstall.socket", "sys-fs-fuse-connections.mount",
    "sys-kernel-config.mount", "sys-kernel-tracing.mount", "dev-mqueue.mount",
)


@dataclass(frozen=True)
class Flavour:
    """How a lab rootfs is built and booted: its Debian suite, recipe files and PID 1."""
    name: str
    suite: str
    recipe: str              # recipe file prefix in vm-images/ ("rootfs" -> rootfs-packages.txt ...)
    backports: str | None    # suite the *-backports.txt packages come from (None: no such step)
    init: str                # the kernel's init=


FLAVOURS = {
    "custom-init": Flavour("custom-init", SUITE, "rootfs", f"{SUITE}-backports", INIT_PATH),
    "systemd": Flavour("systemd", "sid", "rootfs-systemd", None, "/lib/systemd/systemd"),
}
DEFAULT_FLAVOUR = "custom-init"


def flavour(name: str | None) -> Flavour:
    if name is None:
        return FLAVOURS[DEFAULT_FLAVOUR]
    try:
        return FLAVOURS[name]
    except KeyError:
        raise LabBuildError(f"unknown lab flavour {name!r}; known: {', '.join(FLAVOURS)}") from None


@dataclass(frozen=True)
class Rootfs:
    tree: Path          # the unpacked trixie tree (host QEMU runs from here too)
    image: Path         # ext4 image of the tree + init (never written by runs: -snapshot)
    python_tag: str     # the tree's extension suffix, e.g. ".cpython-313-x86_64-linux-gnu.so"
    key: str


def _recipe_lines(name: str) -> list[str]:
    path = RECIPE_DIR / name
    if not path.is_file():
        raise LabBuildError(
            f"rootfs recipe file {path} is missing; the lab builds from a luoagent source checkout "
            f"(run from the repository, e.g. `pip install -e .`)"
        )
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def tree_key(fl: Flavour | None = None) -> str:
    fl = fl or flavour(None)
    if fl.name == DEFAULT_FLAVOUR:  # unchanged inputs: the trixie tree already cached stays valid
        return cache.inputs_hash(
            TREE_RECIPE_VERSION, SUITE,
            RECIPE_DIR / "rootfs-packages.txt", RECIPE_DIR / "rootfs-apt.txt",
            RECIPE_DIR / "rootfs-backports.txt",
            RECIPE_DIR / "rootfs-wheels.txt",
        )
    return cache.inputs_hash(
        TREE_RECIPE_VERSION, fl.name, fl.suite,
        RECIPE_DIR / f"{fl.recipe}-packages.txt", RECIPE_DIR / f"{fl.recipe}-apt.txt",
        RECIPE_DIR / "rootfs-wheels.txt",
    )


def _run(argv: list[str], log: Path, what: str, env: dict | None = None, timeout: float = 1800) -> str:
    """Run a build command, appending its output to ``log``; on failure show the log's tail."""
    with open(log, "ab") as logf:
        logf.write(("\n$ " + " ".join(argv) + "\n").encode())
        logf.flush()
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=env, timeout=timeout)
        except FileNotFoundError as exc:
            raise LabBuildError(f"{what}: {argv[0]} not found; install it (apt-get install "
                                f"{ {'debootstrap': 'debootstrap', 'mke2fs': 'e2fsprogs'}.get(argv[0], argv[0]) })") from exc
        except subprocess.TimeoutExpired as exc:
            raise LabBuildError(f"{what}: timed out after {timeout:.0f}s; log: {log}") from exc
        logf.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.decode(errors="replace").splitlines()[-25:])
        raise LabBuildError(f"{what} failed (exit {proc.returncode}); full log: {log}\n{tail}")
    return proc.stdout.decode(errors="replace")


def _chroot(tree: Path, script: str, log: Path, what: str) -> str:
    # A private mount namespace: /proc and /dev mounts vanish with the process, never leak.
    inner = (
        f"mount -t proc proc {tree}/proc && mount --rbind /dev {tree}/dev && "
        f"exec chroot {tree} /bin/sh -ec {_shq(script)}"
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8",
               PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    return _run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", inner], log, what, env=env)


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise LabBuildError(f"{what} needs root (debootstrap and chroot); run as root")


def build_tree(progress: Progress | None = None, fl: Flavour | None = None) -> Path:
    """Return the cached tree of flavour ``fl`` (default: trixie), building it if absent."""
    progress = progress or Progress(quiet=True)
    fl = fl or flavour(None)
    art = cache.Artifact("rootfs-tree", tree_key(fl))
    if (art.path / "tree" / "usr/bin/qemu-system-x86_64").exists():
        return art.path / "tree"
    _require_root("building the lab rootfs")
    with art.lock():
        if (art.path / "tree" / "usr/bin/qemu-system-x86_64").exists():
            return art.path / "tree"
        cache.require_space(art.kind_dir, 2_000_000_000, "the lab rootfs tree")
        mirror = debian.mirror()
        with art.build(replace=True) as tmp:
            tree = tmp / "tree"
            log = tmp / "build.log"
            packages = _recipe_lines(f"{fl.recipe}-packages.txt")
            progress.phase(f"rootfs ({fl.name}): debootstrap {fl.suite}", note=f"{len(packages)} extra packages")
            _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(packages),
                  fl.suite, str(tree), mirror], log, f"debootstrap of the lab rootfs ({fl.suite})")
            progress.phase(f"rootfs ({fl.name}): apt" + (f" (python deps, {fl.backports} QEMU)"
                                                        if fl.backports else " (python deps, QEMU)"))
            if fl.backports:
                (tree / "etc/apt/sources.list.d/backports.list").write_text(f"deb {mirror} {fl.backports} main\n")
            (tree / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
            (tree / "usr/sbin/policy-rc.d").chmod(0o755)
            extras = " ".join(_recipe_lines(f"{fl.recipe}-apt.txt"))
            # sid's Release file is short-lived and mirrors may serve a frozen copy of it: keep the
            # signature check, drop only the expiry check (trixie's stays as it is)
            update = "apt-get update -q" + ("" if fl.backports else " -o Acquire::Check-Valid-Until=false")
            script = f"{update} && apt-get install -y -q --no-install-recommends {extras}"
            if fl.backports:
                backports = " ".join(_recipe_lines(f"{fl.recipe}-backports.txt"))
                script += (f" && apt-get install -y -q --no-install-recommends -t {fl.backports} "
                           f"{backports}")
            _chroot(tree, script + " && apt-get clean && rm -rf /var/lib/apt/lists/*", log,
                    f"apt-get install in the {fl.suite} rootfs chroot (python deps, QEMU)")
            (tree / "usr/sbin/policy-rc.d").unlink()
            wheels = _recipe_lines("rootfs-wheels.txt")
            if wheels:
                progress.phase("rootfs: python wheels", note=" ".join(wheels))
                _install_wheels(tree, wheels, log)
            _finish_tree(tree)
            (tmp / "SUITE").write_text(fl.suite + "\n")
            (tmp / "FLAVOUR").write_text(fl.name + "\n")
    return art.path / "tree"


def _trim_systemd(tree: Path) -> None:
    """Mask exactly SYSTEMD_MASKED (masks of an earlier list are removed first)."""
    etc = tree / "etc/systemd/system"
    etc.mkdir(parents=True, exist_ok=True)
    for link in etc.iterdir():
        if link.is_symlink() and os.readlink(link) == "/dev/null":
            link.unlink()
    for unit in SYSTEMD_MASKED:
        link = etc / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    # an empty machine-id: a transient one per boot, no first-boot logic
    (tree / "etc/machine-id").write_text("")


def _enable(tree: Path, unit: str, target: str) -> None:
    wants = tree / "etc/systemd/system" / f"{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if not link.is_symlink():
        link.symlink_to(f"/etc/systemd/system/{unit}")


def _install_wheels(tree: Path, wheels: list[str], log: Path) -> None:
    import sys
    import zipfile

    wheel_dir = cache.cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
          "--dest", str(wheel_dir), *wheels], log, "downloading Python wheels for the rootfs")
    site = tree / "usr/lib/python3/dist-packages"
    for spec in wheels:
        dist = spec.split("==")[0].replace("-", "_").replace(".", "_").lower()
        found = [w for w in wheel_dir.glob("*.whl")
                 if w.name.split("-")[0].replace(".", "_").lower() == dist
                 and ("==" not in spec or w.name.split("-")[1] == spec.split("==")[1])]
        if not found:
            raise LabBuildError(f"pip downloaded no wheel for {spec} into {wheel_dir}")
        with zipfile.ZipFile(sorted(found)[-1]) as zf:
            zf.extractall(site)


def _finish_tree(tree: Path) -> None:
    (tree / RUN_MOUNT.lstrip("/")).mkdir(exist_ok=True)
    (tree / "etc/hostname").write_text("luoagent-lab\n")
    # Nothing in the tree's caches is needed at run time; keep the image small.
    for junk in ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        p = tree / junk
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            p.mkdir()


def python_ext_suffix(tree: Path) -> str:
    """The tree's CPython extension suffix, read from its sysconfig data (no chroot needed)."""
    for version in ("3.13", "3.14", "3.12"):
        if (tree / f"usr/include/python{version}/Python.h").exists():
            return f".cpython-{version.replace('.', '')}-x86_64-linux-gnu.so"
    raise LabBuildError(f"no Python headers in the lab rootfs tree {tree} (libpython3.13-dev missing)")


def build_image(tree: Path, progress: Progress | None = None, fl: Flavour | None = None) -> Path:
    """Return the cached ext4 image of ``tree`` with its PID 1 set up (mke2fs -d, no loop mount):
    the lab init (custom-init flavour) or the stage launcher + unit (systemd flavour)."""
    progress = progress or Progress(quiet=True)
    fl = fl or flavour(None)
    if not INIT_SOURCE.is_file():
        raise LabBuildError(f"the lab init script {INIT_SOURCE} is missing")
    if fl.name == DEFAULT_FLAVOUR:
        key = cache.inputs_hash(str(tree), tree.parent.name, INIT_SOURCE)
    else:
        key = cache.inputs_hash(str(tree), tree.parent.name, fl.name, *SYSTEMD_MASKED,
                                resources.require(resources.SYSTEMD_STAGE, "the systemd lab's stage launcher"),
                                resources.SYSTEMD_STAGE_UNIT, resources.SYSTEMD_RUN_DISK_UNIT)
    art = cache.Artifact("rootfs-image", key)
    image = art / "rootfs.ext4"
    if image.exists():
        return image
    with art.lock():
        if image.exists():
            return image
        progress.phase(f"rootfs ({fl.name}): ext4 image", note="mke2fs -d")
        if fl.name == DEFAULT_FLAVOUR:
            _install(INIT_SOURCE, tree / INIT_PATH.lstrip("/"), 0o755)
        else:
            _install(resources.SYSTEMD_STAGE, tree / SYSTEMD_STAGE_PATH.lstrip("/"), 0o755)
            unit_dir = tree / "etc/systemd/system"
            _install(resources.SYSTEMD_STAGE_UNIT, unit_dir / SYSTEMD_STAGE_UNIT, 0o644)
            _install(resources.SYSTEMD_RUN_DISK_UNIT, unit_dir / SYSTEMD_RUN_DISK_UNIT, 0o644)
            _enable(tree, SYSTEMD_STAGE_UNIT, "multi-user.target")
            _enable(tree, SYSTEMD_RUN_DISK_UNIT, "local-fs.target")
            _trim_systemd(tree)
        size_mb = _tree_mb(tree) * 13 // 10 + 256
        cache.require_space(art.kind_dir, size_mb * 1_000_000, "the lab rootfs image")
        with art.build(replace=True) as tmp:
            make_ext4(tree, tmp / "rootfs.ext4", size_mb, label="luoagent-root", log=tmp / "mke2fs.log")
            (tmp / "FLAVOUR").write_text(fl.name + "\n")
        # Older images of this flavour (an earlier init or tree) are dead weight (~0.7 GB each).
        # A QEMU still running from one keeps reading it after the unlink, so removing them is
        # safe; images of the other flavour stay (images made before flavours have no FLAVOUR).
        for old in art.kind_dir.iterdir():
            if old.is_dir() and old.name != art.key and not old.name.startswith("."):
                marker = old / "FLAVOUR"
                old_flavour = marker.read_text().strip() if marker.is_file() else DEFAULT_FLAVOUR
                if old_flavour == fl.name:
                    shutil.rmtree(old, ignore_errors=True)
    return image


def _install(src: Path, dst: Path, mode: int) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    dst.chmod(mode)


def _tree_mb(tree: Path) -> int:
    out = subprocess.run(["du", "-sm", "--apparent-size", str(tree)], capture_output=True, text=True)
    if out.returncode != 0:
        raise LabBuildError(f"cannot measure {tree}: {out.stderr.strip()}")
    return int(out.stdout.split()[0])


def make_ext4(src_dir: Path, image: Path, size_mb: int, label: str, log: Path | None = None) -> None:
    """Create an ext4 image holding ``src_dir`` (mke2fs -d; no loop device, no mount)."""
    if image.exists():
        image.unlink()
    log = log or image.with_suffix(".mke2fs.log")
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-J", "size=8", "-E",
          "lazy_itable_init=1,lazy_journal_init=1", "-d", str(src_dir), str(image), f"{size_mb}M"],
         log, f"mke2fs of {image.name}")


def build_rootfs(progress: Progress | None = None, fl: Flavour | None = None) -> Rootfs:
    tree = build_tree(progress, fl)
    image = build_image(tree, progress, fl)
    return Rootfs(tree=tree, image=image, python_tag=python_ext_suffix(tree), key=tree.parent.name)


# --- the cffi shim, compiled for the rootfs's Python ----------------------------------------
def build_shim(tree: Path, progress: Progress | None = None, kernel_headers: Path | None = None) -> Path:
    """Compile ``luoagent._luo_shim`` for the tree's CPython; returns the .so (cached by csrc hash).

    The C source is emitted by the tree's own cffi (chroot, so it matches the VM's
    _cffi_backend), then compiled by the host's gcc against the tree's Python headers."""
    progress = progress or Progress(quiet=True)
    csrc = resources.csrc_dir()
    suffix = python_ext_suffix(tree)
    kheaders = _kernel_uapi_headers(kernel_headers)
    art = cache.Artifact("shim", cache.inputs_hash(csrc, tree.parent.name, suffix,
                                                   str(kheaders) if kheaders else None))
    so = art / ("_luo_shim" + suffix)
    if so.exists():
        return so
    _require_root("building the LUO shim for the lab (chroot)")
    with art.lock():
        if so.exists():
            return so
        progress.phase("shim: cffi for the lab's python3")
        with art.build(replace=True) as tmp:
            log = tmp / "build.log"
            work = Path(tempfile.mkdtemp(prefix="luoagent-shim-", dir=tree / "tmp"))
            try:
                shutil.copytree(csrc, work / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
                inner = "/" + str(work.relative_to(tree))
                _run(["chroot", str(tree), "/usr/bin/python3", "-c",
                      "import runpy,sys; ns = runpy.run_path(sys.argv[1]); "
                      "ns['ffibuilder'].emit_c_code(sys.argv[2])",
                      f"{inner}/csrc/build_shim.py", f"{inner}/_luo_shim.c"],
                     log, "emitting the cffi shim source in the rootfs")
                c_file = tmp / "_luo_shim.c"
                shutil.copyfile(work / "_luo_shim.c", c_file)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            pyver = suffix.split("-")[1]  # "313"
            pyinc = f"python{pyver[0]}.{pyver[1:]}"
            # pyconfig.h includes <x86_64-linux-gnu/python3.X/pyconfig.h>: expose just that
            # directory, not all of the tree's /usr/include (host glibc headers stay in charge).
            arch_inc = tmp / "include" / "x86_64-linux-gnu"
            arch_inc.mkdir(parents=True)
            (arch_inc / pyinc).symlink_to(tree / "usr/include/x86_64-linux-gnu" / pyinc)
            argv = ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror=implicit-function-declaration",
                    "-I", str(csrc), "-I", str(tree / "usr/include" / pyinc),
                    "-I", str(tmp / "include")]
            if kheaders:
                argv += ["-I", str(kheaders)]
            _run(argv + [str(c_file), "-o", str(tmp / so.name)], log, "compiling the LUO shim for the lab")
    return so


def _kernel_uapi_headers(given: Path | None) -> Path | None:
    """A uapi include dir with linux/liveupdate.h: with it the shim's compile proves luo_abi.h
    against the lab kernel's own header (abi_check.c). The lab kernel's headers_install output
    if known, else $LUOAGENT_KERNEL_HEADERS."""
    for cand in (given, os.environ.get("LUOAGENT_KERNEL_HEADERS")):
        if cand and (Path(cand) / "linux/liveupdate.h").is_file():
            return Path(cand)
    return None


# --- the per-run disk --------------------------------------------------------------------
def stage_agent(dest: Path, shim: Path) -> None:
    """Copy the luoagent package source plus the VM-built shim into ``dest`` (-> dest/luoagent)."""
    shutil.copytree(PACKAGE_ROOT, dest / "luoagent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
    shutil.copyfile(shim, dest / "luoagent" / shim.name)
