"""Host tier for the `vm` verbs as daemon operations: real QEMU 11.1 running the counter guest,
started, listed, upgraded and stopped by a real `luoagent daemon` for short-lived CLI clients.

A client that dies mid-upgrade changes nothing (the daemon finishes the upgrade); SIGTERM to the
daemon during an upgrade rolls that VM back into its old QEMU. The scope a VM's next QEMU joins
under systemd is proven in the systemd lab (tests/lab/test_systemd_lab.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from test_daemon_host import Agent
from test_upgrade_host import RAM, _qemus_using, assert_guest_alive, counting, guest_elf, root  # noqa: F401

pytestmark = [pytest.mark.host, pytest.mark.timeout(600)]

HELD = "migration held before switchover"


@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path / "run")
    yield a
    a.stop()


def client(agent: Agent, root: Path, *args: str, cwd: Path | None = None, popen: bool = False):
    """A `luoagent vm ...` client (its VM root from its own environment, as an operator's shell)."""
    env = agent.env(LUOAGENT_VM_ROOT=str(root))
    argv = agent.argv("vm", *args)
    if popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=cwd or Path.cwd(), env=env)
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd or Path.cwd(), env=env, timeout=300)


def start_through_daemon(agent: Agent, root: Path, binary, elf: Path, name: str = "a", *,
                         relative: bool = False) -> dict:
    # relative: -kernel relative to the client's directory (the daemon starts QEMU there; an
    # upgrade or restore later could not find it, and update's preflight names it)
    r = client(agent, root, "start", name, "--memory", str(RAM), "--qemu", str(binary), "--json", "--",
               "-machine", "pc", "-nodefaults", "-kernel", elf.name if relative else str(elf), cwd=elf.parent)
    assert r.returncode == 0, r.stderr
    assert "runs in the luoagent daemon" in r.stderr, r.stderr
    return counting(json.loads(r.stdout))


def upgrade_held(agent: Agent, root: Path, binary, elf: Path):
    """A daemon with the test fault upgrade-hold, VM a counting, and a `vm upgrade a` client
    whose migration the daemon holds before switchover: (record, counter, client)."""
    agent.start_daemon(LUOAGENT_FAULT="upgrade-hold")
    rec = start_through_daemon(agent, root, binary, elf)
    counter = assert_guest_alive(rec["pid"], Path(rec["qmp_socket"]))
    # --timeout beyond the 30 s hold: the held migration must not time out by itself
    p = client(agent, root, "upgrade", "a", "--timeout", "120", popen=True)
    agent.wait_log(HELD, 120)
    return rec, counter, p


def test_vm_verbs_run_in_the_daemon(agent, lab_qemu, guest_elf, root):
    agent.start_daemon()
    rec = start_through_daemon(agent, root, lab_qemu, guest_elf)
    sock = Path(rec["qmp_socket"])
    counter = assert_guest_alive(rec["pid"], sock)
    doc = agent.status()
    assert doc["job"]["op"] == "vm-start" and doc["job"]["state"] == "done", doc

    r = client(agent, root, "list", "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)["vms"]
    assert row["name"] == "a" and row["pid"] == rec["pid"] and row["status"] == "running", row

    r = client(agent, root, "upgrade", "a", "--json")
    assert r.returncode == 0, r.stderr
    [out] = json.loads(r.stdout)["vms"]
    assert out["ok"] and out["old_pid"] == rec["pid"] and out["new_pid"] != rec["pid"], out
    counter = assert_guest_alive(out["new_pid"], sock, counter)
    assert _qemus_using(root) == [out["new_pid"]]
    assert agent.status()["job"]["op"] == "vm-upgrade"

    rel = start_through_daemon(agent, root, lab_qemu, guest_elf, "r", relative=True)
    assert_guest_alive(rel["pid"], Path(rel["qmp_socket"]))
    for name in ("a", "r"):
        r = client(agent, root, "stop", name, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["stopped"] == "quit via QMP"
    deadline = time.monotonic() + 30
    while _qemus_using(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _qemus_using(root) == [] and not (root / "a").exists() and not (root / "r").exists()


def test_client_killed_mid_upgrade_the_daemon_finishes_it(agent, lab_qemu, guest_elf, root):
    """SIGKILL to the client while the daemon holds the migration before switchover (test fault
    upgrade-hold: 30 s): the daemon completes the upgrade on its own."""
    rec, counter, p = upgrade_held(agent, root, lab_qemu, guest_elf)
    sock = Path(rec["qmp_socket"])
    p.kill()
    p.wait(10)
    deadline = time.monotonic() + 120
    while agent.status()["job"]["state"] == "running":
        assert time.monotonic() < deadline, agent.daemon_log.read_text()
        time.sleep(0.5)
    doc = agent.status()
    assert doc["job"]["op"] == "vm-upgrade" and doc["job"]["state"] == "done", doc
    new = json.loads((root / "a" / "vm.json").read_text())["pid"]
    assert new != rec["pid"] and _qemus_using(root) == [new]
    assert_guest_alive(new, sock, counter)


def test_sigterm_to_the_daemon_mid_upgrade_rolls_back(agent, lab_qemu, guest_elf, root):
    rec, counter, p = upgrade_held(agent, root, lab_qemu, guest_elf)
    sock = Path(rec["qmp_socket"])
    assert len(_qemus_using(root)) == 2  # the new QEMU waits beside the old one
    agent.daemon.send_signal(signal.SIGTERM)
    assert agent.daemon.wait(60) == 0, agent.daemon_log.read_text()
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "interrupted by SIGTERM; rolled back" in err, err
    assert "Traceback" not in agent.daemon_log.read_text()
    assert_guest_alive(rec["pid"], sock, counter)
    assert _qemus_using(root) == [rec["pid"]]
