"""The versioned JSON manifest that crosses kexec: which VMs, their QEMU argv, tokens and sizes.

It is written into a sealed memfd preserved in the well-known LUO session ``luoagent`` (token 0)."""

from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass, field

from luoagent.errors import InvalidName, ManifestCorrupt, ManifestVersionError

#: (major, minor). A reader accepts any minor of its major (new fields are optional and ignored);
#: a different major means the layout changed incompatibly and restore must refuse.
SCHEMA_VERSION = (1, 1)  # 1.1: the QEMU's uid/gid, ram_blocks_in_stream_bytes, RAM page samples

#: well-known session that carries the manifest across kexec, and the manifest's token in it
MANIFEST_SESSION = "luoagent"
MANIFEST_TOKEN = 0
#: in the manifest session too: when `systemctl kexec` was called (realtime ns, 8 bytes LE,
#: sealed), so the next boot can tell the orderly shutdown's share of the blackout
KEXEC_REQUEST_TOKEN = 1
#: tokens inside a VM session: RAM backends 1..N in backend order, vmstate at a fixed token
VMSTATE_TOKEN = 0x1000
VM_SESSION_PREFIX = "luoagent/vm/"
#: LUO session names are 64 bytes including the terminating NUL
SESSION_NAME_MAX = 63
#: a manifest bigger than this is not ours (protects restore from reading a huge foreign memfd)
MANIFEST_MAX_BYTES = 4 << 20

_VM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: a QOM id as QEMU accepts it (qom/object id rules); it also names the rescue image's RAM file,
#: so it must never hold '/' or start with '.'
_RAM_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
#: sun_path holds 108 bytes including the NUL
_SOCKET_PATH_MAX = 107


def vm_session_name(vm_name: str) -> str:
    """LUO session name for one VM; InvalidName (saying what to change) if the VM name cannot
    form one. The single naming rule for `luoagent vm`, `update` and `restore`."""
    room = SESSION_NAME_MAX - len(VM_SESSION_PREFIX.encode())
    if not vm_name:
        raise InvalidName("VM name is empty")
    if "/" in vm_name or "\0" in vm_name:
        raise InvalidName(f"VM name {vm_name!r} contains '/' or NUL; use letters, digits, '.', '_', '+', '-'")
    if len(vm_name.encode()) > room:
        raise InvalidName(
            f"VM name {vm_name!r} is {len(vm_name.encode())} bytes; at most {room} fit the LUO "
            f"session name {VM_SESSION_PREFIX}<name> ({SESSION_NAME_MAX} bytes)"
        )
    if not _VM_NAME_RE.match(vm_name):
        raise InvalidName(
            f"VM name {vm_name!r} has unsupported characters; start with a letter or digit and use "
            "only letters, digits, '.', '_', '+', '-'"
        )
    return VM_SESSION_PREFIX + vm_name


def ram_token(index: int) -> int:
    """Token of the ``index``-th (0-based) RAM backend of a VM."""
    if not 0 <= index < VMSTATE_TOKEN - 1:
        raise ValueError(f"RAM backend index {index} out of range")
    return index + 1


@dataclass
class RamRecord:
    """One memory-backend-file of a VM: its QOM id, size in bytes and LUO token."""

    id: str
    size: int
    token: int
    #: schema 1.1, optional: pages hashed after the VM stopped (workflows/ram_sample.py):
    #: {"page_size", "offsets": [bytes], "sha256"}; restore checks it before starting QEMU
    sample: dict | None = None


@dataclass
class VmstateRecord:
    token: int
    size: int


