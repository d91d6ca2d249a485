"""Build the lab's LUO kernel: fetch Debian's linux-source (or take a developer's tree), merge the
kernel-configs/ fragments onto tinyconfig + kvm_guest.config, verify them, and cache the bzImage.

Cache layout (under cache_dir()): debs/ (.debs), src/<pkg>_<version>/ (extracted source, atomic),
kbuild/<source>/ (the O= build tree, kept so config changes rebuild incrementally),
kernel/<key>/ (bzImage, config, build.json; atomic; key = hash of source, fragments, base, compiler)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from luoagent import log
from luoagent.lab import resources
from luoagent.lab.resources import require
from luoagent.adapters import kexec
from luoagent.errors import KexecImageError, LabBuildError
from luoagent.lab import debian
from luoagent.report import Progress
from luoagent.lab.cache import (
    Artifact,
    atomic_write,
    cache_dir,
    free_bytes,
    inputs_hash,
    require_space,
)

_log = log.get_logger(__name__)

#: Debian source packages the lab knows (7.3 comes from trixie-backports, for cross-version runs)
SUPPORTED_VERSIONS = ("7.2", "7.3")
#: the base the fragments are merged onto: small, fast to build, and a working KVM/QEMU guest
BASE = ("tinyconfig", "kernel/configs/kvm_guest.config")
#: bump when the build recipe changes in a way that changes the output
RECIPE = "kernel-recipe-1"
#: whole lab (source, build tree, rootfs, images) — what the lab README asks for
LAB_DISK_WANTED = 6 * 10**9
_WHOLE_LAB = f"(the whole lab wants ~{LAB_DISK_WANTED / 1e9:.0f} GB)"
#: extracted source 1.8 GB + compressed .deb; build tree of the trimmed config ~0.2 GB (+margin)
_SRC_BYTES = int(2.1 * 10**9)
_BUILD_BYTES = int(0.6 * 10**9)
#: "CC" lines of a full build of the default fragments (measured: 1206 on 7.2.13); used for the
#: percentage until this cache has seen a full build of its own
_DEFAULT_CC_ESTIMATE = 1206

_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET_LINE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


# --- config fragments (pure logic, unit-tested) -----------------------------------------------
def configs_dir() -> Path:
    """The lab's kernel config fragments (package data: luoagent/lab/kernel-configs)."""
    require(resources.KERNEL_CONFIGS / "luo.config", "the kernel config fragment luo.config")
    return resources.KERNEL_CONFIGS


def default_fragments() -> list[Path]:
    """luo.config (what a production host needs) then lab.config (what the lab VM adds)."""
    d = configs_dir()
    return [d / "luo.config", d / "lab.config"]


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=v`` and ``# CONFIG_X is not set`` lines → {name: value}; "n" for not set.

    Other comments and blank lines are ignored. Later lines win, as in Kconfig fragments."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _CONFIG_LINE.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _NOT_SET_LINE.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def parse_fragment(path: Path) -> dict[str, str]:
    """Parse a fragment file, rejecting lines that look like options but are malformed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabBuildError(f"cannot read kernel config fragment {path}: {exc.strerror}") from exc
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or _CONFIG_LINE.match(line) or _NOT_SET_LINE.match(line):
            continue
        if line.startswith("#") and not re.match(r"#\s*CONFIG_\w+\s+is not set", line):
            continue
        raise LabBuildError(
            f"{path}:{number}: not a Kconfig fragment line: {raw!r} "
            "(expected CONFIG_NAME=value, '# CONFIG_NAME is not set' or a comment)"
        )
    return parse_config(text)


def merge_config(base_text: str, fragments: list[dict[str, str]]) -> str:
    """Apply fragments in order onto a .config text: a symbol's existing line is replaced in
    place, new symbols are appended. "n" is written as ``# CONFIG_X is not set``."""
    wanted: dict[str, str] = {}
    for frag in fragments:
        wanted.update(frag)

    def render(name: str, value: str) -> str:
        return f"# {name} is not set" if value == "n" else f"{name}={value}"

    lines = base_text.splitlines()
    seen: set[str] = set()
    for i, raw in enumerate(lines):
        m = _CONFIG_LINE.match(raw.strip()) or _NOT_SET_LINE.match(raw.strip())
        if m and m.group(1) in wanted:
            lines[i] = render(m.group(1), wanted[m.group(1)])
            seen.add(m.group(1))
    extra = [render(n, v) for n, v in wanted.items() if n not in seen]
    return "\n".join(lines + extra) + "\n"


