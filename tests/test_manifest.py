"""Unit tests for luoagent.manifest: round trip, versioning, validation and the sealed memfd.

Pure logic plus a real memfd; no LUO or QEMU needed."""

from __future__ import annotations

import json
import os

import pytest

from luoagent import manifest as mf
from luoagent.errors import InvalidName, ManifestCorrupt, ManifestVersionError


def make_vm(name="a", n_ram=2):
    return mf.PreservedVm(
        name=name,
        binary="/usr/bin/qemu-system-x86_64",
        argv=["-machine", "pc", "-object", "memory-backend-file,id=ram0,size=64M,mem-path=/proc/self/fd/3,share=on"],
        qmp_socket=f"/run/luoagent/vms/{name}/qmp.sock",
        ram=[mf.RamRecord(id=f"ram{i}", size=64 << 20, token=mf.ram_token(i)) for i in range(n_ram)],
        vmstate=mf.VmstateRecord(token=mf.VMSTATE_TOKEN, size=315606),
        was_running=True,
        stopped_at_ns=1_000,
        saved_at_ns=2_000,
        qemu_version="11.1.3",
        ram_bytes_copied=0,
    )


def make_manifest(*names):
    return mf.Manifest(
        created_ns=123,
        kernel_from="7.2.13",
        kernel_to="/boot/bzImage",
        kernel_cmdline="console=ttyS0 liveupdate=on",
        agent_version="0.1.0",
        vms=[make_vm(n) for n in names],
    )


def test_round_trip_keeps_every_field():
    m = make_manifest("a", "b")
    back = mf.Manifest.from_json(m.to_json())
    assert back == m
    assert back.vm("b").session == "luoagent/vm/b"
    assert back.vm("a").ram_bytes == 128 << 20


def test_schema_is_the_first_key():
    text = make_manifest("a").to_json().decode()
    assert next(iter(json.loads(text))) == "schema"
    assert text.lstrip("{ \n").startswith(f'"schema": "{mf.SCHEMA_VERSION[0]}.{mf.SCHEMA_VERSION[1]}"')


def test_newer_minor_is_accepted_and_unknown_fields_ignored():
    doc = make_manifest("a").to_dict()
    doc["schema"] = f"{mf.SCHEMA_VERSION[0]}.99"
    doc["future_field"] = {"x": 1}
    doc["vms"][0]["future_vm_field"] = 7
    m = mf.Manifest.from_dict(doc)
    assert m.schema == (mf.SCHEMA_VERSION[0], 99)


@pytest.mark.parametrize("version", ["2.0", 0, "17.3"])
def test_unknown_major_names_both_versions(version):
    doc = make_manifest("a").to_dict()
    doc["schema"] = version
    with pytest.raises(ManifestVersionError) as ei:
        mf.Manifest.from_dict(doc)
    msg = str(ei.value)
    major = str(version).split(".")[0]
    assert f"{major}." in msg and f"{mf.SCHEMA_VERSION[0]}.{mf.SCHEMA_VERSION[1]}" in msg


@pytest.mark.parametrize(
    "data, match",
    [
        (b"\x00\xffgarbage", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"vms": []}', "no schema version"),
        (b'{"schema": "one"}', "MAJOR.MINOR"),
        (b'{"schema": true}', "not a version"),
        (b'{"schema": "1.0", "vms": []}', "missing or malformed"),
    ],
)
def test_corrupt_documents_are_rejected_clearly(data, match):
    with pytest.raises(ManifestCorrupt, match=match):
        mf.Manifest.from_json(data)


def test_inconsistent_tokens_and_sizes_are_corrupt():
    m = make_manifest("a")
    m.vms[0].ram[1].token = 5
    with pytest.raises(ManifestCorrupt, match="token 5, expected 2"):
        m.to_json()
    m = make_manifest("a")
    m.vms[0].vmstate.token = 7
    with pytest.raises(ManifestCorrupt, match="vmstate token"):
        m.to_json()
    doc = make_manifest("a").to_dict()
    doc["vms"][0]["ram"][0]["size"] = True  # bool must not pass as an int
    with pytest.raises(ManifestCorrupt, match="must be an integer"):
        mf.Manifest.from_dict(doc)
    doc = make_manifest("a", "b").to_dict()
    doc["vms"][1]["name"] = "a"
    doc["vms"][1]["session"] = "luoagent/vm/a"
    with pytest.raises(ManifestCorrupt, match="twice"):
        mf.Manifest.from_dict(doc)


def test_session_names():
    assert mf.vm_session_name("guest-1") == "luoagent/vm/guest-1"
    longest = "g" * (mf.SESSION_NAME_MAX - len(mf.VM_SESSION_PREFIX))
    assert len(mf.vm_session_name(longest)) == mf.SESSION_NAME_MAX
    with pytest.raises(InvalidName, match="at most 51"):
        mf.vm_session_name(longest + "x")
    for bad in ["", "a/b", "-x", "a b", "é"]:
        with pytest.raises(InvalidName):
            mf.vm_session_name(bad)


def test_tokens():
    assert [mf.ram_token(i) for i in range(3)] == [1, 2, 3]
    assert mf.VMSTATE_TOKEN == 0x1000 and mf.MANIFEST_TOKEN == 0
    with pytest.raises(ValueError):
        mf.ram_token(mf.VMSTATE_TOKEN - 1)


def test_sealed_memfd_round_trip_and_is_read_only():
    m = make_manifest("a", "b")
    fd = mf.write_sealed_memfd(m)
    try:
        assert mf.is_sealed(fd)
        os.lseek(fd, 5, os.SEEK_SET)  # reading must not depend on the file position
        assert mf.read_memfd(fd) == m
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 1)
    finally:
        os.close(fd)


def test_read_memfd_rejects_foreign_content():
    fd = os.memfd_create("not-a-manifest")
    try:
        os.write(fd, b"hello")
        with pytest.raises(ManifestCorrupt):
            mf.read_memfd(fd)
    finally:
        os.close(fd)