@dataclass
class PreservedVm:
    """Everything restore needs to bring one VM back on the new kernel."""

    name: str
    binary: str
    argv: list[str]  # QEMU arguments without the binary
    qmp_socket: str
    ram: list[RamRecord]
    vmstate: VmstateRecord
    was_running: bool
    stopped_at_ns: int  # CLOCK_REALTIME when `stop` was issued
    saved_at_ns: int  # CLOCK_REALTIME when the cpr-reboot save completed
    qemu_version: str
    #: upper bound on guest RAM bytes in the vmstate: the RAM page bytes QEMU wrote (query-migrate
    #: ram.normal-bytes, every block incl. firmware), capped by the stream size
    ram_bytes_copied: int
    session: str = ""
    pid: int = 0  # the QEMU pid before kexec (for the report only)
    #: identity the QEMU ran as (from /proc/PID/status, schema 1.1); restore keeps it
    uid: int = 0
    gid: int = 0
    #: query-migrate ram.total: size of the RAM blocks QEMU put in the stream (-1: not reported)
    ram_blocks_in_stream_bytes: int = -1

    def __post_init__(self) -> None:
        if not self.session:
            self.session = vm_session_name(self.name)

    @property
    def ram_bytes(self) -> int:
        return sum(r.size for r in self.ram)


