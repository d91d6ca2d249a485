"""Boots the lab VM (QEMU TCG, lab kernel, cached rootfs + per-run disk) and collects KTAP from its console.

Each boot chain runs a list of scenarios (one VM, real kexecs between stages); timeouts are per stage."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from luoagent.report import Progress
from luoagent.adapters import kexec
from luoagent.adapters.procfs import pid_alive
from luoagent.errors import KexecImageError, LabBootError, ScenarioFailed, UsageError
from luoagent.lab import cache, rootfs
from luoagent.lab.ktap import KtapStream, ScenarioResult, TestResult, to_junit
from luoagent.lab.scenarios import ScenarioInfo

BOOT_TIMEOUT = 120.0       # QEMU start / kexec -> the runner's "lab-boot" line
#: the same for the systemd flavour: an orderly shutdown and a systemd boot under TCG
SYSTEMD_BOOT_TIMEOUT = 300.0
BOOKKEEPING_TIMEOUT = 60.0  # between a stage's end and the next event (kexec load, finish)
EXIT_TIMEOUT = 30.0        # "lab-done" -> QEMU gone
TAIL_LINES = 50
CONSOLE_TIMES = "console-times.tsv"  # beside console.log: "SECONDS<TAB>line" per console line
KEEP_RUNS = 10


def kernel_cmdline(extra: str = "", flavour: str | None = None) -> str:
    fl = rootfs.flavour(flavour)
    base = (f"console=ttyS0 root=/dev/vda rw rootfstype=ext4 init={fl.init} "
            "liveupdate=on kho=on panic=-1")
    if fl.name == "systemd":
        # status lines only for errors, and no colours or terminal escapes (TERM reaches PID 1
        # from the command line): the KTAP stream stays readable, a failing unit still shows
        base += " systemd.show_status=error TERM=dumb"
    return f"{base} {extra}".strip()


ACCEL_ENV = "LUOAGENT_LAB_ACCEL"


def wanted_accelerator() -> str:
    """$LUOAGENT_LAB_ACCEL: tcg (default), auto (KVM if a probe boot proves it works), kvm (same probe)."""
    wanted = os.environ.get(ACCEL_ENV, "tcg").strip().lower() or "tcg"
    if wanted not in ("tcg", "auto", "kvm"):
        raise UsageError(f"${ACCEL_ENV}={wanted!r}: expected tcg, auto or kvm")
    return wanted


def kvm_capable() -> bool:
    """/dev/kvm present AND the CPU advertises vmx/svm. On these machines /dev/kvm exists
    without the flag: QEMU accepts -accel kvm and the guest dies at its first unusual
    instruction, so the device node alone proves nothing."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return os.access("/dev/kvm", os.R_OK | os.W_OK) and bool(re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M))


def qemu_argv(qemu: Path, kernel: Path, root_image: Path, run_image: Path, memory: str,
              cmdline: str, interactive: bool = False, accel: str = "tcg") -> list[str]:
    argv = [str(qemu), "-accel", accel, "-cpu", "max" if accel == "tcg" else "host",
            "-smp", "2", "-m", memory, "-no-reboot", "-nodefaults", "-vga", "none",
            "-display", "none", "-kernel", str(kernel), "-append", cmdline,
            # The cached image is never written: snapshot=on keeps writes in a temp overlay
            # that lives exactly as long as this QEMU process, i.e. across every kexec of the run.
            "-drive", f"file={root_image},if=virtio,format=raw,snapshot=on",
            "-drive", f"file={run_image},if=virtio,format=raw"]
    if interactive:
        argv += ["-serial", "mon:stdio"]
    else:
        argv += ["-serial", "stdio", "-monitor", "none"]
    return argv


