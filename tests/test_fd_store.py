"""Pure logic of the daemon's systemd side: FDNAME rule and map, BARRIER, the fd store's
push/remove datagrams and room check (against a real datagram socket standing in for PID 1:
protocol only, no proof of what systemd does), the restore journal's replay rule for a
daemon killed at each point of a restore (9–12 of issue 9), the blackout split at `systemctl
kexec`, and the update's last step under the fd store (systemctl stands in: no systemd here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading

import pytest

from luoagent import memfd
from luoagent.adapters import sd_notify
from luoagent.errors import DaemonError, JournalError
from luoagent.workflows import fd_store, restore_journal


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A datagram socket at $NOTIFY_SOCKET that records each message and closes every fd it
    gets (what PID 1 does with a BARRIER's pipe)."""
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("FDSTORE", "3")
    got: list[tuple[bytes, int]] = []
    stop = threading.Event()

    def serve():
        s.settimeout(0.1)
        while not stop.is_set():
            try:
                msg, fds, _f, _a = socket.recv_fds(s, 4096, 4)
            except TimeoutError:
                continue
            got.append((msg, len(fds)))
            for fd in fds:
                os.close(fd)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield got
    stop.set()
    t.join()
    s.close()


@pytest.mark.parametrize("name", ["luoagent", "luoagent/vm/a", "luoagent/vm/web-1.prod+x", "x" * 255])
def test_session_names_are_their_own_fdname(name):
    assert fd_store.fdname(name) == name


@pytest.mark.parametrize("name, why", [("a:b", "':'"), ("a\nb", "'\\n'"), ("é", "'é'"), ("", "empty"),
                                       ("x" * 256, "256 characters")])
def test_a_name_systemd_refuses_is_an_error_never_rewritten(name, why):
    with pytest.raises(DaemonError, match=why.replace("\\", "\\\\").replace("+", r"\+")):
        fd_store.fdname(name)


def test_the_systemd_session_name_is_never_used():
    with pytest.raises(DaemonError, match="belongs to PID 1"):
        fd_store.fdname("systemd")