@dataclass
class Manifest:
    """The whole document. ``schema`` is serialised first so any reader can check it before
    trusting anything else."""

    created_ns: int
    kernel_from: str  # release of the kernel that wrote the manifest
    kernel_to: str  # path of the image that was kexec'd
    kernel_cmdline: str
    agent_version: str
    vms: list[PreservedVm] = field(default_factory=list)
    schema: tuple[int, int] = SCHEMA_VERSION
    kernel_to_version: str = ""  # the image's own version string (bzImage header)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        doc = {"schema": f"{self.schema[0]}.{self.schema[1]}"}  # first key on purpose
        body = asdict(self)
        body.pop("schema")
        doc.update(body)
        return doc

    def to_json(self) -> bytes:
        self.validate()
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> "Manifest":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestCorrupt(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: object) -> "Manifest":
        if not isinstance(doc, dict):
            raise ManifestCorrupt("manifest is not a JSON object")
        major, minor = _parse_schema(doc.get("schema"))
        if major != SCHEMA_VERSION[0]:
            raise ManifestVersionError(
                f"manifest schema version {major}.{minor} is not supported by this luoagent "
                f"(it reads schema {SCHEMA_VERSION[0]}.x, writes {SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}): "
                "restore with the luoagent version that wrote it"
            )
        try:
            vms = []
            if not isinstance(doc["vms"], list):
                raise TypeError("'vms' must be a list")
            for v in doc["vms"]:
                vms.append(
                    PreservedVm(
                        name=_typed(v, "name", str),
                        binary=_typed(v, "binary", str),
                        argv=_str_list(v, "argv"),
                        qmp_socket=_typed(v, "qmp_socket", str),
                        ram=[
                            RamRecord(id=_typed(r, "id", str), size=_typed(r, "size", int), token=_typed(r, "token", int),
                                      sample=_sample(r))
                            for r in v["ram"]
                        ],
                        vmstate=VmstateRecord(
                            token=_typed(v["vmstate"], "token", int), size=_typed(v["vmstate"], "size", int)
                        ),
                        was_running=_typed(v, "was_running", bool),
                        stopped_at_ns=_typed(v, "stopped_at_ns", int),
                        saved_at_ns=_typed(v, "saved_at_ns", int),
                        qemu_version=_typed(v, "qemu_version", str),
                        ram_bytes_copied=_typed(v, "ram_bytes_copied", int),
                        session=_typed(v, "session", str),
                        pid=_optional(v, "pid", int, 0),
                        uid=_optional(v, "uid", int, 0),
                        gid=_optional(v, "gid", int, 0),
                        ram_blocks_in_stream_bytes=_optional(v, "ram_blocks_in_stream_bytes", int, -1),
                    )
                )
            m = cls(
                created_ns=_typed(doc, "created_ns", int),
                kernel_from=_typed(doc, "kernel_from", str),
                kernel_to=_typed(doc, "kernel_to", str),
                kernel_cmdline=_typed(doc, "kernel_cmdline", str),
                agent_version=_typed(doc, "agent_version", str),
                vms=vms,
                schema=(major, minor),
                kernel_to_version=_optional(doc, "kernel_to_version", str, ""),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestCorrupt(f"manifest field missing or malformed: {exc}") from None
        except InvalidName as exc:
            raise ManifestCorrupt(f"manifest names an invalid VM: {exc}") from None
        m.validate()
        return m

    # ---- consistency ---------------------------------------------------------------------
    def validate(self) -> None:
        """ManifestCorrupt unless names, sessions, tokens and sizes are consistent."""
        seen: set[str] = set()
        for vm in self.vms:
            if vm.name in seen:
                raise ManifestCorrupt(f"manifest lists VM {vm.name!r} twice")
            seen.add(vm.name)
            try:
                expected_session = vm_session_name(vm.name)
            except InvalidName as exc:
                raise ManifestCorrupt(f"manifest names an invalid VM: {exc}") from None
            if vm.session != expected_session:
                raise ManifestCorrupt(f"VM {vm.name!r}: session {vm.session!r} does not match its name")
            if not vm.ram:
                raise ManifestCorrupt(f"VM {vm.name!r} has no RAM backends")
            ids = [r.id for r in vm.ram]
            if len(set(ids)) != len(ids):
                raise ManifestCorrupt(f"VM {vm.name!r} lists a RAM backend id twice: {ids}")
            for i, r in enumerate(vm.ram):
                if not _RAM_ID_RE.match(r.id):
                    raise ManifestCorrupt(
                        f"VM {vm.name!r}: RAM backend id {r.id!r} is not a QOM id (letters, digits, '.', '_', '-'; "
                        "starting with a letter)")
                if r.token != ram_token(i):
                    raise ManifestCorrupt(f"VM {vm.name!r}: RAM backend {r.id!r} has token {r.token}, expected {ram_token(i)}")
                if r.size <= 0:
                    raise ManifestCorrupt(f"VM {vm.name!r}: RAM backend {r.id!r} has size {r.size}")
            if vm.vmstate.token != VMSTATE_TOKEN:
                raise ManifestCorrupt(f"VM {vm.name!r}: vmstate token {vm.vmstate.token:#x}, expected {VMSTATE_TOKEN:#x}")
            if vm.vmstate.size <= 0:
                raise ManifestCorrupt(f"VM {vm.name!r}: vmstate size {vm.vmstate.size}")
            if not vm.argv:
                raise ManifestCorrupt(f"VM {vm.name!r} has an empty QEMU argv")
            _check_path(vm.name, "binary", vm.binary)
            _check_path(vm.name, "qmp_socket", vm.qmp_socket)
            if len(vm.qmp_socket.encode()) > _SOCKET_PATH_MAX:
                raise ManifestCorrupt(f"VM {vm.name!r}: qmp_socket {vm.qmp_socket!r} is longer than a unix socket path")
            for key in ("pid", "uid", "gid"):
                if not 0 <= getattr(vm, key) < 2**31:
                    raise ManifestCorrupt(f"VM {vm.name!r}: {key} {getattr(vm, key)} is out of range")

    def vm(self, name: str) -> PreservedVm:
        for v in self.vms:
            if v.name == name:
                return v
        raise KeyError(name)


def _check_path(vm: str, key: str, value: str) -> None:
    """Paths restore acts on (executes, unlinks) must be absolute and normal: no '..', no '.',
    no empty component, no NUL, so they cannot climb out of the directory they name."""
    parts = value.split("/")
    if not value.startswith("/") or "\0" in value or any(p in ("", ".", "..") for p in parts[1:]):
        raise ManifestCorrupt(
            f"VM {vm!r}: {key} {value!r} is not a normalised absolute path (no '.', '..' or '//'); "
            "the manifest was not written by luoagent update")


def _optional(d: dict, key: str, typ: type, default):
    """An optional field (added in a minor version) with the same strict typing as _typed."""
    if key not in d:
        return default
    return _typed(d, key, typ)


def _parse_schema(value: object) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ManifestCorrupt(f"manifest schema version {value!r} is not a version")
    if isinstance(value, int):
        return value, 0
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+)(?:\.(\d+))?", value)
        if m:
            return int(m.group(1)), int(m.group(2) or 0)
    if value is None:
        raise ManifestCorrupt("manifest has no schema version (first key 'schema'): not a luoagent manifest")
    raise ManifestCorrupt(f"manifest schema version {value!r} is not of the form MAJOR.MINOR")