# --- results -----------------------------------------------------------------------------
@dataclass
class LabResult:
    """What ``Lab.run`` returns: per-scenario KTAP results plus the raw console.

    ``ok``: every requested scenario finished and reported only ok results.
    ``scenarios``: name -> ScenarioResult (``.ok``, ``.tests`` [TestResult(number,
    description, ok, skipped, diag)], ``.test(description)``, ``.failed_tests``, ``.error``).
    ``console``: the whole serial console text; ``console_log``: its file; ``tail(n)``."""

    ok: bool
    scenarios: dict[str, ScenarioResult]
    console: str
    console_log: Path | None
    duration: float
    boots: int = 0
    errors: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join(self.console.splitlines()[-n:])

    def scenario(self, name: str) -> ScenarioResult:
        if name not in self.scenarios:
            raise KeyError(f"no scenario {name!r} in this lab run; ran: {', '.join(self.scenarios)}")
        return self.scenarios[name]

    def summary(self) -> str:
        lines = []
        for sc in self.scenarios.values():
            state = "ok" if sc.passed else "FAILED"
            lines.append(f"{sc.name}: {state} ({len(sc.tests)} tests, {len(sc.failed_tests)} failed)"
                         + (f" — {sc.error}" if sc.error else ""))
            for t in sc.failed_tests:
                lines.append(f"  not ok {t.number} {t.description}")
                lines.extend(f"    # {d}" for d in t.diag[:20])
        lines.extend(f"error: {e}" for e in self.errors)
        return "\n".join(lines)

    def require(self, scenario: str, description: str) -> None:
        """Raise ScenarioFailed unless ``scenario`` reported ``description`` ok (not skipped): its diagnostics
        and the console's last 60 lines say why (what every lab test file checks, by name)."""
        t = self.scenario(scenario).test(description)
        if not t.ok or t.skipped:  # a skipped check proved nothing
            raise ScenarioFailed(f"{scenario}: {description}: {'skipped' if t.skipped else 'not ok'}\n" + "\n".join(t.diag)
                                 + f"\n--- console tail ({self.console_log}) ---\n{self.tail(60)}")

    def assert_ok(self) -> "LabResult":
        """Raise ScenarioFailed (failures + the console's last lines) unless ``ok``."""
        if not self.ok:
            raise ScenarioFailed(f"lab run failed:\n{self.summary()}\n--- last {TAIL_LINES} console "
                                 f"lines ({self.console_log}) ---\n{self.tail()}")
        return self

    def to_json(self) -> dict:
        return {
            "ok": self.ok, "duration": round(self.duration, 2), "boots": self.boots,
            "console_log": str(self.console_log) if self.console_log else None,
            "errors": self.errors, "timings": {k: round(v, 2) for k, v in self.timings.items()},
            "scenarios": [{
                "name": s.name, "ok": s.passed, "error": s.error, "stages": s.stages_started,
                "stage_seconds": s.stage_seconds,
                "tests": [{"number": t.number, "description": t.description, "ok": t.ok,
                           "skipped": t.skipped, "diag": t.diag} for t in s.tests],
            } for s in self.scenarios.values()],
        }

    def junit(self) -> str:
        return to_junit(list(self.scenarios.values()))


# --- one boot chain ------------------------------------------------------------------------
@dataclass
class RunItem:
    """One scenario or kernel selftest the runner executes, as it appears in params.json."""
    kind: str                 # "scenario" | "selftest"
    name: str
    memory: str
    timeout: float
    module: str | None = None
    steps: list[dict] | None = None
    kernels: tuple[str, ...] | None = None      # kernel series per stage (scenario KERNELS)
    kernel_files: list[str] | None = None       # run-disk paths per stage, filled by Lab.run
    flavour: str = rootfs.DEFAULT_FLAVOUR        # rootfs flavour (FLAVOUR of the scenario)
    disk_spare_mb: int = 0                      # free space the stages write into on /lab

    def params(self) -> dict:
        d = {"kind": self.kind, "name": self.name}
        if self.module:
            d["module"] = self.module
        if self.kernel_files:
            d["kernels"] = self.kernel_files
        if self.steps:
            d["steps"] = self.steps
        return d

    @classmethod
    def from_scenario(cls, info: ScenarioInfo, timeout: float | None = None) -> "RunItem":
        return cls("scenario", info.name, info.memory, timeout or info.timeout, module=info.module,
                   kernels=info.kernels, flavour=info.flavour, disk_spare_mb=info.disk_spare_mb)


def new_run_dir() -> Path:
    runs = cache.cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    old = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in old[:-KEEP_RUNS]:
        if not _owner_alive(p.name):  # another lab run may still be using it
            shutil.rmtree(p, ignore_errors=True)
    d = runs / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    n = 0
    while d.exists():
        n += 1
        d = d.with_name(d.name.split("+")[0] + f"+{n}")
    d.mkdir()
    return d


def _owner_alive(run_name: str) -> bool:
    """Is the lab run that made directory ``run_name`` (…-PID[+n]) still running?"""
    pid = run_name.split("+")[0].rsplit("-", 1)[-1]
    return pid.isdigit() and pid_alive(int(pid))


