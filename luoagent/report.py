"""The one progress reporter of every command (update, restore, lab build, ...): human lines on
stderr, one line rewritten in place on a TTY, or JSON lines when `--log-format json` is chosen.

stdout stays free for results (`--json`); `log.configure` selects the format for the process."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone

#: "human" (default) or "json"; set once per process by log.configure(--log-format)
_format = "human"


def set_format(fmt: str) -> None:
    """``json`` makes every reporter emit JSON lines; anything else gives human lines."""
    global _format
    _format = "json" if fmt == "json" else "human"


def json_lines() -> bool:
    return _format == "json"


class Progress:
    """Reports a command's steps on stderr, prefixed ``[label]``.

    Long steps: ``phase(name, total=None)``, ``update(done=..., note=...)``, ``done(msg)``:
    ``[lab] compile  1m23s  45%  note``; on a TTY one line is rewritten in place every second,
    elsewhere a line is printed on each phase change and then every ``interval`` seconds (a
    background ticker, so a long step with no updates still shows it is alive).
    Short timed steps: ``with timed(name):`` prints ``[label] name ...`` and ``done in S s``
    (or ``FAILED after S s``) and records ``steps``; ``log(text)`` and ``note(text)`` print one
    line. ``quiet=True`` prints nothing (timings are still kept). With JSON lines each of these
    is one JSON object with ``event`` = progress and the same facts as fields."""

    def __init__(self, label: str = "lab", *, stream=None, tty: bool | None = None,
                 interval: float = 15.0, quiet: bool = False):
        self.label = label
        self._stream = stream
        self.json = json_lines() and stream is None
        self.tty = (self.stream.isatty() if tty is None else tty) and not self.json
        self.interval = interval
        self.quiet = quiet
        self.name = ""
        self.total: float | None = None
        self.current: float | None = None
        self.note_text = ""
        self.started = time.monotonic()
        self.phase_started = self.started
        self._last_print = 0.0
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        #: (phase, seconds) for each finished long phase, in order
        self.timings: list[tuple[str, float]] = []
        #: {"phase", "seconds", "ok"} for each timed() step, in order
        self.steps: list[dict] = []

    @property
    def stream(self):
        # resolved at each write: pytest's capture and the lab runner swap sys.stderr
        return self._stream if self._stream is not None else sys.stderr

    # -- long phases --
    def phase(self, name: str, total: float | None = None, note: str = "") -> "Progress":
        with self._lock:
            self._finish_phase_locked()
            self.name, self.total, self.current, self.note_text = name, total, None, note
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
                self.note_text = note
            self._emit_locked()

    def done(self, message: str | None = None) -> None:
        with self._lock:
            self._finish_phase_locked()
            if message and not self.quiet:
                self._write(f"[{self.label}] {message} ({_fmt(time.monotonic() - self.started)})", final=True,
                            fields={"message": message, "elapsed_s": round(time.monotonic() - self.started, 3)})
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

    # -- single lines and short timed steps --
    def log(self, message: str) -> None:
        """One standalone line, ``[label] message``, without disturbing a progress line."""
        if not self.quiet:
            with self._lock:
                self._write(f"[{self.label}] {message}", final=True, fields={"message": message})

    def echo(self, text: str) -> None:
        """``text`` as it is, no prefix (console lines, log tails)."""
        if not self.quiet:
            with self._lock:
                self._write(text, final=True, fields={"message": text})

    def note(self, text: str) -> None:
        """A detail line under the current step, ``[label]   text``."""
        if not self.quiet:
            with self._lock:
                self._write(f"[{self.label}]   {text}", final=True, fields={"note": text})

    @contextlib.contextmanager
    def timed(self, name: str, detail: str = "") -> Iterator[None]:
        """Time one step: ``[label] name detail ...`` then ``done in S s`` / ``FAILED after S s``."""
        start = time.monotonic()
        if not self.quiet:
            with self._lock:
                self._write(f"[{self.label}] {name}{(' ' + detail) if detail else ''} ...", final=True,
                            fields={"step": name, "state": "started", **({"detail": detail} if detail else {})})
        try:
            yield
        except BaseException:
            self._step_end(name, start, ok=False)
            raise
        self._step_end(name, start, ok=True)

    def _step_end(self, name: str, start: float, ok: bool) -> None:
        secs = time.monotonic() - start
        self.steps.append({"phase": name, "seconds": round(secs, 4), "ok": ok})
        if self.quiet:
            return
        text = f"done in {secs:.3f} s" if ok else f"FAILED after {secs:.3f} s"
        with self._lock:
            self._write(f"[{self.label}] {name} {text}", final=True,
                        fields={"step": name, "state": "done" if ok else "failed", "seconds": round(secs, 4)})

    # -- internals --
    def _finish_phase_locked(self) -> None:
        if self.name:
            self.timings.append((self.name, time.monotonic() - self.phase_started))
            if self.quiet:
                return
            if self.tty:
                self._write(self._line(), final=True)
            else:
                self._write(f"{self._line()} done", final=True, fields=self._phase_fields("done"))

    def _line(self) -> str:
        parts = [f"[{self.label}] {self.name}", _fmt(self.elapsed())]
        pct = self.percent()
        if pct is not None:
            parts.append(f"{pct:3.0f}%")
        if self.note_text:
            parts.append(self.note_text)
        return "  ".join(parts)

    def _phase_fields(self, state: str) -> dict:
        fields = {"phase": self.name, "state": state, "elapsed_s": round(self.elapsed(), 1)}
        pct = self.percent()
        if pct is not None:
            fields["percent"] = round(pct, 1)
        if self.note_text:
            fields["note"] = self.note_text
        return fields

    def _emit_locked(self, force: bool = False) -> None:
        if self.quiet or not self.name:
            return
        now = time.monotonic()
        if self.tty:
            if force or now - self._last_print >= 0.2:
                self._write(self._line(), final=False)
                self._last_print = now
        elif force or now - self._last_print >= self.interval:
            self._write(self._line(), final=True, fields=self._phase_fields("running"))
            self._last_print = now

    def _write(self, text: str, final: bool, fields: dict | None = None) -> None:
        try:
            if self.json:
                if fields is None:
                    return  # a TTY-only repaint: nothing to say in JSON
                doc = {"timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                       "level": "info", "event": "progress", "label": self.label, **fields}
                self.stream.write(json.dumps(doc) + "\n")
            elif self.tty:
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


def echo(label: str, text: str) -> None:
    """``text`` as it is on stderr (console lines, a log tail, an error), or one JSON line."""
    Progress(label).echo(text)
