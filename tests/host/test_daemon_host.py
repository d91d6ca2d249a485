"""Host tier for `luoagent daemon`, its journal and recovery: real QEMU 11.1 VMs running the
counter guest, a real daemon process killed with real signals at named points of an update.

The daemon runs in --test-mode with LUOAGENT_TEST_SKIP=luo,kexec-load (this host has no LUO),
and LUOAGENT_PAUSE makes it wait at one point so the test can SIGKILL / SIGTERM it exactly
there. Every case must end with every VM running in place, its counter rising, QEMU's
migration state back to normal, no journal left, and a retried update succeeding. Sessions
and the kexec image are proven with real LUO in the lab (tests/lab/)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_update_rollback_host import (  # noqa: F401  (fixtures used by name)
    HOST_SKIP,
    LANDING_OK,
    REPO,
    _qemu_state,
    assert_running_and_rising,
    guest_elf,
    kernel_image,
    vms,
)

pytestmark = [pytest.mark.host, pytest.mark.timeout(600)]

PAUSED = "TEST MODE: paused at"


class Agent:
    """luoagent processes sharing one run dir (journal + control socket)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.daemon: subprocess.Popen | None = None
        self.daemon_log = run_dir.parent / f"daemon-{id(self)}.log"
        self._logs = 0

    def env(self, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LUOAGENT_")}
        env.update(LUOAGENT_RUN_DIR=str(self.run_dir), LUOAGENT_TEST_SKIP=HOST_SKIP,
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.update({k: v for k, v in extra.items() if v is not None})
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "luoagent", "--test-mode", *args]

    def start_daemon(self, pause: str = "", pause_seconds: str = "", **env) -> subprocess.Popen:
        self._logs += 1
        self.daemon_log = self.run_dir.parent / f"daemon-{self._logs}.log"
        out = open(self.daemon_log, "w")
        self.daemon = subprocess.Popen(self.argv("daemon"), stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                       env=self.env(LUOAGENT_PAUSE=pause or None,
                                                    LUOAGENT_PAUSE_SECONDS=pause_seconds or None, **env))
        out.close()
        deadline = time.monotonic() + 60
        while "serving" not in self.daemon_log.read_text():
            assert self.daemon.poll() is None, self.daemon_log.read_text()
            assert time.monotonic() < deadline, self.daemon_log.read_text()
            time.sleep(0.05)
        return self.daemon

    def wait_log(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while text not in (log := self.daemon_log.read_text()):
            assert time.monotonic() < deadline, f"no {text!r} in daemon log:\n{log}"
            assert self.daemon.poll() is None, log
            time.sleep(0.05)
        return log

    def run(self, *args: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), capture_output=True, text=True, cwd=REPO, env=self.env(**env),
                              timeout=300)

    def popen(self, *args: str, **env) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO, env=self.env(**env))

    def status(self) -> dict:
        r = self.run("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait(10)


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path / "run")
    yield a
    a.stop()


def update_args(kernel_image, *vm_list) -> list[str]:
    # LANDING_OK: a command line that keeps LUO on, and no ABI check of the fake image
    args = ["update", "--kernel", str(kernel_image), *LANDING_OK, "--dry-run", "--json"]
    for vm in vm_list:
        args += ["--vm", f"{vm.name}={vm.sock}"]
    return args


def assert_clean(agent: Agent, *vm_list) -> None:
    for vm in vm_list:
        assert_running_and_rising(vm)
    assert not (agent.run_dir / "journal.json").exists(), (agent.run_dir / "journal.json").read_text()


# ---- (1)-(5): the daemon SIGKILLed at each point of an update ---------------------------------
@pytest.mark.parametrize("point, stopped", [
    ("after-preflight", False),
    ("preserve-ram:a", False),
    ("quiesce-migrating:b", True),   # b's migration is in flight (QMP accepted `migrate`)
    ("after-quiesce", True),
    ("after-manifest", True),
])
def test_daemon_sigkilled_during_update_is_undone_by_the_next_daemon(agent, vms, kernel_image, point, stopped):
    a, b = vms("a"), vms("b")
    agent.start_daemon(pause=point)
    client = agent.popen(*update_args(kernel_image, a, b))
    agent.wait_log(f"{PAUSED} {point}")
    doc = agent.status()
    assert doc["daemon"]["pid"] == agent.daemon.pid and doc["paused_at"] == point, doc
    assert doc["phase"].startswith("update:") and doc["job"]["state"] == "running", doc
    assert {v["name"] for v in doc["vms"]} == {"a", "b"}, doc
    if stopped:
        assert doc["journal"]["vms"]["b"]["stop_issued"] is True, doc["journal"]
    agent.daemon.send_signal(signal.SIGKILL)
    agent.daemon.wait(10)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 1 and "closed the connection" in err and "Traceback" not in err, err
    if stopped:
        # the kill is real: the guest stays stopped until someone undoes the journal
        st = asyncio.run(_qemu_state(b))
        assert st["status"] in ("paused", "postmigrate", "finish-migrate"), st
        assert (agent.run_dir / "journal.json").exists()
    agent.start_daemon()  # recovers before serving
    log = agent.wait_log("serving")
    assert "undoing what it records" in log, log
    assert_clean(agent, a, b)
    r = agent.run(*update_args(kernel_image, a, b))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"].startswith("dry-run"), r.stdout
    assert_clean(agent, a, b)