def missing_options(final: dict[str, str], requested: dict[str, str]) -> list[tuple[str, str, str]]:
    """(name, requested, got) for each requested option the final .config does not honour.

    An absent symbol counts as "n" (Kconfig omits symbols whose menu is disabled)."""
    out = []
    for name, want in requested.items():
        got = final.get(name, "n")
        if got != want:
            out.append((name, want, got))
    return out


def verify_config(final_text: str, fragment_paths: list[Path], src: Path | None = None) -> None:
    """Raise LabBuildError naming every fragment option that did not survive olddefconfig."""
    final = parse_config(final_text)
    problems = []
    for path in fragment_paths:
        for name, want, got in missing_options(final, parse_fragment(path)):
            hint = _dependency_hint(src, name) if src else ""
            problems.append(f"{name}={want} (from {path.name}) ended up {'not set' if got == 'n' else got}{hint}")
    if problems:
        raise LabBuildError(
            "kernel config: Kconfig dropped requested options after olddefconfig — "
            + "; ".join(problems)
            + ". Add the missing dependencies to the fragment (an option forced on may instead be "
            "selected by another one), or remove the option."
        )


def _dependency_hint(src: Path, name: str) -> str:
    symbol = name.removeprefix("CONFIG_")
    try:
        proc = subprocess.run(
            ["grep", "-rn", "--include=Kconfig*", "-A12", f"^\\(menu\\)\\?config {symbol}$", "."],
            cwd=src, capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if not proc.stdout:
        return " (no such Kconfig symbol in this source: misspelt, or not on x86?)"
    deps = []
    for line in proc.stdout.splitlines()[1:]:
        m = re.search(r"Kconfig[^/:]*?-\d+-(.*)$", line)  # grep -A context line: FILE-N-TEXT
        if not m:
            continue
        body = m.group(1).strip()
        if re.match(r"(menu)?config \w+$", body):
            break
        if body.startswith("depends on"):
            deps.append(body)
    return f" (Kconfig: {'; '.join(deps)})" if deps else ""


# --- bzImage ---------------------------------------------------------------------------------
def validate_bzimage(path: Path) -> Path:
    """``path`` if it is an x86 bzImage (the one header check, `kexec.bzimage_version`), else
    LabBuildError saying what to pass instead."""
    path = Path(path)
    try:
        kexec.bzimage_version(path)
    except KexecImageError as exc:
        raise LabBuildError(str(exc)) from None
    return path


# --- source ----------------------------------------------------------------------------------
@dataclass
class KernelSource:
    """Where a kernel tree came from and what identifies it for cache keys."""

    tree: Path
    identity: str  # "debian:linux-source-7.2=7.2.13-1" or "local:<path>@<state>"
    key: str  # short, filesystem-safe: names kbuild/<key>
    local: bool


def split_version(version: str) -> tuple[str, str | None]:
    """("7.2", None) for a series (newest Debian release of it), ("7.2", "7.2.12") for an exact
    upstream release (a stable update of that series); LabBuildError for anything else."""
    m = re.fullmatch(r"(\d+\.\d+)(?:\.(\d+))?", version)
    if not m or m.group(1) not in SUPPORTED_VERSIONS:
        raise LabBuildError(
            f"unsupported lab kernel version {version!r}; choose a series ({', '.join(SUPPORTED_VERSIONS)}) "
            "or an exact release of one (e.g. 7.2.12), or pass --kernel-src DIR"
        )
    return m.group(1), version if m.group(2) else None


def debian_source(version: str, progress: Progress) -> KernelSource:
    """Download (cached) and extract (cached, atomic) Debian's linux-source-<series>, the newest
    one, or for an exact release (``7.2.12``) the Debian version of that upstream release."""
    series, exact = split_version(version)
    package = f"linux-source-{series}"
    progress.phase(f"fetch {package}" + (f" {exact}" if exact else ""))
    spec = package
    if exact:
        apt = debian.private_apt()
        versions = [v for v in apt.versions(package) if v.split("-", 1)[0] == exact]
        if not versions:
            cached = sorted(debian.debs_dir().glob(f"{package}_{exact}-*.deb"))
            if not cached:
                raise LabBuildError(f"Debian has no {package} of release {exact} in the lab's suites; "
                                    f"it has {', '.join(apt.versions(package)) or 'none'}")
            versions = [debian.deb_field(cached[-1], "Version")]
        spec = f"{package}={versions[0]}"
    try:
        deb = debian.download_debs([spec])[0]
    except LabBuildError as exc:
        cached = sorted(debian.debs_dir().glob(f"{package}_{exact + '-' if exact else ''}*.deb"))
        if not cached:
            raise LabBuildError(f"cannot fetch {package}: {exc}") from exc
        deb = cached[-1]
        progress.log(f"apt failed ({exc}); using the cached {deb.name}")
    pkg_version = debian.deb_field(deb, "Version")
    key = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{package}_{pkg_version}")
    art = Artifact("src", key)
    with art.lock():
        if not art.exists():
            require_space(art.kind_dir, _SRC_BYTES, f"extracting {package} {_WHOLE_LAB}")
            progress.phase(f"extract {package}", note="(~1.8 GB)")
            with art.build() as tmp:
                _extract_source_deb(deb, tmp)
    trees = [p for p in art.path.iterdir() if (p / "Makefile").is_file()]
    if len(trees) != 1:
        raise LabBuildError(f"{art.path} should hold one kernel tree, found {trees}; delete it to re-extract")
    return KernelSource(trees[0], f"debian:{package}={pkg_version}", key, local=False)


def _extract_source_deb(deb: Path, dest: Path) -> None:
    # The .deb carries usr/src/linux-source-X.Y.tar.xz; stream it out and unpack without
    # writing the intermediate tarball (saves ~160 MB and a pass over the disk).
    script = (
        'set -o pipefail; dpkg-deb --fsys-tarfile "$1" | tar -x --wildcards -O "*.tar.xz" '
        '| tar -xJ -C "$2"'
    )
    proc = subprocess.run(["bash", "-c", script, "extract", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabBuildError(
            f"extracting {deb.name} failed: {proc.stderr.strip()[-400:]}; delete {deb} to re-download"
        )


def local_source(tree: Path) -> KernelSource:
    """A kernel developer's own tree: must be a clean (``make mrproper``) Linux source."""
    tree = Path(tree).expanduser().resolve()
    if not (tree / "Makefile").is_file() or not (tree / "Kconfig").is_file() or not (tree / "arch/x86").is_dir():
        raise LabBuildError(f"--kernel-src {tree} is not a Linux source tree (no Makefile/Kconfig/arch/x86)")
    if (tree / ".config").exists() or (tree / "include/config").is_dir():
        raise LabBuildError(
            f"--kernel-src {tree} has an in-tree build (.config or include/config); the lab builds "
            f"out of tree with O=, which needs a clean source: run `make -C {tree} mrproper` "
            "(save your .config first)"
        )
    state = "nogit"
    if (tree / ".git").exists():
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
        diff = subprocess.run(["git", "-C", str(tree), "diff", "HEAD"], capture_output=True)
        if head.returncode == 0:
            state = head.stdout.strip() + "+" + inputs_hash(diff.stdout)
    key = "local-" + inputs_hash(str(tree))
    return KernelSource(tree, f"local:{tree}@{state}", key, local=True)


# --- build -----------------------------------------------------------------------------------
@dataclass
class KernelBuild:
    """A built lab kernel, as recorded in ``kernel/<key>/build.json`` next to the bzImage."""

    bzimage: Path
    config: Path
    release: str  # `make kernelrelease`, e.g. "7.2.13"
    source: Path  # the source tree (selftests are built from it)
    build_dir: Path  # the O= tree
    headers: Path  # O=/usr/include after `make headers` (KHDR_INCLUDES for selftests)
    identity: str
    key: str
    build_seconds: float  # wall time of the build that produced it

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def kernel_info(bzimage: Path) -> KernelBuild:
    """Read the build.json that build_kernel() keeps next to a cached bzImage."""
    meta = Path(bzimage).parent / "build.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise LabBuildError(f"{meta} missing or unreadable ({exc}); rebuild with `luoagent lab build`") from exc
    for field in ("bzimage", "config", "source", "build_dir", "headers"):
        data[field] = Path(data[field])
    return KernelBuild(**data)


def compiler_identity() -> str:
    """First line of `gcc --version`: part of every lab build's cache key (kernel, selftests)."""
    try:
        out = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout
    except OSError:
        raise LabBuildError("gcc not found: install the kernel build dependencies "
                            "(apt-get install gcc make flex bison bc libelf-dev libssl-dev cpio)") from None
    return out.splitlines()[0] if out else "gcc?"


def _check_tools() -> None:
    missing = [t for t in ("make", "gcc", "flex", "bison", "bc", "cpio", "perl") if shutil.which(t) is None]
    if not Path("/usr/include/libelf.h").exists():
        missing.append("libelf-dev")
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev")
    if missing:
        raise LabBuildError(
            f"kernel build dependencies missing: {', '.join(missing)}; install them with "
            "apt-get install gcc make flex bison bc libelf-dev libssl-dev cpio"
        )


def kernel_key(source: KernelSource, fragments: list[Path]) -> str:
    """Cache key of a kernel build: recipe, base, source identity, the options each fragment
    sets (comments do not count, so rewording a why-comment does not rebuild), compiler."""
    options = [
        "\n".join(f"{name}={value}" for name, value in parse_fragment(Path(f)).items()) for f in fragments
    ]
    return inputs_hash(RECIPE, *BASE, source.identity, *options, compiler_identity())


def _make(source: KernelSource, build_dir: Path, *args: str, env: dict | None = None,
          logf=None) -> subprocess.CompletedProcess:
    cmd = ["make", "-C", str(source.tree), f"O={build_dir}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if logf is not None:
        logf.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise LabBuildError(f"`make {' '.join(args)}` failed in {build_dir} (exit {proc.returncode}):\n{tail}")
    return proc


def configure(source: KernelSource, build_dir: Path, fragments: list[Path], logf=None) -> bool:
    """Produce ``build_dir/.config`` from the base + fragments, verified. Returns True if it
    changed (the existing .config is left untouched when identical, so make stays incremental)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    new = build_dir / ".config.luoagent-new"
    env = {"KCONFIG_CONFIG": str(new)}
    _make(source, build_dir, "tinyconfig", env=env, logf=logf)
    base_fragments = [parse_fragment(source.tree / f) for f in BASE[1:]]
    ours = [parse_fragment(f) for f in fragments]
    new.write_text(merge_config(new.read_text(), base_fragments + ours))
    _make(source, build_dir, "olddefconfig", env=env, logf=logf)
    final_text = new.read_text()
    verify_config(final_text, fragments, source.tree)
    for leftover in build_dir.glob(".config.luoagent-new.old"):
        leftover.unlink()  # kconfig's backup of the previous candidate
    old = build_dir / ".config"
    if old.is_file() and old.read_text() == final_text:
        new.unlink()
        return False
    os.replace(new, old)
    return True


def _run_make_with_progress(source: KernelSource, build_dir: Path, jobs: int, progress: Progress,
                            expected_cc: int | None, logf) -> int:
    cmd = ["make", "-C", str(source.tree), f"O={build_dir}", f"-j{jobs}", "bzImage"]
    logf.write(f"$ {' '.join(cmd)}\n")
    logf.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    compiled = 0
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        logf.write(line)
        tail = (tail + [line.rstrip()])[-25:]
        if line.startswith("  CC "):
            compiled += 1
            if expected_cc:
                progress.update(done=min(compiled, expected_cc - 1), note=f"{compiled} objects compiled")
            else:
                progress.update(note=f"{compiled} objects compiled")
    rc = proc.wait()
    if rc != 0:
        errors = [t for t in tail if "error" in t.lower() or "Error" in t] or tail[-10:]
        raise LabBuildError(
            f"kernel build failed (make exit {rc}); full log {logf.name}:\n" + "\n".join(errors[-12:])
        )
    return compiled


def build_kernel(version: str = "7.2", kernel_src: Path | None = None, progress: Progress | None = None,
                 *, fragments: list[Path] | None = None, jobs: int | None = None,
                 force: bool = False) -> Path:
    """Return the cached lab bzImage for ``version`` (or the tree ``kernel_src``), building it if
    needed. Next to it: ``config`` (the final .config) and ``build.json`` (see kernel_info())."""
    return build_kernel_info(version, kernel_src, progress, fragments=fragments, jobs=jobs, force=force).bzimage


def build_kernel_info(version: str = "7.2", kernel_src: Path | None = None, progress: Progress | None = None,
                      *, fragments: list[Path] | None = None, jobs: int | None = None,
                      force: bool = False) -> KernelBuild:
    """Like build_kernel() but returns the whole KernelBuild record."""
    progress = progress or Progress("lab kernel")
    started = time.monotonic()
    fragments = [Path(f).resolve() for f in (fragments or default_fragments())]
    for f in fragments:
        parse_fragment(f)  # bad fragment → clear error before any download
    cache = cache_dir()
    _check_tools()
    if free_bytes(cache) < LAB_DISK_WANTED:
        progress.log(f"warning: {free_bytes(cache) / 1e9:.1f} GB free under {cache}; "
                     f"the whole lab wants ~{LAB_DISK_WANTED / 1e9:.0f} GB")
    if kernel_src is None:
        source = debian_source(version, progress)
    else:
        source = local_source(Path(kernel_src))
    key = kernel_key(source, fragments)
    art = Artifact("kernel", key)
    if art.exists() and not force and not source.local:
        progress.done(f"kernel cached: {art / 'bzImage'}")
        return kernel_info(art / "bzImage")

    kbuild_root = cache / "kbuild"
    build_dir = kbuild_root / source.key
    waiting = lambda: progress.log(f"waiting for another luoagent kernel build in {build_dir} to finish")  # noqa: E731
    with Artifact("kbuild", source.key).lock(on_wait=waiting):
        if art.exists() and not force and not source.local:  # another process built it meanwhile
            progress.done(f"kernel cached: {art / 'bzImage'}")
            return kernel_info(art / "bzImage")
        if not build_dir.exists():
            require_space(cache, _BUILD_BYTES, f"the kernel build tree {_WHOLE_LAB}")
        build_dir.mkdir(parents=True, exist_ok=True)
        stats_path = build_dir / "luoagent-stats.json"
        try:
            stats = json.loads(stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        with open(build_dir / "luoagent-build.log", "w") as logf:
            progress.phase("configure", note=f"tinyconfig + kvm_guest + {', '.join(f.name for f in fragments)}")
            configure(source, build_dir, fragments, logf)
            fresh = not (build_dir / "vmlinux").exists()
            # only a build from an empty tree counts every object: its count is worth keeping
            empty_tree = not (build_dir / "init").exists()
            config_key = inputs_hash(build_dir / ".config")
            expected = None
            if fresh:
                expected = stats.get("full_cc", {}).get(config_key) or stats.get("last_full_cc") or _DEFAULT_CC_ESTIMATE
            jobs = jobs or (os.cpu_count() or 1) + 1
            progress.phase(f"compile ({'full' if fresh else 'incremental'}, -j{jobs})", total=expected)
            compiled = _run_make_with_progress(source, build_dir, jobs, progress, expected, logf)
            if fresh:
                progress.update(done=expected)
            if empty_tree:
                stats.setdefault("full_cc", {})[config_key] = compiled
                stats["last_full_cc"] = compiled
                atomic_write(stats_path, json.dumps(stats, indent=1))
            # `make headers` leaves the sanitised uAPI headers in O=/usr/include (what the
            # selftests want); headers_install would only copy them again, and needs rsync
            progress.phase("uapi headers")
            _make(source, build_dir, "headers", logf=logf)
            release = _make(source, build_dir, "-s", "kernelrelease").stdout.strip()
        built = build_dir / "arch/x86/boot/bzImage"
        validate_bzimage(built)
        seconds = round(time.monotonic() - started, 1)
        with art.build(replace=True) as tmp:
            shutil.copy2(built, tmp / "bzImage")
            shutil.copy2(build_dir / ".config", tmp / "config")
            record = KernelBuild(
                bzimage=art.path / "bzImage", config=art.path / "config", release=release,
                source=source.tree, build_dir=build_dir, headers=build_dir / "usr/include",
                identity=source.identity, key=key, build_seconds=seconds,
            )
            (tmp / "build.json").write_text(json.dumps(record.to_json(), indent=1) + "\n")
    progress.done(f"kernel {release} built in {seconds:.0f}s: {record.bzimage}")
    _log.info("kernel built", release=release, seconds=seconds, bzimage=str(record.bzimage))
    return record