def test_store_disabled_without_systemd_or_without_a_store(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not fd_store.FdStore.from_environment().enabled
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent")
    monkeypatch.delenv("FDSTORE", raising=False)
    store = fd_store.FdStore.from_environment()
    assert not store.enabled and "FileDescriptorStoreMax=0" in store.describe()


class _Session:
    def __init__(self, name):
        self.name = name
        self.fd = memfd.create("luoagent-test-session", 0)

    def fileno(self):
        return self.fd


def test_push_then_forget_sends_fdstore_and_remove_each_behind_a_barrier(manager):
    store = fd_store.FdStore.from_environment()
    assert store.enabled and store.capacity == 3
    s = _Session("luoagent/vm/a")
    try:
        store.push(s)
        assert store.where("luoagent/vm/a") == ["daemon", "fd store"]
        store.forget("luoagent/vm/a")
        store.forget("luoagent/vm/a")  # a second time: nothing sent
    finally:
        os.close(s.fd)
    assert manager == [
        (b"FDSTORE=1\nFDNAME=luoagent/vm/a\nFDPOLL=0\n", 1), (b"BARRIER=1\n", 1),
        (b"FDSTOREREMOVE=1\nFDNAME=luoagent/vm/a\n", 0), (b"BARRIER=1\n", 1),
    ]
    assert store.where("luoagent/vm/a") == ["daemon"]


def test_room_is_checked_before_a_job_needs_it(manager):
    store = fd_store.FdStore.from_environment()
    store.stored["luoagent/vm/old"] = "luoagent/vm/old"
    store.check_room(2)
    with pytest.raises(DaemonError, match="holds 3 fds .1 in use. and this job needs 3 more"):
        store.check_room(3)


def test_barrier_times_out_when_nobody_answers(tmp_path, monkeypatch):
    path = tmp_path / "deaf"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        with pytest.raises(DaemonError, match="did not answer BARRIER=1"):
            sd_notify.barrier(timeout=0.2)
    finally:
        s.close()


# --- restore journal: what a restarted daemon does with each VM ----------------------------------
@pytest.mark.parametrize("entry, action", [
    (None, restore_journal.START),                                   # (9) killed after the manifest
    ({"step": "retrieving"}, restore_journal.START),                 # (10) killed after the retrieve
    ({"step": "qemu-starting"}, restore_journal.RESTART),
    ({"step": "qemu-started", "pid": 5}, restore_journal.RESTART),    # (11) QEMU up, vmstate not loaded
    ({"step": "loaded"}, restore_journal.RESTART),                   # a paused VM: it never ran
    ({"step": "cont-issued"}, restore_journal.ADOPT),                # (12) the guest may run: never again
    ({"step": "resumed"}, restore_journal.ADOPT),
    ({"step": "finished"}, restore_journal.CLOSE),
    ({"step": "failed"}, restore_journal.CLOSE),
])
def test_replay_rule(entry, action):
    assert restore_journal.next_action(entry) == action


def test_unknown_step_is_refused():
    with pytest.raises(JournalError, match="not one of"):
        restore_journal.next_action({"step": "half"})


def test_journal_resumes_only_in_the_same_boot(tmp_path, monkeypatch):
    path = tmp_path / "restore.json"
    j = restore_journal.RestoreJournal.open(path)
    assert j.previous is None
    j.record_vm("a", step="cont-issued")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    again = restore_journal.RestoreJournal.open(path)
    assert again.entry("a") == {"step": "cont-issued"}
    monkeypatch.setattr(restore_journal, "boot_id", lambda: "another-boot")
    assert restore_journal.RestoreJournal.open(path).entry("a") is None


# --- the orderly shutdown's share of the blackout ------------------------------------------------
def test_kexec_request_memfd_round_trip():
    from luoagent import manifest as mf

    fd = mf.write_kexec_request_memfd(1_700_000_000_123_456_789)
    try:
        assert mf.read_kexec_request(fd) == 1_700_000_000_123_456_789
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)  # sealed: nobody changes it before the next boot reads it
    finally:
        os.close(fd)
    other = memfd.create("luoagent-test-not-a-request", 8)
    try:
        assert mf.read_kexec_request(other) is None
    finally:
        os.close(other)


def test_blackout_split_at_systemctl_kexec_and_boot():
    from luoagent import manifest as mf
    from luoagent.workflows import restore

    s = 10**9
    vm = mf.PreservedVm(name="a", binary="q", argv=[], qmp_socket="/x", ram=[], vmstate=mf.VmstateRecord(token=1, size=1),
                        was_running=True, stopped_at_ns=100 * s, saved_at_ns=101 * s, qemu_version="", ram_bytes_copied=0)
    out = restore.VmOutcome(name="a")
    out.timings["restore_started_ns"] = 130 * s
    out.blackout_parts = {"save": 1.0, "kexec_boot_and_agent_start": 29.0, "qemu_start": 0.5, "load_vmstate": 0.1,
                          "cont": 0.01}
    restore.split_kexec_share(out, vm, 103 * s, 120 * s)
    assert list(out.blackout_parts.items()) == [
        ("save", 1.0), ("until_systemctl_kexec", 2.0), ("orderly_shutdown_and_kexec", 17.0),
        ("boot_and_agent_start", 10.0), ("qemu_start", 0.5), ("load_vmstate", 0.1), ("cont", 0.01)]
    before = dict(out.blackout_parts)
    restore.split_kexec_share(out, vm, None, 120 * s)  # direct reboot syscall: nothing to split
    assert out.blackout_parts == before


# --- `systemctl kexec`: the update's last step under the fd store --------------------------------
class _Store:
    enabled = True

    def __init__(self):
        self.stored = {}