def test_cli_update_sigkilled_without_daemon_then_recover(agent, vms, kernel_image):
    """The reported bug: `update --dry-run` SIGKILLed after quiesce left the VM paused for
    good. Now the second update refuses with the remedy and `luoagent recover` resumes it."""
    a = vms("a")
    proc = agent.popen(*update_args(kernel_image, a), LUOAGENT_PAUSE="after-quiesce")
    deadline = time.monotonic() + 120
    err = ""
    while PAUSED not in err:
        line = proc.stderr.readline()
        assert line or proc.poll() is None, err
        err += line
        assert time.monotonic() < deadline, err
    assert "no luoagent daemon serves" in err, err
    proc.kill()
    proc.wait(10)
    assert asyncio.run(_qemu_state(a))["status"] in ("paused", "postmigrate")
    again = agent.run(*update_args(kernel_image, a))
    assert again.returncode == 1 and "did not finish" in again.stderr and "luoagent recover" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    r = agent.run("recover", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["recovered"] and doc["step"] == "quiesce" and doc["problems"] == [], doc
    assert_clean(agent, a)
    assert agent.run(*update_args(kernel_image, a)).returncode == 0


# ---- (6) the client dies; the daemon's job goes on; status --follow re-attaches --------------
def test_client_killed_mid_update_changes_nothing(agent, vms, kernel_image):
    a, b = vms("a"), vms("b")
    agent.start_daemon(pause="after-quiesce", pause_seconds="3")
    client = agent.popen(*update_args(kernel_image, a, b))
    agent.wait_log(f"{PAUSED} after-quiesce")
    client.kill()
    client.wait(10)
    follow = agent.run("status", "--follow", "--json")
    assert follow.returncode == 0, follow.stderr
    assert "[update] quiesce done" in follow.stderr and "[update] rollback done" in follow.stderr, follow.stderr
    result = json.loads(follow.stdout)
    assert result["status"].startswith("dry-run") and [p["phase"] for p in result["phases"]][-1] == "rollback"
    doc = agent.status()
    assert doc["job"]["state"] == "done" and doc["phase"] == "idle" and doc["sessions"] == [], doc
    assert_clean(agent, a, b)


# ---- (7) SIGTERM to the daemon during quiesce: full rollback, then it exits -------------------
def test_sigterm_during_quiesce_rolls_back(agent, vms, kernel_image):
    a, b = vms("a"), vms("b")
    agent.start_daemon(pause="quiesce-migrating:a")
    client = agent.popen(*update_args(kernel_image, a, b))
    agent.wait_log(f"{PAUSED} quiesce-migrating:a")
    agent.daemon.send_signal(signal.SIGTERM)
    assert agent.daemon.wait(60) == 0, agent.daemon_log.read_text()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 1, err
    assert "interrupted by SIGTERM" in err and "rolled back" in err and "resumed" in err, err
    assert "Traceback" not in err + agent.daemon_log.read_text()
    assert not (agent.run_dir / "control.sock").exists()
    assert_clean(agent, a, b)
    agent.start_daemon()
    assert agent.run(*update_args(kernel_image, a, b)).returncode == 0


# ---- the control socket: 0600, root only -------------------------------------------------------
def _as_nobody(agent: Agent, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *agent.argv(*args)],
                          capture_output=True, text=True, cwd="/", env=agent.env(), timeout=60)