def make_run_disk(run_dir: Path, *, kernel: Path, shim: Path, items: list[RunItem], debug: dict,
                  extra_dirs: dict[str, Path] | None = None, shell: bool = False,
                  flavour: str = rootfs.DEFAULT_FLAVOUR) -> Path:
    """Build the per-run ext4 disk: agent + shim, kexec kernel, params.json, extras (seconds)."""
    staging = run_dir / "disk"
    staging.mkdir()
    agent = staging / "agent"
    agent.mkdir()
    rootfs.stage_agent(agent, shim)
    shutil.copyfile(kernel, staging / "bzImage")
    (staging / "bin").mkdir()
    (staging / "bin/luoagent").write_text(
        "#!/usr/bin/python3\nimport sys\nsys.path.insert(0, '/lab/agent')\n"
        "from luoagent.cli import main\nsys.exit(main())\n")
    (staging / "bin/luoagent").chmod(0o755)
    for name, src in (extra_dirs or {}).items():
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, staging / name, symlinks=True)
        else:
            shutil.copyfile(src, staging / name)
            shutil.copymode(src, staging / name)
    params = {"items": [i.params() for i in items], "debug": debug, "kernel": "bzImage",
              "shell": shell, "created": time.time(), "flavour": flavour}
    (staging / "params.json").write_text(json.dumps(params, indent=1))
    # mke2fs makes a sparse image: spare space costs host disk only once a stage writes it
    size_mb = _dir_mb(staging) * 2 + 64 + max((i.disk_spare_mb for i in items), default=0)
    image = run_dir / "run.ext4"
    rootfs.make_ext4(staging, image, size_mb, label="luoagent-run", log=run_dir / "mke2fs.log")
    shutil.rmtree(staging, ignore_errors=True)
    return image