def _update(tmp_path):
    from luoagent.workflows import journal, update

    u = update.job(update.UpdateRequest(kernel=tmp_path / "bzImage", fd_store=_Store(),
                                        journal_path=tmp_path / "journal.json"))
    u.journal = journal.Journal.begin("update", tmp_path / "journal.json")
    return u


def test_after_systemctl_kexec_a_sigterm_is_the_shutdown_not_a_rollback(tmp_path, monkeypatch):
    from luoagent.adapters import systemctl

    calls = []
    monkeypatch.setattr(systemctl, "kexec", lambda: calls.append("systemctl kexec"))
    u = _update(tmp_path)
    assert u._kexec_through_systemd()

    async def scenario():
        task = asyncio.ensure_future(u._systemctl_kexec())
        while not calls:
            await asyncio.sleep(0.01)
        u.interrupt(signal.SIGTERM, task)  # the orderly shutdown stops the daemon
        return await asyncio.wait_for(task, 5)

    result = asyncio.run(scenario())
    assert result["status"].startswith("kexec requested through systemctl") and not u.interrupted
    assert result["kexec_via"] == "systemctl kexec" and result["kexec_requested_ns"] == u.kexec_requested_ns > 0
    doc = json.loads((tmp_path / "journal.json").read_text())
    assert doc["step"] == "kexec-requested" and doc["kexec_requested_ns"] == u.kexec_requested_ns


def test_a_failing_systemctl_kexec_rolls_back_with_its_reason(tmp_path, monkeypatch):
    from luoagent.adapters import systemctl
    from luoagent.errors import KexecError

    def refuse():
        raise KexecError("`systemctl kexec` failed (exit 1): Cannot find the ESP partition")

    monkeypatch.setattr(systemctl, "kexec", refuse)
    u = _update(tmp_path)
    with pytest.raises(KexecError, match="exit 1"):
        asyncio.run(u._systemctl_kexec())
    assert u.kexec_requested_ns == 0  # a signal now is a rollback again


def test_systemctl_killed_by_the_shutdown_it_started_is_not_a_rollback(tmp_path, monkeypatch):
    """The race seen in the systemd lab: the shutdown's SIGTERM reaches the daemon and, at the
    same moment, kills a systemctl still running in the service's cgroup (non-zero exit)."""
    from luoagent.adapters import systemctl
    from luoagent.errors import KexecError

    u = _update(tmp_path)
    holder = {}

    def killed_by_the_shutdown():
        u.interrupt(signal.SIGTERM, holder["task"])
        raise KexecError("`systemctl kexec` failed (exit -15): no message")

    monkeypatch.setattr(systemctl, "kexec", killed_by_the_shutdown)

    async def scenario():
        holder["task"] = asyncio.ensure_future(u._systemctl_kexec())
        return await asyncio.wait_for(holder["task"], 5)

    result = asyncio.run(scenario())
    assert result["status"].startswith("kexec requested through systemctl") and not u.interrupted
    assert u.kexec_requested_ns > 0  # no rollback: the image stays loaded for systemd-shutdown


def test_systemctl_kexec_does_not_wait_for_the_shutdown(monkeypatch):
    import subprocess as sp

    from luoagent.adapters import systemctl

    seen = []
    monkeypatch.setattr(sp, "run", lambda argv, **kw: seen.append(argv) or sp.CompletedProcess(argv, 0, "", ""))
    systemctl.kexec()
    assert seen == [["systemctl", "--no-block", "kexec"]]


def test_the_cli_and_a_daemon_without_store_reboot_directly(tmp_path):
    from luoagent.workflows import update

    assert not update.job(update.UpdateRequest(kernel=tmp_path / "k"))._kexec_through_systemd()
    off = _Store()
    off.enabled = False
    assert not update.job(update.UpdateRequest(kernel=tmp_path / "k", fd_store=off))._kexec_through_systemd()
