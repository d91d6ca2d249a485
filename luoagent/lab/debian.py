"""Fetch Debian packages for the lab through a private apt list, without touching the system's apt setup.

The mirror comes from the machine's own apt sources; lists, package cache and .debs live under the lab cache."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import log
from luoagent.errors import LabBuildError
from luoagent.lab.cache import atomic_write, cache_dir

_log = log.get_logger(__name__)

DEFAULT_SUITES: tuple[str, ...] = ("sid", "trixie", "trixie-backports")
#: lets a user point the lab at another mirror without editing the system's apt sources
MIRROR_ENV = "LUOAGENT_DEBIAN_MIRROR"
DEB822_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
ONE_LINE_SOURCES = Path("/etc/apt/sources.list")


def mirror(deb822: Path = DEB822_SOURCES, one_line: Path = ONE_LINE_SOURCES) -> str:
    """The Debian archive URI this machine already uses (``$LUOAGENT_DEBIAN_MIRROR`` overrides).

    Reads the first ``URIs:`` of a stanza whose suites are not ``*-security`` from the deb822
    file, else the first such ``deb`` line of ``sources.list``."""
    if os.environ.get(MIRROR_ENV):
        return os.environ[MIRROR_ENV].rstrip("/")
    found = _mirror_from_deb822(deb822) or _mirror_from_one_line(one_line)
    if not found:
        raise LabBuildError(
            f"cannot find this machine's Debian mirror: no usable URIs: line in {deb822} and no "
            f"deb line in {one_line}; set ${MIRROR_ENV} to a Debian archive URL"
        )
    return found.rstrip("/")


def _mirror_from_deb822(path: Path) -> str | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    first = None
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "uris" not in fields or "deb" not in fields.get("types", "deb").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        uri = fields["uris"].split()[0]
        suites = fields.get("suites", "").split()
        if suites and all(s.endswith("-security") for s in suites):
            first = first or uri
            continue
        return uri
    return first


def _mirror_from_one_line(path: Path) -> str | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    first = None
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [arch=amd64 signed-by=...] options
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) < 2:
            continue
        if words[1].endswith("-security"):
            first = first or words[0]
            continue
        return words[0]
    return first


@dataclass
class AptContext:
    """apt-get/apt-cache pointed at a private sources list, lists dir and package cache.

    Nothing outside ``root`` is written: Dir::Etc::SourceList/SourceParts, Dir::State::Lists
    and Dir::Cache are all redirected (the system's dpkg status is only read)."""

    root: Path
    mirror: str
    suites: tuple[str, ...]
    _updated: bool = field(default=False, repr=False)

    @property
    def sources_list(self) -> Path:
        return self.root / "sources.list"

    @property
    def lists_dir(self) -> Path:
        return self.root / "lists"

    def sources_text(self) -> str:
        return "".join(f"deb {self.mirror} {suite} main\n" for suite in self.suites)

    def options(self) -> list[str]:
        opts = {
            "Dir::Etc::SourceList": str(self.sources_list),
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::State::Lists": str(self.lists_dir),
            "Dir::Cache": str(self.root / "cache"),
            # the _apt sandbox user cannot enter a root-owned home; downloads are verified anyway
            "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
        }
        out: list[str] = []
        for key, value in opts.items():
            out += ["-o", f"{key}={value}"]
        return out

    def prepare(self) -> None:
        """Write the private sources list (dropping stale lists if it changed)."""
        (self.lists_dir / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        want = self.sources_text()
        try:
            have = self.sources_list.read_text()
        except OSError:
            have = None
        if have != want:
            for f in self.lists_dir.glob("*_dists_*"):
                f.unlink()
            atomic_write(self.sources_list, want)

    def has_lists(self) -> bool:
        return any(self.lists_dir.glob("*_Packages*"))

    def run(self, tool: str, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        if shutil.which(tool) is None:
            raise LabBuildError(f"{tool} not found: the lab needs a Debian-based host with apt")
        cmd = [tool, "-q", *self.options(), *args]
        _log.debug("apt", cmd=cmd)
        # one apt at a time per private state dir: apt-get takes the lists lock and fails at
        # once ("Could not get lock") when another lab build (or a background kernel build
        # thread of this process) runs apt there; flock waits instead
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".luoagent-apt.lock", "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise LabBuildError(
                f"{tool} {' '.join(args)} failed (exit {proc.returncode}) using the private apt "
                f"state in {self.root}: {_tail(proc.stderr or proc.stdout)}"
            )
        return proc

    def update(self, force: bool = False) -> None:
        """``apt-get update`` into the private lists (skipped when lists exist, unless ``force``)."""
        self.prepare()
        if self.has_lists() and not force:
            return
        self.run("apt-get", "update")
        self._updated = True

    def candidate(self, name: str) -> str | None:
        """Version apt would fetch for ``name`` from the private lists (None: no such package)."""
        self.update()
        proc = self.run("apt-cache", "policy", name, check=False)
        m = re.search(r"Candidate:\s*(\S+)", proc.stdout)
        if not m or m.group(1) == "(none)":
            return None
        return m.group(1)

    def versions(self, name: str) -> list[str]:
        """Every version of ``name`` in the private lists, newest first (apt-cache madison)."""
        self.update()
        proc = self.run("apt-cache", "madison", name, check=False)
        return [parts[1].strip() for parts in (line.split("|") for line in proc.stdout.splitlines())
                if len(parts) >= 3 and parts[0].strip() == name]

    def print_uris(self, names: list[str]) -> list[tuple[str, str, int]]:
        """(uri, filename, size) for each package spec (``name``, ``name=ver``, ``name/suite``).

        Answers are remembered in ``root/print-uris.json`` for as long as apt's inputs (see
        _apt_inputs) stay the same: a warm lab build then skips a second of apt-get per call."""
        self.update()
        query = " ".join(names)
        remembered = self._remembered_uris().get(query)
        if remembered is not None:
            return [(uri, fn, int(size)) for uri, fn, size in remembered]
        proc = self.run("apt-get", "download", "--print-uris", *names, check=False)
        if proc.returncode != 0 and not self._updated:
            self.update(force=True)  # lists may be stale (the archive moved on)
            proc = self.run("apt-get", "download", "--print-uris", *names, check=False)
        if proc.returncode != 0:
            raise LabBuildError(
                f"apt cannot find {' '.join(names)} in {self.mirror} suites "
                f"{', '.join(self.suites)}: {_tail(proc.stderr)}"
            )
        out = []
        for line in proc.stdout.splitlines():
            m = re.match(r"'([^']+)'\s+(\S+)\s+(\d+)", line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3))))
        self._remember_uris(query, out)
        return out

    @property
    def _uris_file(self) -> Path:
        return self.root / "print-uris.json"

    def _apt_inputs(self) -> str:
        """What apt's resolution of a package name depends on: the private sources and lists,
        and the system's apt configuration, pinning and dpkg status (read, not redirected).
        Any change to one of them (an ``apt-get update`` rewrites the lists) forgets every answer."""
        files = sorted(self.lists_dir.glob("*_dists_*"))
        for pattern in ("apt.conf", "apt.conf.d/*", "preferences", "preferences.d/*"):
            files += sorted(Path("/etc/apt").glob(pattern))
        files.append(Path("/var/lib/dpkg/status"))
        parts = [self.sources_text()]
        for f in files:
            try:
                st = f.stat()
                parts.append(f"{f} {st.st_size} {st.st_mtime_ns}")
            except OSError:
                parts.append(f"{f} -")
        return "\n".join(parts)

    def _remembered_uris(self) -> dict:
        try:
            saved = json.loads(self._uris_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("inputs") != self._apt_inputs():
            return {}
        return saved.get("answers") or {}

    def _remember_uris(self, query: str, answer: list[tuple[str, str, int]]) -> None:
        answers = self._remembered_uris()
        answers[query] = answer
        atomic_write(self._uris_file, json.dumps({"inputs": self._apt_inputs(), "answers": answers}))

    def download(self, names: list[str], dest: Path) -> list[Path]:
        """Download ``names`` into ``dest``, reusing complete .debs already there; the result
        follows the order of ``names``."""
        dest.mkdir(parents=True, exist_ok=True)
        by_package = {fn.split("_", 1)[0]: (fn, size) for _uri, fn, size in self.print_uris(list(names))}
        files: list[tuple[str, str, int]] = []  # (spec, filename, size)
        for spec in names:
            pkg = re.split(r"[=/]", spec, maxsplit=1)[0]
            if pkg not in by_package:
                raise LabBuildError(f"apt did not resolve {spec!r} to a .deb (got {sorted(by_package)})")
            files.append((spec, *by_package[pkg]))
        missing = [(spec, fn) for spec, fn, size in files
                   if not ((dest / fn).is_file() and (dest / fn).stat().st_size == size)]
        if missing:
            tmp = dest / f".download-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                specs = [spec for spec, _fn in missing]
                _log.info("apt download", packages=specs, dest=str(dest))
                proc = self.run("apt-get", "download", *specs, cwd=tmp, check=False)
                if proc.returncode != 0 and not self._updated:
                    self.update(force=True)
                    proc = self.run("apt-get", "download", *specs, cwd=tmp, check=False)
                if proc.returncode != 0:
                    raise LabBuildError(f"downloading {' '.join(specs)} failed: {_tail(proc.stderr)}")
                for _spec, fn in missing:
                    got = tmp / fn
                    if not got.is_file():
                        raise LabBuildError(f"apt-get download did not produce {fn} (got {os.listdir(tmp)})")
                    os.replace(got, dest / fn)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return [dest / fn for _spec, fn, _size in files]


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"


def private_apt(suites: tuple[str, ...] = DEFAULT_SUITES, mirror_uri: str | None = None) -> AptContext:
    """An AptContext under ``<cache>/apt`` (default suites) or ``<cache>/apt-<suites>``."""
    suites = tuple(suites)
    if not suites:
        raise ValueError("private_apt needs at least one suite")
    name = "apt" if suites == DEFAULT_SUITES else "apt-" + "+".join(suites)
    ctx = AptContext(root=cache_dir() / name, mirror=mirror_uri or mirror(), suites=suites)
    ctx.prepare()
    return ctx


def debs_dir() -> Path:
    """Where downloaded .debs are kept (shared by every lab build step)."""
    d = cache_dir() / "debs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def download_debs(names: list[str] | tuple[str, ...], dest: Path | None = None,
                  apt: AptContext | None = None) -> list[Path]:
    """Fetch ``names`` (apt specs: ``pkg``, ``pkg=version``, ``pkg/suite``) as .debs into ``dest``
    (default ``<cache>/debs``); a .deb already present with the right size is reused."""
    return (apt or private_apt()).download(list(names), dest or debs_dir())


def extract_deb(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files into ``dest`` with ``dpkg -x`` (no maintainer scripts, no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["dpkg", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabBuildError(f"dpkg -x {deb} failed: {_tail(proc.stderr)}; delete it to re-download")
    return dest


def deb_field(deb: Path, name: str) -> str:
    """One control field of a .deb (e.g. ``Version``, ``Package``)."""
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabBuildError(f"{deb} is not a readable .deb: {_tail(proc.stderr)}; delete it to re-download")
    return proc.stdout.strip()
