"""The lab's build cache: where artifacts live, how their inputs are keyed, how they land atomically.

Progress of long steps goes through `luoagent.report.Progress`, the one reporter of every command."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from luoagent.adapters.procfs import pid_alive
from luoagent.errors import LabBuildError

#: environment variable that relocates the whole cache (the lab CLI's --cache-dir sets it)
CACHE_ENV = "LUOAGENT_CACHE"

_cache_override: Path | None = None


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """Use ``path`` as the cache for this process (and children: it is exported); None resets."""
    global _cache_override
    if path is None:
        _cache_override = None
        os.environ.pop(CACHE_ENV, None)
        return
    _cache_override = Path(path).expanduser().resolve()
    os.environ[CACHE_ENV] = str(_cache_override)


def cache_dir() -> Path:
    """The cache root: set_cache_dir() > $LUOAGENT_CACHE > ~/.cache/luoagent (created on demand)."""
    if _cache_override is not None:
        root = _cache_override
    elif os.environ.get(CACHE_ENV):
        root = Path(os.environ[CACHE_ENV]).expanduser()
    else:
        root = Path.home() / ".cache" / "luoagent"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LabBuildError(
            f"cannot create the lab cache directory {root}: {exc.strerror}; "
            f"point ${CACHE_ENV} (or --cache-dir) at a writable directory"
        ) from exc
    return root


# --- input hashing ----------------------------------------------------------------------
def _hash_path(h: "hashlib._Hash", path: Path) -> None:
    # Names are hashed relative to the given root so the same tree at another place hashes
    # the same; file modes matter (an executable bit can change a build), mtimes do not.
    if not path.exists() and not path.is_symlink():
        raise LabBuildError(f"build input {path} does not exist")
    if path.is_symlink() or path.is_file():
        _hash_entry(h, path, path.name)
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            full = Path(dirpath) / name
            _hash_entry(h, full, str(full.relative_to(path)))


def _hash_entry(h: "hashlib._Hash", full: Path, rel: str) -> None:
    st = full.lstat()
    h.update(b"P\0" + rel.encode() + b"\0")
    if stat.S_ISLNK(st.st_mode):
        h.update(b"L\0" + os.readlink(full).encode() + b"\0")
        return
    h.update(b"M%o\0" % (st.st_mode & 0o111))
    with open(full, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(b"\0")


def inputs_hash(*parts: str | bytes | os.PathLike | int | None, length: int = 16) -> str:
    """Hex digest over ``parts``: ``Path``s hash their contents (files, or whole directory
    trees), ``str``/``bytes``/``int`` hash as literal values, None as a distinct marker.

    Order matters. ``length`` hex chars are returned (16 = 64 bits: plenty for a cache key)."""
    h = hashlib.sha256()
    for part in parts:
        if part is None:
            h.update(b"N\0")
        elif isinstance(part, os.PathLike):
            h.update(b"F\0")
            _hash_path(h, Path(part))
        elif isinstance(part, bytes):
            h.update(b"B%d\0" % len(part) + part)
        elif isinstance(part, (str, int)):
            data = str(part).encode()
            h.update(b"S%d\0" % len(data) + data)
        else:
            raise TypeError(f"inputs_hash: cannot hash {type(part).__name__}")
        h.update(b"\1")
    return h.hexdigest()[:length]


# --- atomic artifacts ---------------------------------------------------------------------
class Artifact:
    """One cache entry ``<cache>/<kind>/<key>/``: present only once completely built.

    ``with art.build() as tmp:`` yields an empty temporary directory next to the final one;
    when the block ends normally the directory is renamed into place (one ``rename(2)``), so
    an interrupted or failed build never leaves a half artifact behind. A lock file serialises
    builders of the same artifact (a second builder waits, then finds it present)."""

    def __init__(self, kind: str, key: str, root: Path | None = None):
        if not kind or "/" in kind or not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad artifact kind/key: {kind!r}/{key!r}")
        self.kind = kind
        self.key = key
        self._root = root

    @property
    def kind_dir(self) -> Path:
        return (self._root or cache_dir()) / self.kind

    @property
    def path(self) -> Path:
        return self.kind_dir / self.key

    def exists(self) -> bool:
        return self.path.is_dir()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"Artifact({self.kind!r}, {self.key!r}) at {self.path}"

    @contextlib.contextmanager
    def lock(self, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Exclusive lock for this artifact (blocks while another process builds it;
        ``on_wait`` is called once first if it has to wait, e.g. to tell the user why)."""
        self.kind_dir.mkdir(parents=True, exist_ok=True)
        with open(self.kind_dir / f".{self.key}.lock", "w") as lockf:
            try:
                fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def build(self, replace: bool = False) -> Iterator[Path]:
        """Yield a fresh temp dir; on success it becomes ``self.path`` (``replace`` drops an
        existing one first). On any exception the temp dir is removed and the error re-raised."""
        self.kind_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.kind_dir)
        tmp = self.kind_dir / f".tmp-{self.key}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.path.exists():
            if not replace:
                shutil.rmtree(tmp, ignore_errors=True)
                return  # another builder won the race; its artifact is equally valid
            old = self.kind_dir / f".old-{self.key}-{os.getpid()}"
            os.rename(self.path, old)
            os.rename(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, self.path)


def remove_stale_temps(kind_dir: Path) -> None:
    """Delete ``.tmp-*``/``.old-*`` dirs left by builders that died (their pid is gone)."""
    if not kind_dir.is_dir():
        return
    for entry in kind_dir.iterdir():
        if not (entry.name.startswith(".tmp-") or entry.name.startswith(".old-")):
            continue
        pid_text = entry.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a small file so readers see either the old or the new content, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def free_bytes(path: Path) -> int:
    """Free space for unprivileged writers on the filesystem holding ``path`` (or its parent)."""
    p = Path(path)
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def require_space(path: Path, wanted: int, what: str) -> None:
    """Raise LabBuildError naming the shortfall when ``path``'s filesystem lacks ``wanted`` bytes."""
    have = free_bytes(path)
    if have < wanted:
        raise LabBuildError(
            f"not enough disk space for {what}: {have / 1e9:.1f} GB free on the filesystem of "
            f"{path}, about {wanted / 1e9:.1f} GB wanted; free some space or point "
            f"${CACHE_ENV} (--cache-dir) at a larger filesystem"
        )
