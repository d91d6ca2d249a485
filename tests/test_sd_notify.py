"""`adapters.sd_notify`: the datagrams it sends to a real AF_UNIX socket (what systemd reads),
fds passed with SCM_RIGHTS arriving as the same open file, LISTEN_FDS parsing, no-op without
$NOTIFY_SOCKET. What systemd then does with them is for a systemd lab (not built yet)."""

from __future__ import annotations

import os
import socket

import pytest

from luoagent import memfd
from luoagent.adapters import sd_notify
from luoagent.errors import DaemonError


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify.notify({"READY": 1}) is False


def test_ready_and_status(notify_socket):
    assert sd_notify.notify({"READY": 1, "STATUS": "serving x"})
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving x\n"


def test_store_fd_passes_the_same_file(notify_socket):
    fd = memfd.create("luoagent-test-fdstore", 4096)
    try:
        assert sd_notify.store_fd(fd, "luoagent-vm-a")
        msg, fds, _flags, _addr = socket.recv_fds(notify_socket, 4096, 4)
        assert msg == b"FDSTORE=1\nFDNAME=luoagent-vm-a\nFDPOLL=0\n" and len(fds) == 1
        try:
            assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino
        finally:
            os.close(fds[0])
    finally:
        os.close(fd)
    assert sd_notify.remove_fd("luoagent-vm-a")
    assert notify_socket.recv(4096) == b"FDSTOREREMOVE=1\nFDNAME=luoagent-vm-a\n"


def test_a_newline_in_a_field_is_refused(notify_socket):
    with pytest.raises(DaemonError, match="newline"):
        sd_notify.notify({"FDNAME": "a\nREADY=1"})


def test_listen_fds(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "luoagent:luoagent-vm-a")
    r, w = os.pipe()  # make sure fds 3 and 4 exist in this process
    extra = []
    try:
        while max(r, w, *extra) < 4:
            extra.append(os.dup(0))
        assert sd_notify.listen_fds() == {"luoagent": [3], "luoagent-vm-a": [4]}
        assert "LISTEN_FDS" not in os.environ
        monkeypatch.setenv("LISTEN_PID", "1")
        monkeypatch.setenv("LISTEN_FDS", "2")
        assert sd_notify.listen_fds() == {}  # meant for another process
    finally:
        for fd in (r, w, *extra):
            os.close(fd)
