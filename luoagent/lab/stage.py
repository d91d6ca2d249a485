"""StageContext: what a lab scenario stage gets inside the VM (results, persisted state, kexec).

The runner (runner.py) creates one per stage; scenarios never print KTAP themselves."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any


class PersistentState(dict):
    """A scenario's ``ctx.state``: a JSON-able dict saved on the run disk on every top-level
    assignment/deletion, at ``ctx.kexec()`` and after each stage — so it survives a kexec the
    stage triggers itself. Mutating a nested value in place is saved at the next of those
    points (or call ``ctx.save()``)."""

    def __init__(self, data: dict, save: Callable[[], None]):
        super().__init__(data)
        self._save = save

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._save()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._save()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._save()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, *args):
        value = super().pop(*args)
        self._save()
        return value


def _one_line(text: str) -> str:
    # KTAP: a description is one line and must not look like a directive ("# SKIP").
    return " ".join(str(text).split()).replace("#", "\\#") or "(no description)"


class StageContext:
    """The contract between the lab runner and scenario stages (docs/lab.md "Scenarios").

    Attributes: ``state`` (PersistentState), ``debug`` (dict of host --debug switches),
    ``stage`` (0-based index), ``stages`` (count), ``hop`` (kexecs so far in this run),
    ``boot_id`` (this boot's /proc/sys/kernel/random/boot_id), ``scenario`` (NAME),
    ``keep`` (objects — LUO sessions, fds — the runner holds until it kexecs), ``run_dir``
    (Path("/lab"), the per-run disk: bzImage, agent/, guest/), ``next_kernel`` (Path the next
    kexec boots). A scenario may set ``KERNELS = ("7.2", "7.3")``: the series each stage runs on."""

    def __init__(self, *, scenario: str, stage: int, stages: int, hop: int, boot_id: str,
                 state: PersistentState, debug: dict, emit: Callable[[str], None],
                 record: Callable[[bool], int], kexec: Callable[[], None],
                 save: Callable[[], None]):
        self.scenario = scenario
        self.stage = stage
        self.stages = stages
        self.hop = hop
        self.boot_id = boot_id
        self.state = state
        self.debug = dict(debug)
        self.keep: list[Any] = []
        self._emit = emit
        self._record = record
        self._kexec = kexec
        self._save = save
        self.failures = 0
        #: the run disk (/lab: bzImage, agent/, guest/, params.json, state.json)
        self.run_dir = None
        #: the kernel the runner's kexec boots next (the lab kernel unless the scenario's KERNELS says otherwise)
        self.next_kernel = None

    @property
    def last_stage(self) -> bool:
        return self.stage == self.stages - 1

    # -- results --
    def ok(self, desc: str) -> bool:
        n = self._record(True)
        self._emit(f"ok {n} {_one_line(desc)}")
        return True

    def not_ok(self, desc: str, diag: str = "") -> bool:
        n = self._record(False)
        self.failures += 1
        self._emit(f"not ok {n} {_one_line(desc)}")
        for line in str(diag).splitlines():
            self.diag(line)
        return False

    def skip(self, desc: str, reason: str) -> None:
        n = self._record(True)
        self._emit(f"ok {n} {_one_line(desc)} # SKIP {_one_line(reason)}")

    def check(self, cond: Any, desc: str, diag: str = "") -> bool:
        return self.ok(desc) if cond else self.not_ok(desc, diag)

    def expect_raises(self, exc_type: type[BaseException] | tuple, fn: Callable[[], Any], desc: str,
                      errno: int | None = None, match: str | None = None) -> BaseException | None:
        """ok if ``fn()`` raises ``exc_type`` (with ``.errno == errno`` and ``str`` matching the
        regex ``match`` when given); returns the exception, or None after reporting not ok."""
        try:
            value = fn()
        except exc_type as exc:
            problems = []
            if errno is not None and getattr(exc, "errno", None) != errno:
                problems.append(f"errno {getattr(exc, 'errno', None)!r}, expected {errno}")
            if match is not None and not re.search(match, str(exc)):
                problems.append(f"message {str(exc)!r} does not match {match!r}")
            if problems:
                self.not_ok(desc, f"raised {type(exc).__name__}: " + "; ".join(problems))
                return None
            self.ok(desc)
            return exc
        except Exception as exc:  # the wrong exception is a failure with its traceback
            self.not_ok(desc, f"expected {_names(exc_type)}, got {type(exc).__name__}: {exc}\n"
                        + traceback.format_exc())
            return None
        self.not_ok(desc, f"expected {_names(exc_type)}, nothing was raised (returned {value!r})")
        return None

    def diag(self, msg: str) -> None:
        for line in str(msg).splitlines() or [""]:
            self._emit(f"# {line}")

    # -- control --
    def save(self) -> None:
        """Write ``state`` to the run disk now (after nested in-place changes)."""
        self._save()

    def kexec(self) -> None:
        """Save state, then kexec into the lab kernel (kexec_file_load + reboot). Does not return."""
        self._kexec()


def _names(exc_type) -> str:
    if isinstance(exc_type, tuple):
        return " or ".join(t.__name__ for t in exc_type)
    return exc_type.__name__
