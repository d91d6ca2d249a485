"""The lab's build cache: where artifacts live, how their inputs are keyed, how they land atomically.

Also the ``Progress`` reporter every long lab step uses (phase, elapsed time, optional percentage on stderr)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import sys
import threading
import time
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


# --- progress ----------------------------------------------------------------------------
class Progress:
    """Reports a long step on stderr: ``[lab] phase  1m23s  45%  note``.

    On a TTY one line is rewritten in place every second; otherwise a line is printed on each
    phase change and then every ``interval`` seconds (a background ticker, so a long step with
    no updates still shows it is alive).
    Use ``phase(name, total=None)`` to start a phase, ``update(done=..., note=...)`` as work
    advances, ``done(msg)`` at the end; ``elapsed()`` gives seconds since the phase began.
    ``quiet=True`` prints nothing (timings are still tracked for callers that report them)."""

    def __init__(self, label: str = "lab", *, stream=None, tty: bool | None = None,
                 interval: float = 15.0, quiet: bool = False):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.quiet = quiet
        self.name = ""
        self.total: float | None = None
        self.current: float | None = None
        self.note = ""
        self.started = time.monotonic()
        self.phase_started = self.started
        self._last_print = 0.0
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        #: (phase, seconds) for each finished phase, in order
        self.timings: list[tuple[str, float]] = []

    # -- API --
    def phase(self, name: str, total: float | None = None, note: str = "") -> "Progress":
        with self._lock:
            self._finish_phase_locked()
            self.name, self.total, self.current, self.note = name, total, None, note
            self.phase_started = time.monotonic()
            self._emit_locked(force=True)
        if not self.quiet and self._ticker is None:
            self._stop = threading.Event()
            self._ticker = threading.Thread(target=self._tick, args=(self._stop,), daemon=True)
            self._ticker.start()
        return self

    def update(self, done: float | None = None, total: float | None = None, note: str | None = None) -> None:
        with self._lock:
            if total is not None:
                self.total = total
            if done is not None:
                self.current = done
            if note is not None:
                self.note = note
            self._emit_locked()

    def log(self, message: str) -> None:
        """Print a standalone message line without disturbing the progress line."""
        if self.quiet:
            return
        with self._lock:
            self._write(f"[{self.label}] {message}", final=True)

    def done(self, message: str | None = None) -> None:
        with self._lock:
            self._finish_phase_locked()
            if message and not self.quiet:
                self._write(f"[{self.label}] {message} ({_fmt(time.monotonic() - self.started)})", final=True)
            elif self.tty and not self.quiet:
                self._write("", final=True)
            self.name = ""
        self._stop.set()
        self._ticker = None

    def elapsed(self) -> float:
        return time.monotonic() - self.phase_started

    def percent(self) -> float | None:
        if self.total and self.current is not None:
            return max(0.0, min(100.0, 100.0 * self.current / self.total))
        return None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.done()

    # -- internals --
    def _finish_phase_locked(self) -> None:
        if self.name:
            self.timings.append((self.name, time.monotonic() - self.phase_started))
            if self.tty and not self.quiet:
                self._write(self._line(), final=True)
            elif not self.quiet:
                self._write(f"{self._line()} done", final=True)

    def _line(self) -> str:
        parts = [f"[{self.label}] {self.name}", _fmt(self.elapsed())]
        pct = self.percent()
        if pct is not None:
            parts.append(f"{pct:3.0f}%")
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _emit_locked(self, force: bool = False) -> None:
        if self.quiet or not self.name:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last_print >= 0.2:
                self._write(self._line(), final=False)
                self._last_print = now
        elif force or now - self._last_print >= self.interval:
            self._write(self._line(), final=True)
            self._last_print = now

    def _write(self, text: str, final: bool) -> None:
        try:
            if self.tty:
                cols = shutil.get_terminal_size((100, 20)).columns
                self.stream.write("\r\033[K" + text[: cols - 1] + ("\n" if final and text else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must never break a build

    def _tick(self, stop: threading.Event) -> None:
        # keeps the clock moving on a TTY; elsewhere prints at most every `interval` seconds
        while not stop.wait(1.0):
            with self._lock:
                self._emit_locked(force=self.tty)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
