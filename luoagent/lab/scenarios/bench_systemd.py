"""Lab scenario bench-systemd: the blackout across a real kexec on a systemd host, for the plan of
runs the host benchmark passes (benchmarks/bench_liveupdate.py --systemd).

Each run starts counter guests as units (`luoagent vm start`), then `luoagent update` as a client
of the shipped luoagent.service: the daemon saves them, calls `systemctl kexec`, systemd shuts down
in order and kexecs, and in the new boot systemd starts the service, which restores them. The next
stage checks every guest (counter continues, canary identical) and prints one `bench-result` line
of clock readings (the update's, the restore's, when systemd started the service); the host adds
the console's arrival times and systemd-shutdown's kernel log lines (lab/blackout.py)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

from luoagent.lab import host_units
from luoagent.lab.scenarios import bench_liveupdate as bench
from luoagent.lab.scenarios import systemd_update as su
from luoagent.lab.scenarios import vm_update as vu
from luoagent.lab.scenarios._common import agent_env

NAME = "bench-systemd"
DESCRIPTION = "benchmark: blackout across systemctl kexec through luoagent.service (plan from --debug plan=)"
FLAVOUR = "systemd"
SLOW = True
MEMORY = "2G"
#: a stage: the restore at boot (Python starts under nested TCG), the checks, new guests, the update
TIMEOUT = 1500.0
PATH = "systemd"
DEFAULT_PLAN = "systemd:64:1"
KEY = "bench-systemd"
OUT_DIR = Path("/lab/bench-systemd")      # the run disk: what the update client printed survives the kexec
UPDATE_WAIT = 900.0                       # the client's announce (preflight decompresses the bzImage)
SHUTDOWN_WAIT = 600.0                     # after the announce: systemd's shutdown stops this stage

RESTORED = "{label}: every guest restored by luoagent.service at boot (counter continues, canary identical)"


def parse_plan(text: str) -> list[dict]:
    """"systemd:64:1,systemd:64:2" -> [{"path", "ram_mib", "vms"}, ...]."""
    return bench.parse_plan(text, (PATH,))


def start_vm(name: str, ram_mib: int) -> dict:
    """A counter guest as a unit (`luoagent vm start`), counting, with its canary written."""
    seed = secrets.randbits(48)
    return {"seed": seed, "counter_before": su.start_vm(name, seed, ram_mib=ram_mib)["counter_before_update"]}


def _announced(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()).get("vms"))
    except (OSError, ValueError, AttributeError):
        return False


def start_run(ctx, k: int, run: dict) -> None:
    names = [f"r{k}v{i}" for i in range(run["vms"])]
    st = {"index": k, "boot_id": ctx.boot_id, "names": names,
          "vms": {n: start_vm(n, run["ram_mib"]) for n in names}}
    st["clock_pair"] = [time.time_ns(), bench.boot_ns()]  # realtime - boottime: the daemon stamps realtime
    ctx.state[KEY] = st
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out, err = OUT_DIR / "update.json", OUT_DIR / "update.err"
    vm_args = [a for n in names for a in ("--vm", n)]
    with open(out, "w") as o, open(err, "w") as e:
        client = subprocess.Popen([sys.executable, "-m", "luoagent", "update", "--kernel", str(ctx.next_kernel),
                                   "--append", bench._cmdline(), *vm_args, "--json"],
                                  stdout=o, stderr=e, env=agent_env())
    deadline = time.monotonic() + UPDATE_WAIT
    while not _announced(out):
        if client.poll() is not None and not _announced(out):
            raise RuntimeError(f"luoagent update exited {client.returncode} without announcing the kexec: "
                               + err.read_text(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            client.kill()
            raise RuntimeError(f"luoagent update announced nothing in {UPDATE_WAIT:.0f} s")
        time.sleep(0.05)
    # the daemon calls `systemctl kexec` now: a clock mark close to it pins the old boot's clock
    # stamps on the printk clock the shutdown's lines carry (little drift between the two)
    bench._clock_mark()
    time.sleep(SHUTDOWN_WAIT)
    raise RuntimeError(f"the update was announced but no systemctl kexec followed in {SHUTDOWN_WAIT:.0f} s")


def service_start() -> dict:
    """When systemd started luoagent.service's process in this boot, on CLOCK_BOOTTIME, and how
    often it restarted (a restart makes that start not the boot's)."""
    mono_us = host_units.prop(host_units.SERVICE, "ExecMainStartTimestampMonotonic")
    restarts = host_units.prop(host_units.SERVICE, "NRestarts")
    boot_minus_mono = bench.boot_ns() - time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    if not mono_us.isdigit() or int(mono_us) == 0:
        raise RuntimeError(f"luoagent.service has no ExecMainStartTimestampMonotonic ({mono_us!r})")
    return {"service_start_boot_ns": int(mono_us) * 1000 + boot_minus_mono,
            "service_restarts": int(restarts) if restarts.isdigit() else -1}


def finish_run(ctx, index: int, run: dict) -> None:
    st = ctx.state.get(KEY, {})
    label = f"run {index + 1} ({PATH} {run['vms']} x {run['ram_mib']} MiB)"
    if st.get("index") != index or ctx.boot_id == st.get("boot_id"):
        ctx.not_ok(f"{label}: kexec'd into a new kernel", f"state {st.get('index')}, boot id {ctx.boot_id}")
        return
    status = su.wait_for_restore()
    job = status.get("job") or {}
    result = su.restore_result()
    new: dict = {"update": bench._slim_update(bench._read_json(OUT_DIR / "update.json")),
                 "restore": {**bench._slim_restore(result), "kexec_requested_ns": result.get("kexec_requested_ns")},
                 **service_start(), "vms": {}}
    for n in st["names"]:
        try:
            _pid, fd = vu.ram_fd_of(su.sock(n))
        except Exception as exc:  # noqa: BLE001 - reported as "not restored"
            new["vms"][n] = {"restored": False, "why": f"cannot reach the restored QEMU: {exc}"}
            continue
        try:
            new["vms"][n] = bench._check_guest(n, fd, st["vms"][n]["counter_before"], st["vms"][n]["seed"])
        finally:
            os.close(fd)
    done = job.get("op") == "restore" and job.get("state") == "done"
    restored = done and all(v.get("restored") for v in new["vms"].values()) and len(new["vms"]) == run["vms"]
    ctx.check(restored, RESTORED.format(label=label),
              f"restore job {job}; " + "; ".join(f"{n}: {v.get('why')}" for n, v in new["vms"].items()
                                                 if not v.get("restored")))
    record = {"index": index, **run, "old": {k: v for k, v in st.items() if k != "boot_id"}, "new": new,
              "restored": restored}
    ctx.diag(bench.RESULT_PREFIX + json.dumps(record, separators=(",", ":")))
    for n in st["names"]:
        r = vu.luoagent("vm", "stop", n, "--force", "--json", timeout=120)
        if r.returncode != 0:
            ctx.diag(f"vm stop {n}: exit {r.returncode}: {r.stderr[-500:]}")


def _stage(k: int, plan: list[dict]):
    def stage(ctx) -> None:
        bench._printk_time_now()
        bench._clock_mark()
        if k == 0:
            bench._compile_agent(ctx)  # before the daemon's first start: it imports compiled code
            if not host_units.install_and_start(ctx):
                raise RuntimeError("luoagent.service is not serving; nothing to update through")
        else:
            finish_run(ctx, k - 1, plan[k - 1])
        if k < len(plan):
            ctx.diag(f"run {k + 1}/{len(plan)}: {PATH} {plan[k]['vms']} x {plan[k]['ram_mib']} MiB")
            start_run(ctx, k, plan[k])
    stage.__name__ = f"bench_systemd_step_{k}"
    return stage


def stages():
    plan = bench.plan_from_params(DEFAULT_PLAN, (PATH,))
    return [_stage(k, plan) for k in range(len(plan) + 1)]