def _dir_mb(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total // (1 << 20) + 1


def _reader(stream, q: queue.Queue) -> None:
    """Console lines as (host monotonic arrival time, text): stamped here, as they arrive."""
    buf = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            q.put((time.monotonic(), line.decode(errors="replace").rstrip("\r")))
    if buf:
        q.put((time.monotonic(), buf.decode(errors="replace")))
    q.put(None)


def run_chain(*, qemu: Path, kernel: Path, root_image: Path, run_image: Path, items: list[RunItem],
              memory: str, console_log: Path, cmdline_extra: str = "",
              progress: Progress | None = None, echo=None, accel: str = "tcg",
              boot_timeout: float | None = None,
              flavour: str = rootfs.DEFAULT_FLAVOUR) -> tuple[KtapStream, list[str], list[str], dict]:
    """Boot one VM, run ``items`` through its kexec chain; returns (ktap, console lines, errors, timings).

    Raises LabBootError (with the console tail) if the runner never came up."""
    progress = progress or Progress(quiet=True)
    argv = qemu_argv(qemu, kernel, root_image, run_image, memory, kernel_cmdline(cmdline_extra, flavour),
                     accel=accel)
    hop_timeout = SYSTEMD_BOOT_TIMEOUT if flavour == "systemd" else BOOT_TIMEOUT
    boot_timeout = boot_timeout or hop_timeout
    (console_log.parent / "qemu-argv.json").write_text(json.dumps(argv, indent=1))
    timeouts = {i.name: i.timeout for i in items}
    ktap = KtapStream()
    lines: list[str] = []
    errors: list[str] = []
    timings: dict[str, float] = {}
    events: list[tuple[float, str, str]] = []
    started = time.monotonic()
    progress.log(f"booting lab VM ({memory}, {accel}): {', '.join(i.name for i in items) or 'no items'}")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    except OSError as exc:
        raise LabBootError(f"cannot start the lab QEMU {qemu}: {exc}") from exc
    q: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
    waiting_for = "the lab kernel to boot and start the runner"
    deadline = started + boot_timeout
    booted = False
    stage_name = ""
    try:
        # every console line with the host's monotonic arrival time (s from QEMU start): a clock
        # that runs on across the VM's kexecs, for time lines that span them (benchmarks)
        with open(console_log, "w", buffering=1) as log, \
                open(console_log.with_name(CONSOLE_TIMES), "w", buffering=1) as times:
            while True:
                try:
                    line = q.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
                except queue.Empty:
                    if time.monotonic() > deadline:
                        if ktap.done:
                            break  # everything reported; a QEMU slow to exit is just killed
                        errors.append(f"timed out after {time.monotonic() - started:.0f}s waiting for "
                                      f"{waiting_for}")
                        break
                    continue
                if line is None:
                    break
                arrived, line = line
                log.write(line + "\n")
                times.write(f"{arrived - started:.6f}\t{line}\n")
                lines.append(line)
                if echo:
                    echo(line)
                marker = ktap.feed(line)
                if marker is None:
                    continue
                now = time.monotonic()
                events.append((round(now - started, 3), marker.kind, marker.rest))
                if marker.kind == "lab-boot":
                    if not booted:
                        timings["first_boot"] = now - started
                    booted = True
                    waiting_for = "the runner's next step"
                    deadline = now + BOOKKEEPING_TIMEOUT
                elif marker.kind == "lab-stage":
                    stage_name = marker.rest.split(" ")[0]
                    limit = timeouts.get(stage_name, hop_timeout)
                    waiting_for = f"stage {marker.rest.split(' ')[1]} of {stage_name} ({limit:.0f}s limit)"
                    deadline = now + limit
                    progress.update(note=f"{stage_name} stage {marker.rest.split(' ')[1]}")
                elif marker.kind == "lab-stage-done":
                    waiting_for = "the runner after a stage"
                    deadline = now + BOOKKEEPING_TIMEOUT
                elif marker.kind == "lab-kexec":
                    waiting_for = "the kexec'd kernel to boot and start the runner"
                    deadline = now + hop_timeout
                    progress.update(note=f"kexec {marker.rest.split(' ')[0]}")
                elif marker.kind == "lab-done":
                    waiting_for = "QEMU to exit after the runner finished"
                    deadline = now + EXIT_TIMEOUT
                elif marker.kind == "lab-error":
                    errors.append(f"runner: {marker.rest}")
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.wait()
    timings["total"] = time.monotonic() - started
    # kexec -> runner up again, as seen from the host (the lab's per-hop cost)
    hops = []
    for i, (t_kexec, kind, _rest) in enumerate(events):
        if kind == "lab-kexec":
            t_boot = next((t for t, k, _r in events[i + 1:] if k == "lab-boot"), None)
            if t_boot is not None:
                hops.append(t_boot - t_kexec)
    if hops:
        timings["kexec_to_runner_avg"] = sum(hops) / len(hops)
    (console_log.parent / "events.json").write_text(json.dumps(events, indent=0))
    if not ktap.done and proc.returncode not in (None, 0) and not errors:
        errors.append(f"QEMU exited with status {proc.returncode} before the runner finished")
    elif not ktap.done and not any("timed out" in e for e in errors):
        errors.append("the lab VM stopped before the runner finished (kernel panic or runner crash?)")
    if not booted:
        tail = "\n".join(lines[-TAIL_LINES:])
        raise LabBootError(f"the lab VM never started its runner: {'; '.join(errors)}\n"
                           f"--- last {TAIL_LINES} console lines ({console_log}) ---\n{tail}")
    return ktap, lines, errors, timings


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if we die, so no orphaned TCG VM keeps burning CPU."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass


def bzimage_release(path: Path) -> str:
    """The kernel release a bzImage announces in its setup header (e.g. "7.2.13")."""
    try:
        return kexec.bzimage_version(path).split(" ", 1)[0]
    except KexecImageError as exc:
        raise LabBootError(str(exc)) from None


def group_by_memory(items: list[RunItem]) -> list[tuple[str, list[RunItem]]]:
    """Consecutive runs of equal MEMORY and flavour share one VM boot chain, order preserved."""
    groups: list[tuple[str, list[RunItem]]] = []
    for item in items:
        if groups and groups[-1][0] == item.memory and groups[-1][1][0].flavour == item.flavour:
            groups[-1][1].append(item)
        else:
            groups.append((item.memory, [item]))
    return groups


def merge(items: list[RunItem], chains: list[tuple[KtapStream, list[str], list[str], dict]],
          console_log: Path | None, duration: float) -> LabResult:
    scenarios: dict[str, ScenarioResult] = {}
    console: list[str] = []
    errors: list[str] = []
    timings: dict[str, float] = {}
    boots = 0
    for n, (ktap, lines, errs, tim) in enumerate(chains):
        console.extend(lines)
        errors.extend(errs)
        boots += sum(1 for ln in lines if "# lab-boot:" in ln)
        for k, v in tim.items():
            timings[f"{k}" if n == 0 else f"{k}.{n}"] = v
        for sc in ktap.scenarios:
            scenarios[sc.name] = sc
        for sc in ktap.scenarios:
            if sc.ok is None:
                sc.error = sc.error or ("; ".join(errs) or "the scenario never finished")
            elif sc.plan is not None and sc.plan != len(sc.tests):
                sc.ok = False
                sc.error = (f"plan says {sc.plan} results, the host saw {len(sc.tests)} "
                            "(console output lost or garbled)")
    for item in items:
        if item.name not in scenarios:
            scenarios[item.name] = ScenarioResult(
                name=item.name, ok=None, error="never started: " + ("; ".join(errors) or "unknown"))
    ordered = {i.name: scenarios[i.name] for i in items}
    ok = all(sc.passed for sc in ordered.values()) and not errors
    return LabResult(ok=ok, scenarios=ordered, console="\n".join(console), console_log=console_log,
                     duration=duration, boots=boots, errors=errors, timings=timings)


__all__ = ["LabResult", "RunItem", "ScenarioResult", "TestResult", "run_chain", "make_run_disk",
           "qemu_argv", "kernel_cmdline", "group_by_memory", "merge", "new_run_dir"]
