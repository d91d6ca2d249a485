"""luoagent.memfd on real memfds: create, patterns, seals, reopen, map, and the hole-skipping hash."""

from __future__ import annotations

import hashlib
import os

import pytest

from luoagent import memfd
from luoagent.errors import MemfdError

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def fds():
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def naive_sha256(fd: int) -> str:
    """Reference digest: read every byte, holes included."""
    h = hashlib.sha256()
    pos = 0
    while chunk := os.pread(fd, 8 * MiB, pos):
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def test_create_is_an_unlinked_cloexec_memfd_of_the_size(fds):
    fd = memfd.create("luoagent-test", 3 * MiB)
    fds.append(fd)
    assert memfd.size(fd) == 3 * MiB
    assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:luoagent-test (deleted)"
    assert not os.get_inheritable(fd)
    assert list(memfd.data_extents(fd)) == []  # all hole until written


def test_pattern_roundtrip_and_detects_change(fds):
    fd = memfd.create("pattern", 8 * MiB)
    fds.append(fd)
    memfd.write_pattern(fd, MiB - 100, 3 * MiB, seed=5)  # crosses pattern blocks
    assert memfd.verify_pattern(fd, MiB - 100, 3 * MiB, seed=5)
    assert memfd.verify_pattern(fd, 2 * MiB, 1000, seed=5)  # any sub-range checks alone
    assert not memfd.verify_pattern(fd, MiB - 100, 3 * MiB, seed=6)
    os.pwrite(fd, bytes([memfd.pattern(2 * MiB, 1, 5)[0] ^ 1]), 2 * MiB)  # flip one bit
    assert not memfd.verify_pattern(fd, MiB - 100, 3 * MiB, seed=5)


def test_pattern_depends_on_position():
    assert memfd.pattern(0, 4096, 1) != memfd.pattern(memfd.PATTERN_BLOCK, 4096, 1)
    assert memfd.pattern(0, 4096, 1) == memfd.pattern(0, 4096, 1)


def test_fill_random_sizes_and_fills(fds):
    fd = memfd.create("fill")
    fds.append(fd)
    memfd.fill_random(fd, 5 * MiB + 3, seed=9)
    assert memfd.size(fd) == 5 * MiB + 3
    assert memfd.verify_pattern(fd, 0, 5 * MiB + 3, seed=9)


def test_seals(fds):
    fd = memfd.create("sealed", MiB, sealing=True)
    fds.append(fd)
    assert memfd.seals(fd) == 0
    memfd.seal(fd, memfd.SEAL_WRITE | memfd.SEAL_SHRINK | memfd.SEAL_GROW)
    assert memfd.seal_names(memfd.seals(fd)) == ["shrink", "grow", "write"]
    with pytest.raises(MemfdError, match="write-sealed"):
        memfd.write_pattern(fd, 0, 10, seed=1)
    with pytest.raises(MemfdError, match="seal"):
        memfd.resize(fd, 2 * MiB)


def test_seal_needs_sealing_flag(fds):
    fd = memfd.create("unsealable", MiB)
    fds.append(fd)
    assert memfd.seals(fd) == memfd.SEAL_SEAL  # memfd_create without MFD_ALLOW_SEALING
    with pytest.raises(MemfdError, match="sealing=True"):
        memfd.seal(fd, memfd.SEAL_WRITE)


def test_reopen_with_another_access_mode(fds):
    fd = memfd.create("reopen", 0)
    fds.append(fd)
    w = memfd.reopen(fd, os.O_WRONLY)
    fds.append(w)
    r = memfd.reopen(fd, os.O_RDONLY)
    fds.append(r)
    assert os.write(w, b"vmstate") == 7
    assert os.pread(r, 7, 0) == b"vmstate" and os.pread(fd, 7, 0) == b"vmstate"
    with pytest.raises(OSError):
        os.read(w, 1)  # really write-only, as QEMU's fdset matching needs
    with pytest.raises(OSError):
        os.write(r, b"x")
    with pytest.raises(MemfdError, match="reopening /proc/self/fd/"):
        memfd.reopen(987654, os.O_RDONLY)


def test_map_shares_with_the_file(fds):
    fd = memfd.create("map", 2 * MiB)
    fds.append(fd)
    with memfd.map(fd) as m:
        m[MiB:MiB + 4] = b"ABCD"
    assert os.pread(fd, 4, MiB) == b"ABCD"


def test_create_errors_are_memfd_errors():
    with pytest.raises(MemfdError, match="memfd_create"):
        memfd.create("x" * 300)


def test_sha256_matches_every_byte_on_small_files(fds):
    for length in (0, 1, 4095, 4 * MiB + 17):
        fd = memfd.create("small", length)
        fds.append(fd)
        if length:
            memfd.write_pattern(fd, length // 3, max(1, length // 3), seed=length)
        assert memfd.sha256(fd) == naive_sha256(fd)


def test_sha256_of_a_sparse_gib_memfd(fds):
    """1 GiB, mostly hole, data at start, middle (unaligned) and last byte: same digest as
    reading every byte; holes are skipped (data_extents shows only the written parts)."""
    fd = memfd.create("sparse", GiB)
    fds.append(fd)
    memfd.write_pattern(fd, 0, MiB, seed=1)
    memfd.write_pattern(fd, 300 * MiB + 12345, 5 * MiB, seed=2)
    os.pwrite(fd, b"\xff", GiB - 1)
    extents = list(memfd.data_extents(fd))
    assert sum(end - start for start, end in extents) < 16 * MiB
    assert extents[0][0] == 0 and extents[-1][1] == GiB
    os.lseek(fd, 777, os.SEEK_SET)
    digest = memfd.sha256(fd)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 777  # file offset untouched
    assert digest == naive_sha256(fd)
    os.pwrite(fd, b"\x01", 700 * MiB)  # one byte inside a former hole changes the digest
    assert memfd.sha256(fd) != digest


def test_sha256_on_write_only_fd_says_so(fds):
    fd = memfd.create("wo", 10)
    fds.append(fd)
    w = memfd.reopen(fd, os.O_WRONLY)
    fds.append(w)
    os.write(w, b"x")
    with pytest.raises(MemfdError, match="readable"):
        memfd.sha256(w)


def test_sha256_keeps_the_file_offset_of_a_dense_memfd(fds):
    """LUO preserves the file offset, so hashing (lseek SEEK_DATA/SEEK_HOLE inside) must restore it."""
    fd = memfd.create("dense", 4 * MiB)
    fds.append(fd)
    memfd.write_pattern(fd, 0, 4 * MiB, seed=3)
    os.lseek(fd, 777, os.SEEK_SET)
    memfd.sha256(fd)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 777
