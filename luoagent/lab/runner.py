"""In-VM lab runner (started by the init on every boot): runs the next scenario stage, kexecs, repeats.

Progress lives in /lab/state.json on the run disk, so each kexec'd boot continues where the last stopped; results go to the serial console as KTAP."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

RUN_DIR = Path("/lab")
PARAMS = RUN_DIR / "params.json"
STATE = RUN_DIR / "state.json"
INDENT = "    "
_CHILD_RESULT = re.compile(r"^(?P<status>not ok|ok) \d+ (?P<desc>.*)$")


def emit(line: str) -> None:
    # One write per line keeps kernel messages from landing inside our lines most of the time.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


class Runner:
    def __init__(self) -> None:
        self.params = json.loads(PARAMS.read_text())
        if STATE.exists():
            self.state = json.loads(STATE.read_text())
        else:
            self.state = {"boots": 0, "index": 0, "stage": 0, "scenarios": {}}
        self.state["boots"] += 1
        self.hop = self.state["boots"] - 1
        self.boot_id = _read("/proc/sys/kernel/random/boot_id", "unknown")
        self.items = self.params["items"]   # [{"kind": "scenario"|"selftest", "name", ...}]
        self.debug = self.params.get("debug", {})
        self.save()

    def save(self) -> None:
        _write_json(STATE, self.state)

    # -- the boot chain --
    def run(self) -> None:
        if self.hop == 0:
            emit("KTAP version 1")
            emit(f"1..{len(self.items)}")
        emit(f"# lab-boot: boot={self.state['boots']} hop={self.hop} kernel={os.uname().release} "
             f"boot_id={self.boot_id} uptime={_read('/proc/uptime').split(' ')[0]}")
        if self.hop:
            _diag_kho()
        while self.state["index"] < len(self.items):
            item = self.items[self.state["index"]]
            if item["kind"] == "selftest":
                self.run_selftest(item)
            else:
                self.run_scenario_step(item)
        emit(f"# lab-done: boots={self.state['boots']} kexecs={self.hop}")

    def _sc_state(self, name: str) -> dict:
        return self.state["scenarios"].setdefault(
            name, {"data": {}, "tests": 0, "failed": 0, "started": False, "aborted": False})

    def run_scenario_step(self, item: dict) -> None:
        """Run one stage of the current scenario (or finish it); may kexec and not return."""
        name = item["name"]
        number = self.state["index"] + 1
        sc = self._sc_state(name)
        if not sc["started"]:
            sc["started"] = True
            self.save()
            emit(INDENT + "KTAP version 1")
            emit(INDENT + f"# Subtest: {name}")
        try:
            from luoagent.lab import scenarios

            stage_fns = list(scenarios.load(item["module"]).stages())
        except Exception:
            self._record(sc, False)
            emit(INDENT + f"not ok {sc['tests']} scenario {name} loads")
            for line in traceback.format_exc().splitlines():
                emit(INDENT + "# " + line)
            stage_fns = []
            sc["aborted"] = True
        k = self.state["stage"]
        if sc["aborted"] or k >= len(stage_fns):
            self.finish_scenario(name, number, sc)
            return
        # Progress first: if the stage kexecs by itself, the next boot runs stage k+1.
        self.state["stage"] = k + 1
        self.save()
        ctx = self._context(name, sc, k, len(stage_fns))
        emit(INDENT + f"# lab-stage: {name} {k + 1}/{len(stage_fns)} hop={self.hop}")
        started = time.monotonic()
        try:
            stage_fns[k](ctx)
        except Exception as exc:
            ctx.not_ok(f"stage {k + 1} ({getattr(stage_fns[k], '__name__', '?')}) completes",
                       f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            sc["aborted"] = True
        emit(INDENT + f"# lab-stage-done: {name} {k + 1}/{len(stage_fns)} "
             f"seconds={time.monotonic() - started:.2f}")
        self.save()
        if not sc["aborted"] and k + 1 < len(stage_fns):
            self.kexec(keep=ctx.keep)
        # Last (or failed) stage: nothing it kept may leak into the next scenario's kernel.
        _release(ctx.keep)

    def finish_scenario(self, name: str, number: int, sc: dict) -> None:
        emit(INDENT + f"1..{sc['tests']}")
        ok = sc["failed"] == 0 and sc["tests"] > 0 and not sc["aborted"]
        if sc["tests"] == 0:
            emit(INDENT + "# no results reported: a scenario must report at least one test")
        emit(("ok" if ok else "not ok") + f" {number} {name}")
        self.state["index"] += 1
        self.state["stage"] = 0
        self.save()
        if self.state["index"] < len(self.items):
            self.kexec(keep=[])  # every scenario starts in a fresh kernel

    def _record(self, sc: dict, passed: bool) -> int:
        sc["tests"] += 1
        if not passed:
            sc["failed"] += 1
        self.save()
        return sc["tests"]

    def _context(self, name: str, sc: dict, k: int, count: int):
        from luoagent.lab.stage import PersistentState, StageContext

        def save_data() -> None:
            self.save()

        # The PersistentState itself sits in the state tree, so every save writes its latest content.
        state = PersistentState(sc["data"], save_data)
        sc["data"] = state
        holder: dict = {}

        def record(passed: bool) -> int:
            return self._record(sc, passed)

        def kexec() -> None:
            save_data()
            self.kexec(keep=holder["ctx"].keep)

        ctx = StageContext(scenario=name, stage=k, stages=count, hop=self.hop, boot_id=self.boot_id,
                           state=state, debug=self.debug, emit=lambda s: emit(INDENT + s),
                           record=record, kexec=kexec, save=save_data)
        ctx.run_dir = RUN_DIR
        ctx.next_kernel = Path(self.next_kernel())  # what ctx.kexec() (and the runner) boots next
        holder["ctx"] = ctx
        return ctx

    # -- kernel selftests from the kernel source (built on the host by selftests.py) --
    def run_selftest(self, item: dict) -> None:
        name = item["name"]
        number = self.state["index"] + 1
        sc = self._sc_state("selftest:" + name)
        steps = item.get("steps") or [{"argv": item["argv"]}]
        k = self.state["stage"]
        if not sc["started"]:
            sc["started"] = True
            self.save()
            emit(INDENT + "KTAP version 1")
            emit(INDENT + f"# Subtest: {name}")
        if k >= len(steps) or sc["aborted"]:
            self.finish_scenario(name, number, sc)
            return
        self.state["stage"] = k + 1
        self.save()
        step = steps[k]
        argv = [str(RUN_DIR / a) if a.startswith("selftests/") else a for a in step["argv"]]
        emit(INDENT + f"# lab-stage: {name} {k + 1}/{len(steps)} hop={self.hop}")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=str(Path(argv[0]).parent), text=True, errors="replace")
            for line in proc.stdout:
                line = line.rstrip("\n")
                m = _CHILD_RESULT.match(line)
                if m:  # the selftest's own KTAP result: one of ours, so it shows per test
                    passed = m["status"] == "ok"
                    n = self._record(sc, passed)
                    emit(INDENT + f"{m['status']} {n} {name}: {m['desc'].strip()}")
                else:
                    emit(INDENT + "# " + line)
            rc = proc.wait()
        except OSError as exc:
            rc = None
            emit(INDENT + f"# cannot run {argv}: {exc}")
        n = self._record(sc, rc == 0)
        emit(INDENT + ("ok" if rc == 0 else "not ok") + f" {n} {' '.join(step['argv'])} exit={rc}")
        if rc != 0:
            sc["aborted"] = True
        emit(INDENT + f"# lab-stage-done: {name} {k + 1}/{len(steps)} seconds={time.monotonic() - started:.2f}")
        self.save()
        if rc == 0 and step.get("kexec_after"):
            self.kexec(keep=[])

    # -- kexec --
    def next_kernel(self) -> str:
        """The kernel the next step must run on: its scenario's KERNELS entry, else the lab kernel."""
        index, stage = self.state["index"], self.state["stage"]
        if index < len(self.items):
            kernels = self.items[index].get("kernels") or []
            if stage < len(kernels) and kernels[stage]:
                return str(RUN_DIR / kernels[stage])
        return str(RUN_DIR / self.params.get("kernel", "bzImage"))

    def kexec(self, keep: list) -> None:
        kernel = self.next_kernel()
        cmdline = _read("/proc/cmdline")
        self.save()
        emit(f"# lab-kexec: hop={self.hop} -> {self.hop + 1} kernel={kernel}")
        os.sync()
        from luoagent.adapters import kexec

        under_systemd = self.params.get("flavour") == "systemd"
        via = "systemctl kexec" if under_systemd else "reboot(LINUX_REBOOT_CMD_KEXEC)"
        emit(f"# lab-kexec-via: luoagent.adapters.kexec (kexec_file_load) {kernel}, then {via}")
        t0 = time.monotonic()
        kexec.load(Path(kernel), None, cmdline)
        emit(f"# lab-kexec-loaded: seconds={time.monotonic() - t0:.2f}")
        if under_systemd:
            systemctl_kexec()
        else:
            kexec.reboot_kexec()
        raise RuntimeError(f"kexec returned (still holding {len(keep)} kept objects)")


