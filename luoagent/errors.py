"""The whole luoagent exception tree under one root, so callers catch meaning, not errno.

Every message says what happened and what to do; the CLI prints ``str(exc)`` and exits non-zero.

    LuoAgentError
     ├── UsageError                 bad input from the user (arguments, names, tokens)
     │    ├── InvalidName           session name empty / too long / contains NUL
     │    └── InvalidToken          token not an unsigned 64-bit integer
     ├── LuoError                   the kernel's Live Update Orchestrator said no
     │    ├── LuoUnavailable        no /dev/liveupdate (kernel config or command line)
     │    ├── LuoBusy               /dev/liveupdate already open by another process
     │    ├── LuoStateCorrupt       EIO on open: incoming state could not be deserialized
     │    ├── SessionExists         EEXIST on create: name already used in this boot
     │    ├── SessionNotFound       ENOENT on retrieve: no such session came across kexec
     │    ├── SessionAlreadyRetrieved  EINVAL on retrieve: retrieved before in this boot
     │    ├── SessionFinishFailed   FINISH refused (files still unretrieved, …) or used on an outgoing session
     │    ├── TokenExists           EEXIST on preserve: token already used in the session
     │    ├── TokenNotFound         ENOENT on retrieve fd: no such token in the session
     │    ├── FileAlreadyPreserved  EBUSY on preserve: the same file is already preserved
     │    ├── NotPreservable        ENOENT/EINVAL/EOPNOTSUPP/EFBIG on preserve: fd type, seal or size unsupported
     │    └── LuoIoctlError         any other errno from an LUO ioctl
     ├── MemfdError                 memfd create/map/seal/hash failures
     ├── KexecError                 kexec_file_load / reboot failures
     │    ├── KexecImageError       kernel image missing, unreadable or rejected
     │    └── RebootRefused         reboot(LINUX_REBOOT_CMD_KEXEC) returned
     ├── QemuError                  QEMU process or QMP failures
     │    ├── QemuNotFound          no usable qemu-system-x86_64
     │    ├── UntrustedBinary       a QEMU binary someone other than root could change
     │    ├── QmpUnreachable        QMP socket missing / refused / timed out
     │    ├── QmpCommandFailed      QEMU answered a command with an error
     │    ├── MigrationFailed       cpr-reboot save or load did not complete
     │    └── VmNotPreservable      VM RAM would have to be copied (private / not a memfd)
     ├── ManifestError              the JSON document that crosses kexec
     │    ├── ManifestMissing       no manifest session in this boot
     │    ├── ManifestVersionError  unknown major schema version
     │    └── ManifestCorrupt       unparsable or inconsistent manifest
     ├── UpdateError                a live update failed before the point of no return
     │    └── PreflightRefused      the landing side cannot take the VMs back (nothing was touched)
     ├── UpgradeError               `vm upgrade` could not move a guest to a new QEMU process
     ├── JournalError               the update journal cannot be written/read, or an unfinished one blocks an update
     ├── DaemonError                the luoagent daemon: control socket unreachable or refused, protocol mismatch
     │    ├── DaemonNotRunning      nobody serves the control socket (missing or stale)
     │    └── PeerRefused           a control-socket client that is not root (SO_PEERCRED, socket mode)
     ├── RestoreError               a VM could not be restored after kexec
     ├── LabError                   the nested test lab
     │    ├── LabBuildError         kernel / rootfs / guest build failed
     │    ├── LabBootError          the lab VM did not boot or timed out
     │    └── ScenarioFailed        a scenario reported not ok
     └── TraceError                 luoagent trace could not attach / decode
"""

from __future__ import annotations


class LuoAgentError(Exception):
    """Root of every error luoagent raises on purpose."""

    #: process exit status the CLI uses for this error
    exit_code = 1


# --- bad input -------------------------------------------------------------------------
class UsageError(LuoAgentError):
    exit_code = 2


class InvalidName(UsageError):
    pass


class InvalidToken(UsageError):
    pass


# --- LUO -------------------------------------------------------------------------------
class LuoError(LuoAgentError):
    """An LUO operation failed; ``errno`` holds the kernel's answer when there was one."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class LuoUnavailable(LuoError):
    pass


class LuoBusy(LuoError):
    pass


class LuoStateCorrupt(LuoError):
    pass


class SessionExists(LuoError):
    pass


class SessionNotFound(LuoError):
    pass


class SessionAlreadyRetrieved(LuoError):
    pass


class SessionFinishFailed(LuoError):
    pass


class TokenExists(LuoError):
    pass


class TokenNotFound(LuoError):
    pass


class FileAlreadyPreserved(LuoError):
    pass


class NotPreservable(LuoError):
    pass


class LuoIoctlError(LuoError):
    pass


# --- memfd / kexec ---------------------------------------------------------------------
class MemfdError(LuoAgentError):
    pass


class KexecError(LuoAgentError):
    pass


class KexecImageError(KexecError):
    pass


class RebootRefused(KexecError):
    pass


# --- QEMU ------------------------------------------------------------------------------
class QemuError(LuoAgentError):
    pass


class QemuNotFound(QemuError):
    pass


class UntrustedBinary(QemuError):
    pass


class QmpUnreachable(QemuError):
    pass


class QmpCommandFailed(QemuError):
    """QEMU answered a QMP command with an error: ``command``, QEMU's ``error_class``, ``desc``."""

    def __init__(
        self,
        message: str,
        command: str | None = None,
        error_class: str | None = None,
        desc: str | None = None,
    ):
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MigrationFailed(QemuError):
    pass


class VmNotPreservable(QemuError):
    pass


# --- manifest --------------------------------------------------------------------------
class ManifestError(LuoAgentError):
    pass


class ManifestMissing(ManifestError):
    pass


class ManifestVersionError(ManifestError):
    pass


class ManifestCorrupt(ManifestError):
    pass


# --- workflows -------------------------------------------------------------------------
class UpdateError(LuoAgentError):
    """Update failed before the point of no return; ``step`` and ``vm`` say where."""

    def __init__(self, message: str, step: str | None = None, vm: str | None = None):
        super().__init__(message)
        self.step = step
        self.vm = vm


class UpgradeError(LuoAgentError):
    """`vm upgrade` failed; ``step`` and ``vm`` say where. The message says which QEMU runs the guest."""

    def __init__(self, message: str, step: str | None = None, vm: str | None = None):
        super().__init__(message)
        self.step = step
        self.vm = vm


class JournalError(LuoAgentError):
    pass


class DaemonError(LuoAgentError):
    pass


class DaemonNotRunning(DaemonError):
    pass


class PeerRefused(DaemonError):
    pass


class PreflightRefused(UpdateError):
    """The landing-side preflight refused the update; nothing was stopped or preserved."""


class RestoreError(LuoAgentError):
    pass


class LabError(LuoAgentError):
    pass


class LabBuildError(LabError):
    pass


class LabBootError(LabError):
    pass


class ScenarioFailed(LabError):
    pass


class TraceError(LuoAgentError):
    pass