def _typed(d: object, key: str, typ: type):
    if not isinstance(d, dict):
        raise TypeError(f"expected an object around {key!r}")
    value = d[key]
    # bool is an int in Python; keep the two apart so `true` never passes as a size
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{key!r} must be an integer, got {value!r}")
    if not isinstance(value, typ):
        raise TypeError(f"{key!r} must be {typ.__name__}, got {value!r}")
    return value


def _sample(r: dict) -> dict | None:
    """A RAM record's optional page sample (schema 1.1), strictly typed."""
    value = r.get("sample")
    if value is None:
        return None
    offs = _typed(value, "offsets", list)
    if not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs):
        raise TypeError("'sample.offsets' must be a list of non-negative integers")
    _typed(value, "page_size", int)
    if not re.fullmatch(r"[0-9a-f]{64}", _typed(value, "sha256", str)):
        raise TypeError("'sample.sha256' must be 64 hex digits")
    return value


def _str_list(d: dict, key: str) -> list[str]:
    value = d[key]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise TypeError(f"{key!r} must be a list of strings")
    return value


# ---- the sealed memfd ---------------------------------------------------------------------
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def write_sealed_memfd(manifest: Manifest) -> int:
    """Serialise into a new memfd, seal it read-only and return the fd (caller owns it)."""
    data = manifest.to_json()
    fd = os.memfd_create("luoagent-manifest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_kexec_request_memfd(realtime_ns: int) -> int:
    """A sealed 8-byte memfd holding ``realtime_ns`` (KEXEC_REQUEST_TOKEN); caller owns it."""
    fd = os.memfd_create("luoagent-kexec-request", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.write(fd, int(realtime_ns).to_bytes(8, "little"))
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_kexec_request(fd: int) -> int | None:
    """The realtime written by write_kexec_request_memfd, or None if the fd is not one."""
    try:
        if not is_sealed(fd) or os.fstat(fd).st_size != 8:
            return None
        return int.from_bytes(os.pread(fd, 8, 0), "little")
    except OSError:
        return None


def read_memfd(fd: int) -> Manifest:
    """Parse a manifest from an fd (from offset 0, independent of the file position). It must
    carry the seals update added (LUO keeps them), so nobody can have changed it since."""
    try:
        sealed = is_sealed(fd)
    except OSError:
        sealed = False  # not a memfd at all
    if not sealed:
        raise ManifestCorrupt(
            "manifest memfd is not sealed (F_SEAL_SEAL|SHRINK|GROW|WRITE): it was not written by "
            "luoagent update, or was changed after; refusing to trust it")
    size = os.fstat(fd).st_size
    if size > MANIFEST_MAX_BYTES:
        raise ManifestCorrupt(f"manifest memfd is {size} bytes, more than {MANIFEST_MAX_BYTES}: not a luoagent manifest")
    data = os.pread(fd, size, 0)
    if len(data) != size:
        raise ManifestCorrupt(f"manifest memfd: read {len(data)} of {size} bytes")
    return Manifest.from_json(data)


def is_sealed(fd: int) -> bool:
    """True if the fd carries every seal write_sealed_memfd adds."""
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS == _SEALS