#: how long the runner waits for systemd's shutdown to stop it after `systemctl kexec`
SHUTDOWN_WAIT = 300.0


def systemctl_kexec() -> None:
    """Ask systemd for the orderly kexec (image already loaded) and wait to be stopped by it."""
    # said before the call: systemd's shutdown may stop this unit before systemctl returns
    emit("# lab-shutdown: systemctl kexec")
    done = subprocess.run(["systemctl", "kexec"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"systemctl kexec failed (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()}")
    time.sleep(SHUTDOWN_WAIT)  # systemd's SIGTERM ends this process on the way to the kexec
    raise RuntimeError(f"systemctl kexec was accepted but systemd did not stop the runner in "
                       f"{SHUTDOWN_WAIT:.0f} s")


def _release(keep: list) -> None:
    """Close what a finished stage kept: sessions (close/finish) first, then plain fds."""
    for obj in reversed(keep):
        try:
            if isinstance(obj, int):
                os.close(obj)
            elif hasattr(obj, "close"):
                obj.close()
        except Exception as exc:  # report, but never let cleanup hide the stage's results
            emit(INDENT + f"# lab: closing kept {type(obj).__name__} failed: {exc}")
    keep.clear()


def _diag_kho() -> None:
    """Show the kernel's own word that this boot came through a KHO kexec."""
    try:
        with open("/dev/kmsg", "rb", buffering=0) as kmsg:
            os.set_blocking(kmsg.fileno(), False)
            while True:
                try:
                    rec = kmsg.read(8192)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                if not rec:
                    break
                text = rec.decode(errors="replace").split(";", 1)[-1].strip()
                if "KHO: exec from" in text or "liveupdate number" in text:
                    emit(f"# kernel: {text}")
    except OSError:
        pass


def shell() -> None:
    """``luoagent lab shell``: a login shell on the serial port (job control needs a real tty)."""
    emit("# lab-shell: root shell on ttyS0; the agent is importable (luoagent on PATH); "
         "`exit` powers the VM off")
    with open("/dev/ttyS0", "r+b", buffering=0) as tty:
        subprocess.run(["setsid", "-c", "/bin/bash", "-i"], stdin=tty, stdout=tty, stderr=tty)


def main() -> None:
    # Subprocesses (e.g. `python3 -m luoagent` from a stage) must find the agent too.
    os.environ["PYTHONPATH"] = str(RUN_DIR / "agent")
    os.environ["PATH"] = f"{RUN_DIR / 'bin'}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    try:
        import socket

        socket.sethostname("luoagent-lab")
    except OSError:
        pass
    try:
        if json.loads(PARAMS.read_text()).get("shell"):
            shell()
            return
    except (OSError, ValueError):
        pass
    try:
        runner = Runner()
    except Exception:
        emit("# lab-error: cannot read the run parameters")
        for line in traceback.format_exc().splitlines():
            emit("# " + line)
        return
    try:
        runner.run()
    except Exception:
        emit("# lab-error: the runner failed")
        for line in traceback.format_exc().splitlines():
            emit("# " + line)
