"""Workflow `luoagent vm upgrade`: replace the QEMU process under a running guest on the same host,
RAM in place (the new process inherits the same memfds at the same fd numbers), device state moved.

Mechanisms: ``handoff`` (new QEMU started beside the old, state over a unix socket, milliseconds of
pause) and ``sequential`` (cpr-reboot checkpoint, old quits, new loads). docs/architecture.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from luoagent import log, memfd, testmode
from luoagent.adapters import cpr, handoff, procfs, qemu_argv, qemu_binary, qemu_ram, qmp_client, systemctl
from luoagent.adapters.qmp_client import Qmp, event_time_ns
from luoagent.errors import LuoAgentError, QemuError, QmpUnreachable, UpgradeError, UsageError
from luoagent.report import Progress
from luoagent.workflows import vm as vmwf

logger = log.get_logger(__name__)

MECHANISMS = ("auto", "handoff", "sequential")
#: unix socket paths are limited to 108 bytes including the NUL (sockaddr_un)
_SUN_PATH_MAX = 107
#: fdsets the sequential mechanism uses for the checkpoint (save on the old, load on the new)
_SAVE_FDSET, _LOAD_FDSET = 41, 42
#: seconds the test fault `upgrade-hold` keeps the migration in pre-switchover
_HOLD_S = 30.0


@dataclass
class Target:
    """A VM to upgrade: one from `vm start` (``record``) or one adopted by its QMP socket."""

    name: str
    qmp_socket: Path
    record: vmwf.VmRecord | None = None


@dataclass
class Outcome:
    name: str
    ok: bool = False
    mechanism: str = ""
    old_pid: int = 0
    new_pid: int = 0
    old_qemu: str = ""
    new_qemu: str = ""
    old_version: str = ""
    new_version: str = ""
    machine: str = ""
    was_running: bool = True
    guest_ram_bytes: int = 0
    bytes_moved: int = 0
    #: guest pause from QEMU's own events: STOP on the old process -> RESUME on the new one
    pause_ms: float | None = None
    #: what QEMU itself reports as downtime (query-migrate), for comparison
    qemu_downtime_ms: float | None = None
    total_s: float = 0.0
    error: str | None = None
    steps: dict = field(default_factory=dict)


def resolve_targets(specs: list[str], all_vms: bool, root) -> list[Target]:
    """``NAME`` (a VM of the VM root) or ``NAME=QMP_SOCKET`` (an adopted QEMU); ``all_vms``:
    every VM in the VM root."""
    if all_vms and specs:
        raise UsageError("give VM names or --all, not both")
    if all_vms:
        records = vmwf.list_records(root)
        if not records:
            raise UsageError(f"no VMs under {vmwf.vm_root(root)}; nothing to upgrade")
        return [Target(r.name, Path(r.qmp_socket), r) for r in records]
    if not specs:
        raise UsageError("name the VM(s) to upgrade, or pass --all")
    targets = []
    for spec in specs:
        name, sep, sock = spec.partition("=")
        vmwf.validate_name(name)
        if sep:
            if not sock:
                raise UsageError(f"{spec!r}: give NAME=QMP_SOCKET with the QEMU's QMP socket path")
            targets.append(Target(name, Path(sock)))
        else:
            record = vmwf.load_record(name, root)
            targets.append(Target(name, Path(record.qmp_socket), record))
    return targets


def upgrade(target: Target, *, qemu: str | None = None, mechanism: str = "auto",
            timeout: float = 30.0, progress: Progress | None = None,
            before_retire: Callable[[int, int], None] | None = None) -> Outcome:
    """Move ``target``'s guest into a new QEMU process (``qemu`` or the VM's own binary).

    Before the switch any failure leaves the old QEMU running as it was and the new one gone;
    after it the old QEMU is retired only once the new one runs the guest.
    ``before_retire(new_pid, old_pid)``: called (handoff) once the new QEMU runs the guest and
    the old one still exists, e.g. for a supervisor to announce the new main PID
    (sd_notify MAINPID=) before the old process exits."""
    batch = UpgradeBatch([target], qemu=qemu, mechanism=mechanism, timeout=timeout, progress=progress,
                         before_retire=before_retire)
    qmp_client.run_sync(batch.run_guarded())
    return batch.outcomes[0]


class UpgradeBatch:
    """`vm upgrade` of one or more VMs, one after another: the daemon's job (operation
    vm-upgrade) or the CLI's own run. A signal (``interrupt``) before a VM's new QEMU runs its
    guest rolls that VM back and ends the batch; after it, the VM's upgrade is finished first."""

    def __init__(self, targets: list[Target], *, qemu: str | None = None, mechanism: str = "auto",
                 timeout: float = 30.0, progress: Progress | None = None, raise_single: bool = True,
                 before_retire: Callable[[int, int], None] | None = None):
        if mechanism not in MECHANISMS:
            raise UsageError(f"--mechanism {mechanism!r}: choose one of {', '.join(MECHANISMS)}")
        self.targets = targets
        self.qemu, self.mechanism, self.timeout = qemu, mechanism, timeout
        self.progress = progress or Progress("upgrade")
        self.raise_single = raise_single  # one VM: its failure is the command's error
        self.before_retire = before_retire
        self.outcomes: list[Outcome] = []
        self.current: _Upgrade | None = None
        self.caught: int | None = None
        self.step = "preflight"
        self.rolling_back = False

    @classmethod
    def from_request(cls, req: dict, progress: Progress | None = None) -> "UpgradeBatch":
        """The batch a `vm upgrade` request (vm.request_from) asks for."""
        try:
            targets = resolve_targets([str(n) for n in req.get("names") or []], bool(req.get("all")), req["root"])
            return cls(targets, qemu=req.get("qemu"), mechanism=str(req.get("mechanism") or "auto"),
                       timeout=float(req.get("timeout") or 30.0), progress=progress,
                       raise_single=bool(req.get("raise_single", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"vm upgrade request is missing or has a bad field: {exc}") from None

    def interrupt(self, sig: int, task: asyncio.Task) -> None:
        if self.caught is None:
            self.caught = sig
        if self.current is not None and not self.current.committed:
            self.rolling_back = True
            task.cancel()

    def held_sessions(self) -> list[str]:
        return []  # an upgrade makes no LUO session

    def status_vms(self) -> list[dict]:
        done = {o.name: o for o in self.outcomes}
        return [{"name": t.name, "qmp_socket": str(t.qmp_socket),
                 "upgrade": ("done" if done[t.name].ok else "failed") if t.name in done
                 else "running" if self.current is not None and self.current.t is t else "waiting"}
                for t in self.targets]

    async def run_guarded(self) -> dict:
        """run() with SIGTERM/SIGINT/SIGHUP sent to interrupt() (a process of its own: the CLI)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in sigs:
            loop.add_signal_handler(sig, self.interrupt, sig, task)
        try:
            return await self.run()
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    async def run(self) -> dict:
        results: list[dict] = []
        for target in self.targets:
            if self.caught is not None:
                results.append({"name": target.name, "ok": False, "error": "UpgradeError",
                                "message": f"not started: {signal.Signals(self.caught).name} arrived before"})
                continue
            try:
                out = await self._one(target)
            except LuoAgentError as exc:
                if len(self.targets) == 1 and self.raise_single:
                    raise
                self.progress.log(f"VM {target.name}: upgrade failed: {exc}")
                results.append({"name": target.name, "ok": False, "error": type(exc).__name__, "message": str(exc)})
                self.outcomes.append(Outcome(target.name, error=str(exc)))
                continue
            results.append(outcome_dict(out))
        return {"ok": all(r.get("ok") for r in results), "vms": results}

    async def _one(self, target: Target) -> Outcome:
        up = _Upgrade(target, self.qemu, self.mechanism, self.timeout, self.progress)
        up.before_retire = self.before_retire
        self.current = up
        started = time.monotonic()
        try:
            self.step = f"preflight:{target.name}"
            await asyncio.to_thread(up.preflight)  # probes the new binary: off the event loop
            self.step = f"upgrade:{target.name}"
            try:
                await up.run()
            except asyncio.CancelledError:
                if self.caught is None:
                    raise
                raise UpgradeError(f"interrupted by {signal.Signals(self.caught).name}; rolled back, the guest "
                                   f"runs in the old QEMU (pid {getattr(up, 'pid', '?')})", step="signal",
                                   vm=target.name) from None
        finally:
            up.out.total_s = round(time.monotonic() - started, 3)
            up.close_fds()
            self.current = None
            self.rolling_back = False
        self.outcomes.append(up.out)
        if self.caught is not None:
            raise UpgradeError(f"{signal.Signals(self.caught).name} arrived after the new QEMU (pid "
                               f"{up.out.new_pid}) had taken over; the upgrade was completed first",
                               step="signal", vm=target.name)
        return up.out


class _Upgrade:
    def __init__(self, target: Target, qemu, mechanism: str, timeout: float, progress: Progress):
        self.t = target
        self.qemu = qemu
        self.mechanism = mechanism
        self.timeout = timeout
        self.progress = progress
        self.out = Outcome(target.name)
        self.ram_fds: dict[int, int] = {}   # fd number in QEMU -> our duplicate of that memfd
        self.proc: subprocess.Popen | None = None
        self.temp_paths: list[Path] = []    # removed on rollback
        self.suffix = qemu_argv.temp_suffix()
        #: the new QEMU runs the guest: from here on the upgrade is finished, never undone
        self.committed = False
        self._faulted = False
        self.before_retire: Callable[[int, int], None] | None = None
        self.unit = ""  # the VM's systemd scope (preflight), or "" outside one

    # -- preflight: nothing changes in the running QEMU ------------------------------------
    def preflight(self) -> None:
        t = self.t
        if not t.qmp_socket.exists():
            raise QmpUnreachable(f"VM {t.name}: QMP socket {t.qmp_socket} does not exist; is it running? "
                                 "(`luoagent vm list`)")
        self.pid = procfs.peer_pid(t.qmp_socket)
        if t.record is not None and t.record.pid != self.pid:
            logger.warning("upgrade.pid_mismatch", vm=t.name, recorded=t.record.pid, actual=self.pid)
        # what runs is what the kernel reports for the process behind the socket
        old_binary, self.old_argv = qemu_binary.qemu_cmdline(self.pid)
        self.out.old_pid = self.pid
        self.out.old_qemu = t.record.qemu if t.record and t.record.qemu else old_binary
        default = self.qemu or (t.record.qemu if t.record and t.record.qemu else old_binary)
        self.new_binary = qemu_binary.find_qemu(default)
        self.out.new_qemu = str(self.new_binary)
        with self.progress.timed("probe", f"{self.new_binary}"):
            self.probe = qemu_binary.probe_cpr(self.new_binary)
        self.out.new_version = self.probe.version
        # a VM in its own scope keeps it: the new QEMU is moved in (never left in our cgroup,
        # which a restart of luoagent.service would kill)
        self.unit = t.record.unit if t.record is not None and t.record.unit and systemctl.booted() else ""
        if self.unit and not systemctl.delegated(self.unit):
            raise UpgradeError(f"VM {t.name}'s unit {self.unit} is not active with Delegate=yes, so its next QEMU "
                               "cannot be moved into it (a scope made by an older luoagent); stop and start the "
                               "VM once (`luoagent vm stop/start`), then upgrade", step="preflight", vm=t.name)

    async def run(self) -> None:
        t, out = self.t, self.out
        async with await Qmp.connect(t.qmp_socket, timeout=min(self.timeout, 10)) as q_old:
            status = await q_old.status()
            if status not in ("running", "paused"):
                raise UsageError(f"VM {t.name} is {status!r}; only a running or paused VM can be upgraded")
            out.was_running = status == "running"
            backends = await qemu_ram.ram_backends(self.pid, q_old)
            out.guest_ram_bytes = sum(b.size for b in backends)
            out.old_version = await q_old.version()
            mtype = str(await q_old.execute("qom-get", {"path": "/machine", "property": "type"}))
            out.machine = mtype.removesuffix("-machine")
            old_caps = {c["capability"] for c in await q_old.execute("query-migrate-capabilities")}
            out.mechanism = self._choose(old_caps)
            if out.machine not in self.probe.machines:
                raise UpgradeError(
                    f"VM {t.name} runs machine type {out.machine}, which QEMU {self.probe.version} at "
                    f"{self.new_binary} does not have; use a QEMU that still provides it",
                    step="probe", vm=t.name)
            plan = qemu_argv.beside(self.old_argv, qmp_socket=str(t.qmp_socket), suffix=self.suffix,
                                    ram_fds={b.qemu_fd for b in backends}, machine_type=out.machine)
            for tmp, _final in plan.renames:
                if tmp.endswith(".sock") or tmp == plan.qmp_socket:
                    _check_sun_path(tmp)
            self.plan = plan
            self.backends = backends
            for b in backends:
                self.ram_fds[b.qemu_fd] = procfs.steal_fd(self.pid, b.qemu_fd)
            self.progress.log(
                f"VM {t.name}: QEMU {out.old_version} (pid {self.pid}) -> {self.probe.version} at "
                f"{self.new_binary}, machine {out.machine}, {out.guest_ram_bytes >> 20} MiB RAM in place, "
                f"mechanism {out.mechanism}")
            if out.mechanism == "handoff":
                await self._handoff(q_old)
            else:
                await self._sequential(q_old)
        self._finish()

    def _choose(self, old_caps: set[str]) -> str:
        handoff_ok = "x-ignore-shared" in old_caps and self.probe.x_ignore_shared
        sequential_ok = handoff_ok and self.probe.cpr_reboot
        if self.mechanism == "handoff" and not handoff_ok:
            raise UpgradeError(f"handoff needs x-ignore-shared in both QEMUs; {self.new_binary} "
                               f"({self.probe.version}) lacks it", step="probe", vm=self.t.name)
        if self.mechanism == "sequential" and not sequential_ok:
            raise UpgradeError(f"sequential needs cpr-reboot and x-ignore-shared; {self.new_binary} "
                               f"({self.probe.version}) lacks them", step="probe", vm=self.t.name)
        if self.mechanism != "auto":
            return self.mechanism
        if handoff_ok:
            return "handoff"
        raise UpgradeError(f"QEMU {self.probe.version} at {self.new_binary} cannot take over a guest with its RAM "
                           "in place (no x-ignore-shared); use QEMU >= 8.2", step="probe", vm=self.t.name)

    # -- the new process -------------------------------------------------------------------
    def _log_path(self) -> Path:
        if self.t.record is not None and self.t.record.log:
            return Path(self.t.record.log)
        return self.t.qmp_socket.parent / f"{self.t.qmp_socket.name}.upgrade.log"

    async def _start_new(self, binary, extra: list[str]) -> Qmp:
        argv = [*self.plan.argv, *extra]
        if testmode.armed("upgrade-start-new", self.t.name) and binary == self.new_binary and not self._faulted:
            self._faulted = True  # once: a recovery start of the old binary must not be refused
            argv.append("-luoagent-test-fault")  # QEMU itself refuses to start on an unknown option
        logpath = self._log_path()
        fd = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self.temp_paths += [Path(tmp) for tmp, _ in self.plan.renames]
        with self.progress.timed("start-new", f"{binary}"):
            # beside the old QEMU (handoff) the scope exists: move the new one in; after the old
            # one is gone (sequential) the scope went with it: systemd-run makes it again
            scope_alive = bool(self.unit) and procfs.pid_alive(self.pid)
            self.proc = qemu_binary.launch(binary, argv, log=logpath, daemon=True, fd_map=self.ram_fds,
                                           scope_unit=self.unit if self.unit and not scope_alive else None)
            if scope_alive:
                try:
                    systemctl.attach(self.unit, self.proc.pid)
                except LuoAgentError as exc:
                    raise UpgradeError(f"the new QEMU (pid {self.proc.pid}) could not join {self.unit}: {exc}",
                                       step="start-new", vm=self.t.name) from exc
            try:
                q_new = await Qmp.connect(self.plan.qmp_socket, timeout=self.timeout, process=self.proc)
            except QmpUnreachable as exc:
                raise UpgradeError(f"the new QEMU did not start: {exc}; QEMU said: "
                                   f"{qemu_binary.log_tail(logpath)}", step="start-new", vm=self.t.name) from exc
            try:
                await self._check_same_ram(q_new)
            except BaseException:
                await q_new.close()
                raise
        self.out.new_pid = self.proc.pid
        return q_new

    async def _check_same_ram(self, q_new: Qmp) -> None:
        """The new process must map the very memfds the old one does (same inode per backend)."""
        theirs = {b.id: b for b in await qemu_ram.inspect_ram(self.proc.pid, q_new)}
        for b in self.backends:
            nb = theirs.get(b.id)
            if nb is None or nb.qemu_fd != b.qemu_fd or nb.size != b.size:
                raise UpgradeError(f"the new QEMU's RAM backend {b.id!r} is not the old one's ({nb})",
                                   step="start-new", vm=self.t.name)
            old_ino = os.fstat(self.ram_fds[b.qemu_fd]).st_ino  # our duplicate of the old one's fd
            try:
                new_ino = os.stat(f"/proc/{self.proc.pid}/fd/{b.qemu_fd}").st_ino
            except OSError as exc:
                raise UpgradeError(f"cannot inspect the new QEMU's fd {b.qemu_fd}: {exc.strerror}",
                                   step="start-new", vm=self.t.name) from exc
            if old_ino != new_ino:
                raise UpgradeError(f"the new QEMU's fd {b.qemu_fd} is another file than the old one's RAM",
                                   step="start-new", vm=self.t.name)

    def _kill_new(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for path in self.temp_paths:
            with contextlib.suppress(OSError):
                path.unlink()

    # -- handoff: new QEMU beside the old, state over a unix socket --------------------------
    async def _handoff(self, q_old: Qmp) -> None:
        t, out = self.t, self.out
        mig = t.qmp_socket.parent / f"mig-{self.suffix}.sock"
        _check_sun_path(str(mig))
        self.temp_paths.append(mig)
        saved = await handoff.migration_parameters(q_old)
        q_new = None
        pending: list[asyncio.Future] = []
        try:
            q_new = await self._start_new(self.new_binary, ["-incoming", "defer", "-S"])
            new_events = q_new.watch("MIGRATION", "RESUME")
            old_events = q_old.watch("STOP")
            await handoff.receive(q_new, f"unix:{mig}")
            testmode.fault("upgrade-before-migrate", t.name, UpgradeError)
            kill_midway = testmode.armed("upgrade-migrate", t.name)
            hold = kill_midway or testmode.armed("upgrade-hold", t.name)
            started = time.monotonic()
            await handoff.start_send(q_old, f"unix:{mig}", hold_before_switchover=hold)
            if hold:
                await self._hold_at_switchover(q_old, kill_midway)
            sent = asyncio.ensure_future(handoff.wait_sent(q_old, started + self.timeout))
            pending.append(sent)
            arrived = asyncio.ensure_future(
                new_events.wait("MIGRATION", self.timeout, match={"status": "completed"}))
            pending.append(arrived)
            # the destination decides: the source can report "completed" although the new QEMU
            # died before switchover (docs/facts.md), so wait for the new one's own event, and
            # fail at once if its process exits
            exited = asyncio.ensure_future(_exit_of(self.proc))
            pending.append(exited)
            done, _ = await asyncio.wait({sent, arrived, exited}, return_when=asyncio.FIRST_COMPLETED)
            if sent in done and sent.exception() is not None:
                raise UpgradeError(f"moving the device state failed: {sent.exception()}",
                                   step="migrate", vm=t.name)
            if arrived not in done:
                done, _ = await asyncio.wait({arrived, exited}, return_when=asyncio.FIRST_COMPLETED)
            if arrived not in done:
                raise UpgradeError(f"moving the device state failed: the new QEMU (pid {self.proc.pid}) exited "
                                   f"with status {self.proc.returncode} before it had the whole state",
                                   step="migrate", vm=t.name)
            if arrived.exception() is not None:
                info = await _settled(sent)
                raise UpgradeError(f"moving the device state failed: the new QEMU did not receive it: "
                                   f"{arrived.exception()}{f'; old side: {info}' if info else ''}",
                                   step="migrate", vm=t.name)
            exited.cancel()
        except BaseException as exc:
            for fut in pending:
                fut.cancel()
            await self._rollback_before_switch(q_old, q_new, saved, exc)
            raise
        # ---- the switch: the whole device state is in the new QEMU, which has not run yet ----
        out.steps["migrated_s"] = round(time.monotonic() - started, 4)
        if testmode.armed("upgrade-after-switch", t.name):
            os.kill(self.proc.pid, signal.SIGKILL)  # test only: a real death of the real process
            self.proc.wait()
        resume = None
        try:
            if self.proc.poll() is not None:
                raise QemuError(f"the new QEMU (pid {self.proc.pid}) exited with status {self.proc.returncode}")
            if out.was_running:
                # from the cont on a signal must not interrupt: the new QEMU may be running
                self.committed = True
                await q_new.cont(timeout=5)
                resume = await new_events.wait("RESUME", 5)
            status = await q_new.status(timeout=5)
            if status != ("running" if out.was_running else "paused"):
                raise QemuError(f"the new QEMU is {status!r} after the handover")
            self.committed = True
        except asyncio.CancelledError:
            if resume is not None:
                raise
            await self._rollback_after_switch(q_old, q_new, saved, None, "interrupted")
            raise
        except LuoAgentError as exc:
            await self._rollback_after_switch(q_old, q_new, saved, resume, exc)
            raise UpgradeError(
                f"the new QEMU failed right after the handover ({exc}); the guest runs on in the old "
                f"QEMU (pid {self.pid}), nothing lost", step="switch", vm=t.name) from exc
        # ---- the new QEMU runs the guest: retire the old one -----------------------------------
        info = await sent
        if resume is not None:
            stop = await old_events.wait("STOP", 1)
            out.pause_ms = round((event_time_ns(resume) - event_time_ns(stop)) / 1e6, 3)
        out.bytes_moved = handoff.bytes_moved(info)
        if info.get("downtime") is not None:
            out.qemu_downtime_ms = float(info["downtime"])
        self.temp_paths.remove(mig)
        with contextlib.suppress(OSError):
            mig.unlink()
        with contextlib.suppress(LuoAgentError):
            await handoff.reset(q_new)  # leave the new QEMU's migration settings as a fresh one has them
        await q_new.close()
        if self.before_retire is not None:
            try:
                self.before_retire(self.proc.pid, self.pid)
            except Exception as exc:  # the new QEMU runs the guest: finish the upgrade regardless
                logger.warning("upgrade.before_retire_failed", vm=t.name, error=str(exc))
        await self._retire_old(q_old)

    async def _hold_at_switchover(self, q_old: Qmp, kill: bool) -> None:
        """Test faults: the migration waits in pre-switchover (RAM pass done, guest stopped,
        device state not sent); `upgrade-migrate` then SIGKILLs the new QEMU (a real death),
        `upgrade-hold` waits up to _HOLD_S for a signal to luoagent. Then the stream goes on."""
        await handoff.wait_state(q_old, "pre-switchover", 10)
        if kill:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        else:
            self.progress.log(f"VM {self.t.name}: test fault upgrade-hold: migration held before switchover")
            await asyncio.sleep(_HOLD_S)
        await handoff.continue_switchover(q_old)

    async def _rollback_before_switch(self, q_old: Qmp, q_new: Qmp | None, saved: dict, exc) -> None:
        self.progress.log(f"VM {self.t.name}: upgrade failed before the switch ({exc}); rolling back")
        self._kill_new()
        if q_new is not None:
            await q_new.close()
        with contextlib.suppress(LuoAgentError):
            await handoff.reset(q_old, saved)
        await self._resume_old(q_old)

    async def _rollback_after_switch(self, q_old: Qmp, q_new: Qmp, saved: dict, resume, exc) -> None:
        if resume is not None:
            # the new process ran the guest: the old one's device state is stale, never resume it
            raise UpgradeError(f"the new QEMU died after it had resumed the guest ({exc}); the old QEMU "
                               f"(pid {self.pid}) is paused and was not resumed", step="switch", vm=self.t.name)
        self.progress.log(f"VM {self.t.name}: the new QEMU failed before it ran the guest ({exc}); "
                          "resuming the old one")
        self._kill_new()  # it never ran the guest, so the RAM is as the old QEMU left it
        await q_new.close()
        with contextlib.suppress(LuoAgentError):
            await handoff.wait_sent(q_old, time.monotonic() + 5)
        with contextlib.suppress(LuoAgentError):
            await handoff.reset(q_old, saved)
        await self._resume_old(q_old)

    async def _resume_old(self, q_old: Qmp) -> None:
        status = await q_old.status()
        if self.out.was_running and status != "running":
            await q_old.cont()
            status = await q_old.status()
        if self.out.was_running and status != "running":
            raise QemuError(f"VM {self.t.name}: the old QEMU is {status!r} after rollback")

    async def _retire_old(self, q_old: Qmp) -> None:
        """Quit the old QEMU (its state is in the new one now), then give the new one the paths
        the VM is known by: the old one's exit unlinks them, so the renames come after it."""
        with self.progress.timed("retire-old", f"pid {self.pid}"):
            await q_old.quit(timeout=5)
            if not _wait_exit(self.pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                _wait_exit(self.pid, 5)
            for tmp, final in self.plan.renames:
                os.replace(tmp, final)
                with contextlib.suppress(ValueError):
                    self.temp_paths.remove(Path(tmp))

    # -- sequential: checkpoint, quit, start, load --------------------------------------------
    async def _sequential(self, q_old: Qmp) -> None:
        t, out = self.t, self.out
        vmstate = memfd.create(f"luoagent-upgrade-{t.name}")
        try:
            w = memfd.reopen(vmstate, os.O_WRONLY)
            try:
                await q_old.add_fd(w, _SAVE_FDSET, opaque=f"luoagent upgrade {t.name}")
            finally:
                os.close(w)
            await cpr.configure(q_old)
            old_events = q_old.watch("STOP")
            try:
                if out.was_running:
                    await q_old.stop()
                await cpr.save(q_old, f"file:/dev/fdset/{_SAVE_FDSET}", configured=True)
                testmode.fault("upgrade-before-migrate", t.name, UpgradeError)
            except BaseException:
                with contextlib.suppress(LuoAgentError):
                    await cpr.cancel_and_reset(q_old)
                with contextlib.suppress(LuoAgentError):
                    await q_old.execute("remove-fd", {"fdset-id": _SAVE_FDSET})
                await self._resume_old(q_old)
                raise
            out.bytes_moved = memfd.size(vmstate)
            stop = await old_events.wait("STOP", 1) if out.was_running else None
            # point of no return: the old process goes; the checkpoint and the RAM fds we hold
            # are enough to start the guest again in either binary
            await self._retire_old_for_sequential(q_old)
            try:
                q_new = await self._start_loaded(self.new_binary, vmstate)
            except Exception as exc:  # whatever went wrong, the guest must run again
                self.progress.log(f"VM {t.name}: the new QEMU failed ({exc}); starting the old binary again")
                self._kill_new()
                q_new = await self._start_loaded(Path(self.out.old_qemu), vmstate)
                await q_new.close()
                self._rename_into_place()
                self._write_record(Path(self.out.old_qemu), self.out.old_version, upgraded=False)
                raise UpgradeError(f"the new QEMU failed after the checkpoint ({exc}); the guest runs "
                                   f"again in {self.out.old_qemu} (pid {self.proc.pid})",
                                   step="start-new", vm=t.name) from exc
            self.committed = True
            try:
                resume = self._resume_event
                if stop is not None and resume is not None:
                    out.pause_ms = round((event_time_ns(resume) - event_time_ns(stop)) / 1e6, 3)
            finally:
                await q_new.close()
            self._rename_into_place()
        finally:
            os.close(vmstate)

    async def _retire_old_for_sequential(self, q_old: Qmp) -> None:
        await q_old.quit(timeout=5)
        if not _wait_exit(self.pid, 10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _wait_exit(self.pid, 5)
        if self.unit:  # its scope goes once empty (--collect); the new QEMU's scope takes the name
            deadline = time.monotonic() + 10
            while systemctl.unit_active(self.unit) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

    async def _start_loaded(self, binary, vmstate: int) -> Qmp:
        self._resume_event = None
        q_new = await self._start_new(binary, ["-incoming", "defer"])
        try:
            events = q_new.watch("RESUME")
            r = memfd.reopen(vmstate, os.O_RDONLY)
            try:
                await q_new.add_fd(r, _LOAD_FDSET)
            finally:
                os.close(r)
            await cpr.load(q_new, f"file:/dev/fdset/{_LOAD_FDSET}", timeout=self.timeout)
            if self.out.was_running:
                if await q_new.status() != "running":
                    await q_new.cont()
                self._resume_event = await events.wait("RESUME", 5)
            with contextlib.suppress(LuoAgentError):
                await q_new.execute("remove-fd", {"fdset-id": _LOAD_FDSET})
            await cpr.cancel_and_reset(q_new)
        except BaseException:
            await q_new.close()
            raise
        return q_new

    def _rename_into_place(self) -> None:
        for tmp, final in self.plan.renames:
            os.replace(tmp, final)
            with contextlib.suppress(ValueError):
                self.temp_paths.remove(Path(tmp))

    # -- after ----------------------------------------------------------------------------
    def _finish(self) -> None:
        self.out.ok = True
        self._write_record(self.new_binary, self.out.new_version, upgraded=True)

    def _write_record(self, binary: Path, version: str, *, upgraded: bool) -> None:
        """Point a `vm start` VM's record at the QEMU that now runs it (pid, binary, argv)."""
        out, t = self.out, self.t
        if t.record is not None:
            rec = t.record
            renames = {tmp: final for tmp, final in self.plan.renames}
            argv = [renames.get(a, a) for a in self.plan.argv]
            for tmp, final in renames.items():
                argv = [a.replace(tmp, final) for a in argv]
            # vm start records argv without its -qmp (it adds its own at launch)
            cut = [i for i, a in enumerate(argv) if a == "-qmp" and i + 1 < len(argv)
                   and argv[i + 1].startswith(f"unix:{t.qmp_socket},")]
            for i in reversed(cut):
                del argv[i:i + 2]
            rec.pid = self.proc.pid
            rec.qemu = str(binary)
            rec.qemu_version = version
            rec.argv = argv
            if upgraded:
                rec.upgrades = [*rec.upgrades, {"at_ns": time.time_ns(), "mechanism": out.mechanism,
                                                "from": out.old_version, "to": out.new_version,
                                                "pause_ms": out.pause_ms, "old_pid": out.old_pid,
                                                "new_pid": out.new_pid}]
            vmwf.write_record(rec)

    def close_fds(self) -> None:
        for fd in self.ram_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ram_fds.clear()


async def _exit_of(proc: subprocess.Popen) -> int:
    """The exit status of ``proc``, once it has exited (polled: a child's exit has no event here)."""
    while proc.poll() is None:
        await asyncio.sleep(0.01)
    return proc.returncode


async def _settled(task) -> str:
    with contextlib.suppress(Exception):
        return str(await asyncio.wait_for(task, 2))
    return ""


def _check_sun_path(path: str) -> None:
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise UsageError(f"socket path {path} is longer than {_SUN_PATH_MAX} bytes (a unix socket "
                         "limit); use a shorter --vm-root / QMP socket path")


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while procfs.pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def outcome_dict(out: Outcome) -> dict:
    return asdict(out)


def perform(req: dict) -> dict:
    """`vm upgrade` in this process (no daemon serves): the request of vm.request_from."""
    return qmp_client.run_sync(UpgradeBatch.from_request(req).run_guarded())


def print_result(result: dict, *, json_out: bool) -> int:
    """Print a batch's result (from the daemon or this process); exit 1 if any VM failed."""
    if json_out:
        import json

        print(json.dumps(result))
    else:
        for out in result.get("vms") or []:
            if not out.get("ok"):
                continue  # its failure was reported as it happened
            pause = f"{out['pause_ms']:.3f} ms" if out.get("pause_ms") is not None else "n/a (guest was paused)"
            print(f"VM {out['name']} upgraded ({out['mechanism']}): QEMU {out['old_version']} pid {out['old_pid']} -> "
                  f"{out['new_version']} pid {out['new_pid']}; guest paused {pause}, "
                  f"{out['guest_ram_bytes'] >> 20} MiB RAM in place, {out['bytes_moved']} bytes moved, "
                  f"{out['total_s']:.2f} s in all")
    return 0 if result.get("ok") else 1