def test_non_root_client_is_refused_and_the_socket_is_0600():
    base = Path(tempfile.mkdtemp(prefix="luoagent-sock-"))
    os.chmod(base, 0o755)  # so that only the socket's own mode stands in the way
    agent = Agent(base / "run")
    agent.run_dir.mkdir(mode=0o755)
    try:
        agent.start_daemon()
        sock = agent.run_dir / "control.sock"
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0, oct(st.st_mode)
        r = _as_nobody(agent, "status")
        assert r.returncode == 1 and "accepts only root" in r.stderr and "run this command as root" in r.stderr, r
        assert "Traceback" not in r.stderr
        # defence in depth: even with the mode opened up, SO_PEERCRED refuses the uid
        os.chmod(sock, 0o666)
        r = _as_nobody(agent, "status", "--json")
        assert r.returncode == 1 and "uid 65534" in r.stderr and "accepts only root" in r.stderr, r
        assert agent.daemon.poll() is None  # a refused client does not hurt the daemon
        assert agent.status()["phase"] == "idle"
    finally:
        agent.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_daemon_tells_systemd_when_it_is_ready_and_stopping(agent, tmp_path):
    """Type=notify: READY=1 only once the socket serves, STOPPING=1 on SIGTERM (a real
    datagram socket stands where systemd's would be)."""
    import socket

    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(30)
    try:
        agent.start_daemon(NOTIFY_SOCKET=str(path))
        ready = s.recv(4096).decode()
        assert ready.startswith("READY=1\n") and f"serving {agent.run_dir / 'control.sock'}" in ready, ready
        assert agent.status()["phase"] == "idle"
        agent.daemon.send_signal(signal.SIGTERM)
        assert s.recv(4096).decode().startswith("STOPPING=1\n")
        assert agent.daemon.wait(30) == 0
    finally:
        s.close()


def test_restore_runs_in_the_daemon_and_says_why_nothing_is_restored(agent):
    """`luoagent restore` is a daemon client when a daemon serves: the job is the daemon's
    (status shows it), and its error (no LUO on this host) reaches the CLI unchanged."""
    agent.start_daemon()
    r = agent.run("restore", "--json")
    assert r.returncode != 0, r.stdout + r.stderr
    assert "runs in the luoagent daemon" in r.stderr and "no Live Update Orchestrator" in r.stderr, r.stderr
    job = agent.status()["job"]
    assert job["op"] == "restore" and job["state"] == "failed", job
    agent.stop()
    r = agent.run("restore", "--json")  # no daemon: in this process, and it says what that risks
    assert r.returncode != 0 and "restoring in this process" in r.stderr, r.stderr


def test_daemon_takes_back_what_the_fd_store_hands_it(agent, tmp_path):
    """At start the daemon sorts $LISTEN_FDS by the kernel's answer: here one fd that is no LUO
    session (a pipe) is closed and removed from the store by its FDNAME, and the status
    reports the store. A real datagram socket stands where systemd's would be: protocol only."""
    import socket
    import threading

    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(0.2)
    got: list[bytes] = []
    done = threading.Event()

    def manager():  # closes what it gets: a BARRIER's pipe end included
        while not done.is_set():
            try:
                msg, fds, _f, _a = socket.recv_fds(s, 4096, 4)
            except TimeoutError:
                continue
            got.append(msg)
            for fd in fds:
                os.close(fd)

    t = threading.Thread(target=manager, daemon=True)
    t.start()
    r, w = os.pipe()
    try:
        agent._logs += 1
        agent.daemon_log = agent.run_dir.parent / "daemon-listen.log"
        env = agent.env(NOTIFY_SOCKET=str(path), FDSTORE="8", LISTEN_FDS="1", LISTEN_FDNAMES="luoagent/vm/stray")
        # LISTEN_PID must be the daemon's own pid: a wrapper puts the fd at 3, sets it, execs in place
        wrapper = (f"import os, sys; os.dup2({r}, 3); os.close({r}); os.environ['LISTEN_PID'] = str(os.getpid()); "
                   f"os.execv(sys.executable, {agent.argv('daemon')!r})")
        with open(agent.daemon_log, "w") as out:
            agent.daemon = subprocess.Popen([sys.executable, "-c", wrapper], stdout=out, stderr=subprocess.STDOUT,
                                            cwd=REPO, env=env, pass_fds=[r])
        deadline = time.monotonic() + 60
        while "serving" not in agent.daemon_log.read_text():
            assert agent.daemon.poll() is None and time.monotonic() < deadline, agent.daemon_log.read_text()
            time.sleep(0.05)
        log = agent.daemon_log.read_text()
        assert "systemd fd store (FileDescriptorStoreMax=8)" in log, log
        assert "fd store entry 'luoagent/vm/stray' is no LUO session: closed and removed" in log, log
        assert b"FDSTOREREMOVE=1\nFDNAME=luoagent/vm/stray\n" in got, got
        doc = agent.status()
        assert doc["fd_store"] == {"enabled": True, "capacity": 8, "stored": []}, doc
        pipe = f"pipe:[{os.fstat(w).st_ino}]"
        held = [os.readlink(f"/proc/{agent.daemon.pid}/fd/{n}") for n in os.listdir(f"/proc/{agent.daemon.pid}/fd")]
        assert pipe not in held, f"the daemon kept the stray fd: {held}"
    finally:
        done.set()
        t.join()
        s.close()
        os.close(r)
        os.close(w)
