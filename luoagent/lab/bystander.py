"""A bystander of the systemd lab: a unit whose fd store keeps one memfd across `systemctl kexec`
(systemd's own use of LUO), as a service, plus the stage helpers that set it up and check it.

Run as the unit's ExecStart (`python3 -m luoagent.lab.bystander DIR`): with nothing handed in it
pushes a memfd holding DIR/content (FDSTORE=1, FDNAME, FDPOLL=0); handed one, it reports it."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

UNIT_PREFIX = "luoagent-lab-bystander-"
FDNAME = "bystander-canary"
CONTENT_BYTES = 1 << 20
STATE_DIR = Path("/lab/bystander")   # the run disk: survives the kexec
UNIT_TEXT = """# lab fixture: keeps one memfd in its fd store across kexec (luoagent/lab/bystander.py)
[Service]
Type=notify
NotifyAccess=main
Environment=PYTHONPATH=/lab/agent
ExecStart=/usr/bin/python3 -m luoagent.lab.bystander {state_dir}
FileDescriptorStoreMax=1
FileDescriptorStorePreserve=yes
"""


def unit(ctx) -> str:
    """The scenario's own bystander unit: a chained earlier scenario's memfd stays in its own
    unit's store (it survives stop and kexec: FileDescriptorStorePreserve=yes), never in ours."""
    return f"{UNIT_PREFIX}{ctx.scenario}.service"


def state_dir(ctx) -> Path:
    return STATE_DIR / ctx.scenario

PUSHED = "bystander unit pushed its memfd into its fd store (NFileDescriptorStore=1)"
KHO_EXEC = "the new boot came through a KHO kexec (dmesg: KHO: exec from:)"
HANDED_BACK = f"bystander unit got its memfd back after systemctl kexec under FDNAME {FDNAME}"
BYTES_INTACT = "bystander memfd: identical bytes after the kexec (SHA-256 and size)"


# --- the service ------------------------------------------------------------------------------
def serve(state_dir: Path) -> None:
    from luoagent.adapters import memfd, sd_notify

    handed = sd_notify.listen_fds()
    report: dict = {"boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                    "names": sorted(handed)}
    fds = handed.get(FDNAME, [])
    if fds:
        fd = fds[0]
        data = os.pread(fd, memfd.size(fd) + 1, 0)
        report.update(action="handed back", size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                      link=os.readlink(f"/proc/self/fd/{fd}"))
    else:
        content = (state_dir / "content").read_bytes()
        fd = memfd.create("bystander-canary")
        os.pwrite(fd, content, 0)
        sd_notify.store_fd(fd, FDNAME)
        report.update(action="pushed", size=len(content), sha256=hashlib.sha256(content).hexdigest())
    tmp = state_dir / "report.json.tmp"
    tmp.write_text(json.dumps(report))
    os.replace(tmp, state_dir / "report.json")
    sd_notify.notify({"READY": 1})
    signal.pause()


# --- stage helpers ----------------------------------------------------------------------------
def _systemctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=120)


def _report(ctx) -> dict:
    path = state_dir(ctx) / "report.json"
    return json.loads(path.read_text()) if path.exists() else {}


def start_and_check_pushed(ctx) -> None:
    """Stage before a kexec: install and start the bystander with fresh random content."""
    here = state_dir(ctx)
    here.mkdir(parents=True, exist_ok=True)
    content = secrets.token_bytes(CONTENT_BYTES)
    (here / "content").write_bytes(content)
    (here / "report.json").unlink(missing_ok=True)
    ctx.state["bystander_sha256"] = hashlib.sha256(content).hexdigest()
    # /etc is on the root disk: its QEMU overlay lives across every kexec of the run
    Path("/etc/systemd/system", unit(ctx)).write_text(UNIT_TEXT.format(state_dir=here))
    _systemctl("daemon-reload")
    started = _systemctl("start", unit(ctx))
    stored = _systemctl("show", "-P", "NFileDescriptorStore", unit(ctx)).stdout.strip()
    report = _report(ctx)
    ctx.check(started.returncode == 0 and stored == "1" and report.get("action") == "pushed"
              and report.get("sha256") == ctx.state["bystander_sha256"], PUSHED,
              f"start exit {started.returncode} {started.stderr.strip()}; NFileDescriptorStore={stored!r}; "
              f"report {report}")


def kernel_log(pattern: str) -> list[str]:
    """Kernel log records containing ``pattern`` (read from /dev/kmsg, non-blocking)."""
    found = []
    with open("/dev/kmsg", "rb", buffering=0) as kmsg:
        os.set_blocking(kmsg.fileno(), False)
        while True:
            try:
                rec = kmsg.read(8192)
            except BlockingIOError:
                break
            except OSError:  # a record overwritten while reading: go on
                continue
            if not rec:
                break
            text = rec.decode(errors="replace").split(";", 1)[-1].strip()
            if pattern in text:
                found.append(text)
    return found


def check_after_kexec(ctx) -> None:
    """Stage after `systemctl kexec`: KHO said so, and the unit got the same bytes back."""
    kho = kernel_log("KHO: exec from:")
    ctx.check(bool(kho), KHO_EXEC, "no 'KHO: exec from:' in the kernel log")
    here = state_dir(ctx)
    stored = _systemctl("show", "-P", "NFileDescriptorStore", unit(ctx)).stdout.strip()
    (here / "report.json").unlink(missing_ok=True)
    started = _systemctl("start", unit(ctx))
    deadline = time.monotonic() + 60
    while not (here / "report.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    report = _report(ctx)
    ctx.check(report.get("action") == "handed back" and report.get("names") == [FDNAME], HANDED_BACK,
              f"NFileDescriptorStore before start={stored!r}; start exit {started.returncode} "
              f"{started.stderr.strip()}; report {report}; journal:\n{_journal(unit(ctx))}")
    ctx.check(report.get("sha256") == ctx.state.get("bystander_sha256")
              and report.get("size") == CONTENT_BYTES, BYTES_INTACT,
              f"expected sha256 {ctx.state.get('bystander_sha256')} size {CONTENT_BYTES}, got {report}")


def _journal(name: str) -> str:
    out = subprocess.run(["journalctl", "-b", "--no-pager", "-n", "40", "-u", name],
                         capture_output=True, text=True)
    return (out.stdout or out.stderr)[-3000:]


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
