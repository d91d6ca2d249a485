"""Unit tier for the RAM sample (workflows/ram_sample.py) and its manifest field: real memfds."""

from __future__ import annotations

import os

import pytest

from luoagent import manifest as mf
from luoagent import memfd
from luoagent.errors import ManifestCorrupt, RestoreError
from luoagent.workflows import ram_sample


def test_offsets_cover_every_stratum_of_the_memfd():
    size = 1 << 30
    offs = ram_sample.offsets(size)
    assert len(offs) == 64 and all(o % ram_sample.PAGE == 0 for o in offs)
    stratum = size // len(offs)
    assert [o // stratum for o in offs] == list(range(len(offs)))
    assert ram_sample.offsets(size) != offs  # random within each stratum
    assert len(ram_sample.offsets(8192)) == 2 and ram_sample.offsets(100) == []


def test_a_changed_sampled_byte_is_caught_and_an_unchanged_memfd_passes():
    size = 64 << 20
    fd = memfd.create("luoagent-test-sample", size)
    try:
        memfd.fill_random(fd, size, 7)
        record, seconds = ram_sample.take(fd, size)
        assert seconds >= 0 and len(record["sha256"]) == 64
        ram_sample.verify("ram0", fd, record)
        off = record["offsets"][10] + 4095
        os.pwrite(fd, bytes([os.pread(fd, 1, off)[0] ^ 1]), off)
        with pytest.raises(RestoreError, match="ram0.*do not match.*QEMU was not started"):
            ram_sample.verify("ram0", fd, record)
    finally:
        os.close(fd)


def test_sample_round_trips_through_the_manifest_and_is_typed():
    sample = {"page_size": 4096, "offsets": [0, 8192], "sha256": "ab" * 32}
    vm = mf.PreservedVm(name="a", binary="/q", argv=["-m", "64"], qmp_socket="/s",
                        ram=[mf.RamRecord(id="ram0", size=1 << 20, token=1, sample=sample)],
                        vmstate=mf.VmstateRecord(token=mf.VMSTATE_TOKEN, size=10), was_running=True,
                        stopped_at_ns=1, saved_at_ns=2, qemu_version="11.1.3", ram_bytes_copied=0)
    m = mf.Manifest(created_ns=1, kernel_from="7.2.13", kernel_to="/k", kernel_cmdline="", agent_version="x", vms=[vm])
    back = mf.Manifest.from_json(m.to_json())
    assert back.vms[0].ram[0].sample == sample and back.schema == (1, 1)
    doc = m.to_dict()
    del doc["vms"][0]["ram"][0]["sample"]  # a 1.0 manifest has none
    assert mf.Manifest.from_dict(doc).vms[0].ram[0].sample is None
    doc["vms"][0]["ram"][0]["sample"] = {**sample, "offsets": [True]}
    with pytest.raises(ManifestCorrupt):
        mf.Manifest.from_dict(doc)
